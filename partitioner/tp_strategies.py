"""The tensor-parallel strategies: the one table that planning, pricing, profiling and the runtime read.

A plan says, per FX node, how the ``tp`` axis splits it. Each strategy is one
``TPStrategy`` in ``STRATEGIES``, which holds everything the phases need to
know about it:

* which kinds of node it applies to (``node_kind``) and whether tp divides what it
  splits (``fits``), read by ``allowed_strategies``,
  which the Megatron layout, the sharding ILP and the profiler enumerate;
* the layouts it needs and produces, and its own collectives, read by the
  pricing in ``sharding.BlockLayoutCosts`` and by the sharding ILP;
* which parameters it splits and on which dim (``param_dims``), read by the
  memory model (``sharding.sharded_params``) and the rewrite
  (``rewrite.param_placements``);
* how to cut an op's inputs to one rank's shard (``local_args``), which the
  profiler times;
* how it runs on DTensor (``realize``), which the tensor-parallel interpreter
  calls for every node (``rewrite.TensorParallelModule``).

Adding a strategy (a vocabulary-parallel head of a new shape) is a new entry
here; ``plan.STRATEGIES`` and the docs list the names. Sequence parallelism
was added this way: two entries and one layout ([Note: sequence parallelism]).

[Note: layouts and resharding]
Every tensor has a layout over the tp axis: ``R`` (whole on every rank),
``S`` (split; for activations, along features or heads) or ``Q`` (split
along the tokens: the sequence dim; see [Note: sequence parallelism]). A
node's strategy fixes its output layout and the layout it needs for its data
inputs:

    strategy    needs   produces   its own collectives (one micro-batch)
    replicate   R       R          -
    column      R       S          backward all-reduce of the input gradient (Megatron's f),
                                   once per input tensor however many column nodes read it
    row         S       R          forward all-reduce of the output (Megatron's g)
    vocab       R       R          forward all-reduce of the output
    sharded     S       S          -
    seq         Q       Q          backward all-reduce of its parameters' gradients (a norm's weight)
    row_seq     S       Q          forward reduce-scatter of the output (Megatron's g with SP),
                                   backward all-gather of its gradient

An edge whose producer layout differs from what the consumer needs pays a
resharding: ``R -> S`` is a free slice in forward and an all-gather of the
gradient in backward (when the tensor is floating point); ``S -> R`` is an
all-gather in forward and a free slice of the gradient in backward; the
edges from and to ``Q`` are in [Note: sequence parallelism]. Tensors
entering a block from outside are ``R``; tensors leaving it must be ``R``
(block boundaries carry whole tensors), except the model's outputs, which a
vocabulary-parallel loss reads split. Work (FLOPs and bytes) of any strategy
but ``replicate`` is divided by tp, and so are the parameters of column, row
and vocab nodes and the saved activations of ``S`` and ``Q`` tensors, where
no node that saves the tensor reads it whole (a replicated node saves the
gathered copy it ran on; see also below).

[Note: sequence parallelism]
Megatron-LM's sequence parallelism (Korthikanti et al. 2022; DTensor's
``SequenceParallel`` as torchtitan applies it) runs the regions between a
row linear and the next column linear (dropout, the residual add, the norm)
split along the tokens, so that their work and what they save are divided
by tp, and replaces the row linear's all-reduce by a reduce-scatter to the
split tokens and the column linear's input by an all-gather of them:

* layout ``Q``: a tensor of shape (batch, seq, x) split on dim 1, or its
  flattened (batch * seq, x) form (GPT-2's ``Conv1D``) split on dim 0.
  ``token_dim`` finds that dim from the captured shapes, against the
  model's (batch, seq) read from its inputs (``sequence_shape``). Where it
  is ambiguous (batch == seq > 1, no (batch, seq) input, inputs that
  disagree) or seq is not divisible by tp, no node may use ``Q``. On the
  runtime's DTensors ``Q`` is ``Shard(d)`` for a dim ``d`` before the last:
  DTensor's view rules may move the split of a flattened (batch * seq)
  tensor to the batch dim when the micro-batch divides by tp; that is still
  a split of the tokens, with the same work, memory and collectives.
* ``seq`` (needs ``Q``, makes ``Q``): a node whose output and data inputs
  are token-shaped (``token_dim``) and that is neither a linear, an
  embedding nor attention: elementwise ops, norms over the last dim,
  dropout, residual adds. Its parameters (a norm's weight) stay whole;
  their gradients are partial sums over each rank's tokens and are
  all-reduced in backward. Realized on DTensor ``Shard(d)`` inputs
  (``_realize_seq``); a whole input is sliced.
* ``row_seq`` (needs ``S``, makes ``Q``): a row linear whose partial sums
  are reduce-scattered to the tokens (``Partial -> Shard(d)``), and whose
  output gradient is all-gathered in backward.
* Resharding: ``R -> Q`` is a free slice forward and an all-gather of the
  gradient backward; ``Q -> R`` an all-gather forward, done once per tensor
  however many nodes read it whole (the interpreter keeps the gathered
  tensor for the step's forward), and in backward a free slice, or, where
  a column linear reads it, a reduce-scatter of the partial input gradient
  that replaces the column's all-reduce (Megatron's g-bar). ``Q <-> S``
  costs an all-gather each way. All-gather plus reduce-scatter of one
  tensor costs what its all-reduce does on a ring, so the collectives of
  an attention or MLP sublayer are priced as without SP.
* Memory: a saved ``Q`` tensor counts 1/tp, except where a node that reads
  it whole saves it (a column linear saves the gathered input, as DTensor
  runs it; Megatron saves the shard and gathers it again in backward, which
  this runtime does not do). The LN/RMSNorm inputs and statistics, dropout
  masks and elementwise intermediates of the ``Q`` regions are divided. A
  recomputed block keeps a ``Q`` input made in its stage as its 1/tp shard
  too ([Note: a recomputed block's inputs] in recompute.py, measured).
* Block boundaries carry whole tensors, as for ``S``: a ``Q`` tensor leaving
  a block is priced as gathered, and a block's input as sliced. Inside one
  pipeline stage the runtime passes the split tensor on, so the plan
  over-prices SP by one all-gather forward and one backward per block
  boundary (conservative: the runtime does less than priced); the choice
  keeps every block solvable alone and stage cuts whole.

[Note: tensor-parallel parameters]
``column`` splits a linear's output features and ``row`` its input features;
``vocab`` splits an embedding's rows. Where those features live depends on
the op (``LINEAR_FORMS``): ``aten.linear`` stores its weight (out, in),
GPT-2's ``Conv1D`` (``aten.addmm(bias, x, W)``) and ``aten.mm``/``matmul``
store it (in, out). A bias is split with the output of a column linear and
whole for a row linear (it is added after the all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import torch

from cost_models import op_class

from .dtensor_ops import as_dtensors, contiguous_grads, is_sharded, mutated_in_place, tree_full

if TYPE_CHECKING:
    import torch.fx as fx

    from .capture import CapturedModel, NodeInfo

__all__ = [
    "Layout",
    "LinearForm",
    "LINEAR_FORMS",
    "TPContext",
    "TPStrategy",
    "STRATEGIES",
    "STRATEGY_NAMES",
    "OUTPUT_LAYOUT",
    "INPUT_LAYOUT",
    "op_base",
    "linear_form",
    "is_linear_like",
    "is_embedding",
    "is_attention",
    "allowed_strategies",
    "NodeKind",
    "node_kind",
    "splits_param",
    "ParamSplit",
    "LAYOUTS",
    "sequence_shape",
    "token_dim",
]

Layout = Literal["R", "S", "Q"]
LAYOUTS: tuple[Layout, ...] = ("R", "S", "Q")


# --------------------------------------------------------------------------------------
# Which ops are what
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinearForm:
    """How one op holds a linear: the positions of its activation, 2-D weight and bias, and which
    dim of the weight holds the output features."""

    activation: int
    weight: int
    out_dim: int
    bias: int | None


LINEAR_FORMS: Mapping[str, LinearForm] = {
    "linear": LinearForm(activation=0, weight=1, out_dim=0, bias=2),  # (x, W[out, in], b[out]?)
    "addmm": LinearForm(activation=1, weight=2, out_dim=1, bias=0),  # (b[out], x, W[in, out]): GPT-2's Conv1D
    "mm": LinearForm(activation=0, weight=1, out_dim=1, bias=None),  # (x, W[in, out])
    "matmul": LinearForm(activation=0, weight=1, out_dim=1, bias=None),
}
# Captured targets name ATen ops ("aten.linear.default"); a few non-ATen captures name the function.
_PLAIN_LINEARS = ("linear", "addmm")


def op_base(target: str) -> str:
    """``aten.addmm.default`` -> ``addmm``; a non-ATen target is its own base."""
    return target.removeprefix("aten.").split(".")[0]


def linear_form(target: str) -> LinearForm | None:
    """The linear form of a captured target, if it is one of ``LINEAR_FORMS``."""
    base = op_base(target)
    if not target.startswith("aten.") and base not in _PLAIN_LINEARS:
        return None
    return LINEAR_FORMS.get(base)


def is_linear_like(node: "NodeInfo", captured: "CapturedModel") -> bool:
    """A matmul against a 2-D weight parameter (nn.Linear, F.linear, GPT-2's Conv1D)."""
    if linear_form(node.target) is None:
        return False
    return any(len(captured.params[p].shape) == 2 for p in node.params if p in captured.params)


def is_embedding(node: "NodeInfo") -> bool:
    return "embedding" in node.target and bool(node.params)


def is_attention(target: str) -> bool:
    """Attention kernels, as the cost models classify them (``cost_models.op_class``)."""
    return op_class(target) == "attention"


def _is_sdpa(target: Any) -> bool:
    return "scaled_dot_product" in str(target)


# Ops that need the whole hidden vector, so they cannot run on a split last dim.
# (Softmax is not here: inside attention it runs over keys, which a head split keeps whole.)
_NEEDS_FULL = ("layer_norm", "native_layer_norm", "rms_norm", "mean", "log_softmax", "cross_entropy", "nll_loss")


def _linear_weight(node: "NodeInfo", captured: "CapturedModel") -> Any:
    return next(captured.params[p] for p in node.params if p in captured.params and len(captured.params[p].shape) == 2)


def sequence_shape(captured: "CapturedModel") -> tuple[int, int] | None:
    """The model's (batch, seq) from its tensor inputs of two or more dims, or None where there is
    none, where they disagree, or where batch == seq > 1 leaves the two dims ambiguous
    ([Note: sequence parallelism])."""
    pairs = {tuple(s[:2]) for s in captured.input_shapes if len(s) >= 2 and s[0] == captured.batch_size}
    if len(pairs) != 1:
        return None
    batch, seq = next(iter(pairs))
    return None if batch == seq and batch > 1 else (int(batch), int(seq))


def token_dim(shape: tuple[int, ...], tokens: tuple[int, int] | None) -> int | None:
    """The dim of ``shape`` that ``Q`` splits: 1 for (batch, seq, x), 0 for (batch * seq, x); None
    for any other shape or where the model's (batch, seq) is unknown ([Note: sequence parallelism])."""
    if tokens is None:
        return None
    batch, seq = tokens
    if len(shape) == 3 and tuple(shape[:2]) == (batch, seq):
        return 1
    if len(shape) == 2 and shape[0] == batch * seq and (batch > 1 or shape[1] != seq):
        return 0
    return None


# Ops that mix tokens even on token-shaped tensors, or reduce over them: never sequence-split.
_MIXES_TOKENS = ("cumsum", "cumprod", "flip", "roll", "sort", "cross_entropy", "nll_loss", "scaled_dot_product",
                 "embedding", "bmm", "baddbmm", "matmul", "einsum", "conv", "pad", "cat", "stack")


# --------------------------------------------------------------------------------------
# Running a strategy on DTensor
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TPContext:
    """What a strategy's ``realize`` needs from the interpreter running a stage graph."""

    mesh: Any  # the 1-D tp DeviceMesh
    run: Callable[["fx.Node", Any, Any], Any]  # runs the node's own op on the given args

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()


def _realize_whole(ctx: TPContext, n: "fx.Node", args: Any, kwargs: Any) -> Any:
    """Whole tensors in, whole out: a DTensor input is gathered (``S -> R``)."""
    return ctx.run(n, tree_full(args), tree_full(kwargs))


def _realize_dtensor(ctx: TPContext, n: "fx.Node", args: Any, kwargs: Any) -> Any:
    """DTensors in (a whole input wrapped as replicated); DTensor's sharding propagation does the rest."""
    out = ctx.run(n, as_dtensors(args, ctx.mesh), as_dtensors(kwargs, ctx.mesh))
    return contiguous_grads(out, copy=mutated_in_place(n))


def _realize_row(ctx: TPContext, n: "fx.Node", args: Any, kwargs: Any) -> Any:
    """A row linear reads its activation split on the last dim (``R -> S`` is a free slice); its
    output is a partial sum that the next replicated node all-reduces."""
    from torch.distributed.tensor import DTensor, Shard

    args, kwargs = as_dtensors(args, ctx.mesh), as_dtensors(kwargs, ctx.mesh)
    form = linear_form(str(n.target))
    i = form.activation if form is not None else 0
    x = args[i] if i < len(args) else None
    if isinstance(x, DTensor) and not is_sharded(x):
        x = x.redistribute(x.device_mesh, [Shard(x.dim() - 1)])
        args = (*args[:i], x, *args[i + 1 :])
    return contiguous_grads(ctx.run(n, args, kwargs), copy=mutated_in_place(n))


def _realize_vocab(ctx: TPContext, n: "fx.Node", args: Any, kwargs: Any) -> Any:
    """Vocabulary-parallel lookup: each rank looks up the ids in its rows, zero elsewhere; the
    partial sums are reduced by the first replicated reader (DTensor's ``Partial``). Written out
    because DTensor's own masked partial cannot be reduced outside the op that made it."""
    from torch.distributed.tensor import DTensor, Partial

    weight, ids = args[0], args[1]
    if not isinstance(weight, DTensor):
        return ctx.run(n, tree_full(args), tree_full(kwargs))
    local = weight.to_local()
    rows = local.shape[0]
    start = ctx.rank * rows
    ids = tree_full(ids)
    outside = (ids < start) | (ids >= start + rows)
    pad = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)  # aten.embedding's padding_idx
    local_pad = pad - start if isinstance(pad, int) and start <= pad < start + rows else None
    out = torch.nn.functional.embedding((ids - start).masked_fill(outside, 0), local, padding_idx=local_pad)
    out = out * (~outside).unsqueeze(-1).to(out.dtype)
    return DTensor.from_local(out, ctx.mesh, [Partial()], run_check=False)


def _realize_sharded(ctx: TPContext, n: "fx.Node", args: Any, kwargs: Any) -> Any:
    """Weightless ops on split data run on DTensor, except scaled-dot-product attention, which runs
    head-parallel on the local shards: q, k, v split on dim 1 (heads; with grouped-query attention k
    and v have fewer heads, split alike), the mask whole. Heads are independent, and DTensor has no
    rule for every CPU attention kernel's backward, so it is not asked for one."""
    if not _is_sdpa(n.target):
        return _realize_dtensor(ctx, n, args, kwargs)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, shard = ctx.mesh, Shard(1)

    def heads(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        if x.placements[0] != shard:
            x = x.redistribute(mesh, [shard])
        return x.to_local()

    q, k, v, *rest = args
    out = ctx.run(n, (heads(q), heads(k), heads(v), *tree_full(rest)), tree_full(kwargs))
    return DTensor.from_local(out, mesh, [shard], run_check=False)


def _out_shape(n: "fx.Node") -> tuple[int, ...] | None:
    val = n.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0] if val else None
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _realize_seq(ctx: TPContext, n: "fx.Node", args: Any, kwargs: Any) -> Any:
    """A node on tokens split over tp ([Note: sequence parallelism]): every input of the output's
    rank and token count is a ``Shard(d)`` DTensor (a whole one is sliced, one split otherwise is
    redistributed), with ``d`` the dim an input already splits, else the output's token dim; other
    inputs (a norm's weight, broadcast statistics) are replicated. DTensor's propagation does the
    rest; a parameter's gradient comes back partial and is all-reduced by ``from_local``'s backward."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.utils._pytree import tree_flatten, tree_map

    shape = _out_shape(n)
    if shape is None or len(shape) < 2:
        return _realize_dtensor(ctx, n, args, kwargs)
    target = None
    for x in tree_flatten((args, kwargs))[0]:
        if isinstance(x, DTensor) and x.dim() == len(shape) and tuple(x.shape) == shape:
            p = x.placements[0]
            if p.is_shard() and p.dim < x.dim() - 1:
                target = Shard(p.dim)
                break
    if target is None:
        target = Shard(1 if len(shape) == 3 else 0)
    mesh = ctx.mesh

    def place(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        d = x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        token_shaped = x.dim() == len(shape) and x.shape[target.dim] == shape[target.dim]
        want = target if token_shaped else Replicate()
        return d if d.placements[0] == want else d.redistribute(mesh, [want])

    out = ctx.run(n, tree_map(place, args), tree_map(place, kwargs))
    return contiguous_grads(out, copy=mutated_in_place(n))


def _realize_row_seq(ctx: TPContext, n: "fx.Node", args: Any, kwargs: Any) -> Any:
    """A row linear whose partial sums are reduce-scattered to its output's token dim
    (``Partial -> Shard(d)``); the backward all-gathers the output's gradient."""
    from torch.distributed.tensor import DTensor, Shard

    out = _realize_row(ctx, n, args, kwargs)
    shape = _out_shape(n)
    if not isinstance(out, DTensor) or shape is None or len(shape) not in (2, 3):
        return out
    return contiguous_grads(out.redistribute(ctx.mesh, [Shard(1 if len(shape) == 3 else 0)]))


# --------------------------------------------------------------------------------------
# Cutting an op's inputs to one rank's shard (what the profiler times)
# --------------------------------------------------------------------------------------


def _cut(t: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    return t.narrow(dim, 0, t.shape[dim] // tp).detach().contiguous().requires_grad_(t.requires_grad)


def _local_linear(column: bool) -> Callable[[str, list, dict, int], None]:
    def cut(target: str, args: list, kwargs: dict, tp: int) -> None:
        form = linear_form(target)
        assert form is not None, target
        for i, dim in _linear_param_dims(form, column).items():
            if i < len(args) and args[i] is not None:
                args[i] = _cut(args[i], dim if args[i].dim() > 1 else 0, tp)
        if not column:
            args[form.activation] = _cut(args[form.activation], -1, tp)

    return cut


def _local_vocab(target: str, args: list, kwargs: dict, tp: int) -> None:
    args[0] = _cut(args[0], 0, tp)  # (W[V, d], indices): this rank's rows, indices into them
    args[1] = args[1] % args[0].shape[0]


def _local_heads(target: str, args: list, kwargs: dict, tp: int) -> None:
    for i in range(3):  # (q, k, v, mask?): a head split
        args[i] = _cut(args[i], 1, tp)
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] > 1:
        mask = _cut(mask, 1, tp)
        if len(args) > 3:
            args[3] = mask
        else:
            kwargs["attn_mask"] = mask


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def _linear_param_dims(form: LinearForm, column: bool) -> dict[int, int]:
    if column:
        dims = {form.weight: form.out_dim}
        if form.bias is not None:
            dims[form.bias] = 0
        return dims
    return {form.weight: 1 - form.out_dim}


NodeKind = Literal["linear", "embedding", "weightless", "whole"]
ALL_KINDS: frozenset[NodeKind] = frozenset(("linear", "embedding", "weightless", "whole"))


def node_kind(node: "NodeInfo", captured: "CapturedModel") -> NodeKind:
    """What a node is, for tensor parallelism: a linear, an embedding, a weightless op on data that
    may be split, or an op that needs its inputs whole (norms, losses, ops with their own unsplit
    weights, tensor factories)."""
    if is_linear_like(node, captured):
        return "linear"
    if is_embedding(node):
        return "embedding"
    if node.params or any(k in node.target for k in _NEEDS_FULL) or not node.inputs:
        return "whole"
    return "weightless"


def _fits_always(node: "NodeInfo", captured: "CapturedModel", tp: int) -> bool:
    return True


def _fits_linear(node: "NodeInfo", captured: "CapturedModel", tp: int) -> bool:
    # nn.Linear stores (out, in); GPT-2's Conv1D (addmm) stores (in, out). Either way both dims must split.
    return all(d % tp == 0 for d in _linear_weight(node, captured).shape)


def _fits_vocab(node: "NodeInfo", captured: "CapturedModel", tp: int) -> bool:
    weight = next(captured.params[p] for p in node.params if p in captured.params)
    return weight.shape[0] % tp == 0


def _fits_heads(node: "NodeInfo", captured: "CapturedModel", tp: int) -> bool:
    if not is_attention(node.target):
        return True
    # Head-parallel attention: q, k and v (with GQA fewer k/v heads) split by heads; a mask
    # broadcast over heads (dim 1 of size 1) is read whole.
    heads = [
        t.shape[1] for i in node.inputs for t in captured.nodes[i].outputs[:1] if len(t.shape) == 4 and t.shape[1] > 1
    ]
    return bool(heads) and all(h % tp == 0 for h in heads)


def _fits_seq(node: "NodeInfo", captured: "CapturedModel", tp: int) -> bool:
    """Token-shaped output and data inputs, an op that keeps tokens apart, seq divisible by tp
    ([Note: sequence parallelism])."""
    tokens = sequence_shape(captured)
    if tokens is None or tokens[1] % tp or not node.outputs:
        return False
    if any(k in node.target for k in _MIXES_TOKENS) or is_attention(node.target):
        return False
    out = node.outputs[0].shape
    d = token_dim(out, tokens)
    if d is None or not node.inputs:
        return False
    for i in node.inputs:
        shapes = [t.shape for t in captured.nodes[i].outputs[:1]]
        if not shapes or token_dim(shapes[0], tokens) is None:
            return False
    return True


def _fits_row_seq(node: "NodeInfo", captured: "CapturedModel", tp: int) -> bool:
    tokens = sequence_shape(captured)
    return (_fits_linear(node, captured, tp) and tokens is not None and not tokens[1] % tp
            and bool(node.outputs) and token_dim(node.outputs[0].shape, tokens) is not None)


ParamSplit = Literal["none", "all", "matrices"]


@dataclass(frozen=True)
class TPStrategy:
    """One way the tp axis splits a node; see [Note: layouts and resharding]."""

    name: str
    needs: Layout  # layout of the data inputs it reads
    produces: Layout  # layout of its output
    output_all_reduce: bool  # forward all-reduce of its output (partial sums)
    input_grad_all_reduce: bool  # backward all-reduce of each input's gradient (column)
    applies_to: frozenset[NodeKind]  # the kinds of node it can split (``node_kind``)
    fits: Callable[["NodeInfo", "CapturedModel", int], bool]  # whether tp divides what it splits
    realize: Callable[[TPContext, "fx.Node", Any, Any], Any]
    # Which of the node's parameters are divided over tp: all, only matrices (a row linear's bias
    # stays whole), or none; and for a captured target, arg position -> the dim split.
    param_split: ParamSplit = "none"
    param_dims: Callable[[str], Mapping[int, int]] = field(default=lambda target: {})
    local_args: Callable[[str, list, dict, int], None] | None = None  # cut inputs to one shard, in place
    measured: Callable[[str], bool] = field(default=lambda target: False)  # the profiler times its shard
    doc: str = ""
    # [Note: sequence parallelism]: a forward reduce-scatter of the output to the tokens (with a
    # backward all-gather of its gradient), and a backward all-reduce of whole parameters' gradients.
    output_reduce_scatter: bool = False
    param_grad_all_reduce: bool = False

    @property
    def divides_work(self) -> bool:
        return self.name != "replicate"

    def splits_param(self, shape: tuple[int, ...]) -> bool:
        """Whether a parameter of ``shape`` read by a node under this strategy is divided over tp."""
        return self.param_split == "all" or (self.param_split == "matrices" and len(shape) >= 2)


def _column_dims(target: str) -> Mapping[int, int]:
    form = linear_form(target)
    return _linear_param_dims(form, column=True) if form else {}


def _row_dims(target: str) -> Mapping[int, int]:
    form = linear_form(target)
    return _linear_param_dims(form, column=False) if form else {}


def _measured_linear(target: str) -> bool:
    return op_base(target) in ("linear", "addmm")


STRATEGIES: Mapping[str, TPStrategy] = {
    s.name: s
    for s in (
        TPStrategy("replicate", "R", "R", False, False, ALL_KINDS, _fits_always, _realize_whole,
                   doc="every tensor-parallel rank computes the node whole"),
        TPStrategy("column", "R", "S", False, True, frozenset({"linear"}), _fits_linear, _realize_dtensor, "all", _column_dims,
                   _local_linear(column=True), _measured_linear,
                   doc="a linear whose weight is split by output features; its output is split on the last dim"),
        TPStrategy("row", "S", "R", True, False, frozenset({"linear"}), _fits_linear, _realize_row, "matrices", _row_dims,
                   _local_linear(column=False), _measured_linear,
                   doc="a linear whose weight is split by input features; it reads a split input and its "
                       "partial sums are all-reduced"),
        TPStrategy("vocab", "R", "R", True, False, frozenset({"embedding"}), _fits_vocab, _realize_vocab, "all", lambda target: {0: 0},
                   _local_vocab, lambda target: op_base(target) == "embedding",
                   doc="an embedding split by vocabulary; partial lookups are all-reduced"),
        TPStrategy("sharded", "S", "S", False, False, frozenset({"weightless"}), _fits_heads, _realize_sharded,
                   local_args=_local_heads, measured=_is_sdpa,
                   doc="a weightless op on split data, e.g. attention over a subset of heads"),
        TPStrategy("seq", "Q", "Q", False, False, frozenset({"weightless", "whole"}), _fits_seq, _realize_seq,
                   doc="an op on tokens split along the sequence (norm, dropout, residual add); its parameters' "
                       "gradients are all-reduced", param_grad_all_reduce=True),
        TPStrategy("row_seq", "S", "Q", False, False, frozenset({"linear"}), _fits_row_seq, _realize_row_seq,
                   "matrices", _row_dims, _local_linear(column=False), _measured_linear,
                   doc="a row linear whose partial sums are reduce-scattered along the sequence "
                       "(sequence parallelism)", output_reduce_scatter=True),
    )
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
OUTPUT_LAYOUT: Mapping[str, Layout] = {s.name: s.produces for s in STRATEGIES.values()}
INPUT_LAYOUT: Mapping[str, Layout] = {s.name: s.needs for s in STRATEGIES.values()}


def allowed_strategies(node: "NodeInfo", captured: "CapturedModel", tp: int) -> tuple[str, ...]:
    """The strategies the runtime can realize for ``node`` at this tp degree, in table order."""
    if tp == 1:
        return ("replicate",)
    kind = node_kind(node, captured)
    return tuple(s.name for s in STRATEGIES.values() if kind in s.applies_to and s.fits(node, captured, tp))


def splits_param(strategy: str, shape: tuple[int, ...]) -> bool:
    """Whether a parameter of ``shape`` read by a node under ``strategy`` is divided over tp: every
    parameter of a column or vocab node, only the weight (not the 1-D bias) of a row node."""
    return STRATEGIES[strategy].splits_param(shape)
