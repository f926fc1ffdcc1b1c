"""Per-node tensor-parallel strategies and the layouts they produce.

A plan says, per FX node, how the ``tp`` axis splits it: ``replicate`` (every
tensor-parallel rank computes it whole), ``column`` (a linear whose weight is
split by output features; its output is split on the last dim), ``row`` (a
linear whose weight is split by input features; it reads a split input and
its partial sums are all-reduced), ``vocab`` (an embedding split by
vocabulary; partial lookups are all-reduced) and ``sharded`` (a weightless op
that works on split data, e.g. attention over a subset of heads).

``megatron_sharding`` derives Megatron-LM's layout from data flow rather than
from layer names (see [Note: Megatron layout from data flow]); the ILP
(``partitioner.solver``) chooses strategies from costs instead. Both are
priced by ``BlockLayoutCosts``, the one place that says what a strategy costs
(see [Note: layouts and resharding]).

[Note: layouts and resharding]
Every tensor has a layout over the tp axis: ``R`` (whole on every rank) or
``S`` (split; for activations, along features or heads). A node's strategy
fixes its output layout and the layout it needs for its data inputs:

    strategy    needs   produces   its own collectives (one micro-batch)
    replicate   R       R          -
    column      R       S          backward all-reduce of the input gradient (Megatron's f),
                                   once per input tensor however many column nodes read it
    row         S       R          forward all-reduce of the output (Megatron's g)
    vocab       R       R          forward all-reduce of the output
    sharded     S       S          -

An edge whose producer layout differs from what the consumer needs pays a
resharding: ``R -> S`` is a free slice in forward and an all-gather of the
gradient in backward (when the tensor is floating point); ``S -> R`` is an
all-gather in forward and a free slice of the gradient in backward. Tensors
entering a block from outside are ``R``; tensors leaving it must be ``R``
(block boundaries carry whole tensors), except the model's outputs, which a
vocabulary-parallel loss reads split. Work (FLOPs and bytes) of any strategy
but ``replicate`` is divided by tp, and so are the parameters of column, row
and vocab nodes and the saved activations of ``S`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from cost_models import CostModel, NodeRef, OpTime

from .capture import CapturedModel, NodeInfo
from .errors import PlanError

if TYPE_CHECKING:
    from .graph import Block

__all__ = [
    "megatron_sharding",
    "is_linear_like",
    "is_embedding",
    "sharded_params",
    "splits_param",
    "BlockLayoutCosts",
    "NodeOption",
    "OUTPUT_LAYOUT",
    "INPUT_LAYOUT",
]

_LINEAR = ("aten.linear", "aten.addmm", "aten.mm", "aten.matmul", "linear", "addmm")
# Ops that need the whole hidden vector, so they cannot run on a split last dim.
# (Softmax is not here: inside attention it runs over keys, which a head split keeps whole.)
_NEEDS_FULL = ("layer_norm", "native_layer_norm", "rms_norm", "mean", "log_softmax", "cross_entropy", "nll_loss")

OUTPUT_LAYOUT = {"replicate": "R", "column": "S", "row": "R", "vocab": "R", "sharded": "S"}
INPUT_LAYOUT = {"replicate": "R", "column": "R", "row": "S", "vocab": "R", "sharded": "S"}


def is_linear_like(node: NodeInfo, captured: CapturedModel) -> bool:
    """A matmul against a 2-D weight parameter (nn.Linear, F.linear, GPT-2's Conv1D)."""
    base = node.target.split(".")
    name = ".".join(base[:2]) if node.target.startswith("aten.") else node.target
    if name not in _LINEAR and node.target not in _LINEAR:
        return False
    return any(len(captured.params[p].shape) == 2 for p in node.params if p in captured.params)


def is_embedding(node: NodeInfo) -> bool:
    return "embedding" in node.target and bool(node.params)


def megatron_sharding(captured: CapturedModel, tp: int) -> dict[str, str]:
    """Megatron-LM's tensor-parallel layout, for every node that is not replicated.

    [Note: Megatron layout from data flow]
    Walk the graph in order, tracking which tensors are split on their last
    dim. A linear reading a whole tensor becomes ``column`` (its output is
    split); a linear reading a split tensor becomes ``row`` (its output is
    whole again after the all-reduce). Weightless ops on split inputs are
    ``sharded`` and keep the split, except ops that need the whole hidden
    vector (norms, losses), which are left replicated
    and would see a whole tensor. Embeddings with a weight are ``vocab``.
    This yields column-then-row for attention (QKV, then the output
    projection) and for the MLP (up/gate, then down) in GPT-2, Llama and BERT,
    and a column-parallel LM head. It never reads layer names. A strategy that
    ``tp`` cannot realize (heads or features not divisible) falls back to
    ``replicate``, gathering its input.
    """
    split: set[str] = set()
    out: dict[str, str] = {}
    for node in captured.nodes.values():
        if node.op not in ("call_function", "call_method", "call_module") or not node.outputs:
            continue
        allowed = allowed_strategies(node, captured, tp)
        reads_split = any(i in split for i in node.inputs)
        if is_linear_like(node, captured):
            want = "row" if reads_split else "column"
        elif is_embedding(node):
            want = "vocab"
        else:
            want = "sharded" if reads_split else "replicate"
        if want not in allowed:
            continue
        if want != "replicate":
            out[node.name] = want
        if OUTPUT_LAYOUT[want] == "S":
            split.add(node.name)
    return out


def sharded_params(captured: CapturedModel, sharding: Mapping[str, str]) -> set[str]:
    """Parameters divided over the tp axis: those read by a column or vocab node, and a row node's weight.

    A row linear's bias stays whole on every tp rank (it is added once, after the all-reduce), as
    the runtime holds it (``param_placements`` in rewrite.py); a meta build of each rank checks that the
    two agree to the byte (partitioner/meta_build.py)."""
    return {
        p
        for name, strat in sharding.items()
        for p in captured.nodes[name].params
        if p in captured.params and splits_param(strat, captured.params[p].shape)
    }


def splits_param(strategy: str, shape: tuple[int, ...]) -> bool:
    """Whether a parameter of ``shape`` read by a node under ``strategy`` is divided over tp: every
    parameter of a column or vocab node, only the weight (not the 1-D bias) of a row node."""
    return strategy in ("column", "vocab") or (strategy == "row" and len(shape) >= 2)


@dataclass(frozen=True, slots=True)
class NodeOption:
    """One node under one strategy, for one micro-batch on one device."""

    compute: OpTime  # the node's own work
    comm: OpTime  # its own collectives (row/vocab forward all-reduce)
    saved_other: float  # bytes of intermediates autograd keeps (not inputs/outputs)
    param_bytes: float  # weight bytes of its parameters held per device (divided by tp when split)


class BlockLayoutCosts:
    """Cost tables of one block under ``tp``-way sharding; see [Note: layouts and resharding].

    ``evaluate(strategies)`` prices an assignment; ``partitioner.solver``
    builds its ILP from the same tables (``options``, ``edge_cost``,
    ``column_input_cost``, ``saved_tensors``), so the two always agree.
    """

    def __init__(
        self,
        captured: CapturedModel,
        block: "Block",
        tp: int,
        micro_batch: int,
        cost_model: CostModel,
        dtype: str,
        read_outside: frozenset[str],
        model_outputs: frozenset[str],
    ) -> None:
        self.captured = captured
        self.block = block
        self.tp = tp
        self.scale = micro_batch / captured.batch_size
        self.cost_model = cost_model
        self.group = tuple(range(tp))  # a tensor-parallel group is tp consecutive ranks
        self.nodes: tuple[str, ...] = tuple(
            n for n in block.nodes if captured.nodes[n].outputs or captured.nodes[n].inputs
        )
        inside = set(self.nodes)
        self.options: dict[str, dict[str, NodeOption]] = {
            n: self._options(captured.nodes[n], dtype) for n in self.nodes
        }
        # Data edges (producer, consumer) inside the block, and boundary inputs.
        self.edges: list[tuple[str, str]] = []
        self.boundary_inputs: list[tuple[str, str]] = []  # (outside producer, consumer)
        for n in self.nodes:
            for i in captured.nodes[n].inputs:
                (self.edges if i in inside else self.boundary_inputs).append((i, n))
        # Tensors that leave the block must be whole, except the model's own outputs.
        self.leaving = [n for n in self.nodes if n in read_outside and n not in model_outputs]
        saved: set[str] = set()
        for n in self.nodes:
            info = captured.nodes[n]
            saved.update(info.saved_inputs)
            if info.saves_output:
                saved.add(n)
        self.saved_tensors = sorted(saved)

    # --- tables -----------------------------------------------------------------------

    def tensor_bytes(self, name: str) -> float:
        return self.captured.nodes[name].output_bytes * self.scale

    def is_float(self, name: str) -> bool:
        outs = self.captured.nodes[name].outputs
        return bool(outs) and any(t.dtype.startswith(("float", "bfloat")) for t in outs)

    def edge_cost(self, producer: str, produced: str, needed: str) -> OpTime:
        """Resharding of ``producer``'s output from layout ``produced`` to ``needed``."""
        if produced == needed or self.tp == 1:
            return OpTime(0.0, 0.0)
        size = self.tensor_bytes(producer)
        gather = self.cost_model.collective_time("all_gather", size, self.group)
        if produced == "R":  # slice forward, gather the gradient backward
            return OpTime(0.0, gather if self.is_float(producer) else 0.0)
        return OpTime(gather, 0.0)

    def column_input_cost(self, tensor: str) -> OpTime:
        """Backward all-reduce of the gradient of a tensor read by column-parallel nodes."""
        return OpTime(0.0, self.cost_model.collective_time("all_reduce", self.tensor_bytes(tensor), self.group))

    def _options(self, node: NodeInfo, dtype: str) -> dict[str, NodeOption]:
        cap, k, tp = self.captured, self.scale, self.tp
        allowed = allowed_strategies(node, cap, tp)
        out: dict[str, NodeOption] = {}
        for strat in allowed:
            div = tp if strat != "replicate" else 1
            if not node.outputs:
                compute = OpTime(0.0, 0.0)  # assertions
            elif node.is_view:
                # An alias launches no kernel and moves no data: zero FLOPs and bytes. A measured
                # or calibrated model still charges its dispatcher call.
                compute = self.cost_model.node_time(node.op_label, 0, 0, 0, dtype, NodeRef(node.name, strat, tp if div > 1 else 1))
            else:
                pbytes = sum(cap.params[p].bytes for p in node.params if p in cap.params)
                moved = (node.bytes_read - pbytes + node.bytes_written) * k + pbytes
                compute = self.cost_model.node_time(
                    node.op_label, node.forward_flops * k / div, node.backward_flops * k / div, moved / div, dtype,
                    NodeRef(node.name, strat, tp if div > 1 else 1), pbytes / div,
                )
            if not node.needs_grad:  # nothing trainable flows into it (masks, positions): no backward
                compute = OpTime(compute.forward_s, 0.0)
            comm = OpTime(0.0, 0.0)
            if strat in ("row", "vocab"):
                comm = OpTime(self.cost_model.collective_time("all_reduce", node.output_bytes * k, self.group), 0.0)
            held = sum(cap.params[p].bytes / (tp if splits_param(strat, cap.params[p].shape) else 1)
                       for p in node.params if p in cap.params)
            out[strat] = NodeOption(compute, comm, node.saved_bytes * k / div, held)
        return out

    # --- pricing an assignment --------------------------------------------------------

    def evaluate(self, strategies: Mapping[str, str]) -> tuple[OpTime, OpTime, float]:
        """(compute, tp communication, saved activation bytes) of this block under ``strategies``.

        Nodes absent from ``strategies`` replicate; a strategy not allowed for
        a node (``column`` on a norm, heads not divisible by tp) is a PlanError.
        """
        strat = {n: strategies.get(n, "replicate") if self.tp > 1 else "replicate" for n in self.nodes}
        compute = OpTime(0.0, 0.0)
        comm = OpTime(0.0, 0.0)
        saved_other = 0.0
        for n in self.nodes:
            opts = self.options[n]
            if strat[n] not in opts:
                raise PlanError(
                    f"sharding: node {n} ({self.captured.nodes[n].target}) cannot be {strat[n]!r} at tp={self.tp}; "
                    f"allowed: {', '.join(opts)}"
                )
            o = opts[strat[n]]
            compute = compute + o.compute
            comm = comm + o.comm
            saved_other += o.saved_other
        layout = {n: OUTPUT_LAYOUT[s] for n, s in strat.items()}
        for u, v in self.edges:
            comm = comm + self.edge_cost(u, layout[u], INPUT_LAYOUT[strat[v]])
        for u, v in self.boundary_inputs:
            comm = comm + self.edge_cost(u, "R", INPUT_LAYOUT[strat[v]])
        for u in self.leaving:
            comm = comm + self.edge_cost(u, layout[u], "R")
        column_inputs = {u for u, v in [*self.edges, *self.boundary_inputs] if strat[v] == "column"}
        for u in sorted(column_inputs):
            comm = comm + self.column_input_cost(u)
        saved = saved_other + sum(
            self.tensor_bytes(t) / (self.tp if layout.get(t) == "S" else 1) for t in self.saved_tensors
        )
        return compute, comm, saved


def allowed_strategies(node: NodeInfo, captured: CapturedModel, tp: int) -> tuple[str, ...]:
    """The strategies the runtime can realize for ``node`` at this tp degree."""
    if tp == 1:
        return ("replicate",)
    if is_linear_like(node, captured):
        weight = next(captured.params[p] for p in node.params if p in captured.params and len(captured.params[p].shape) == 2)
        out = ["replicate"]
        # nn.Linear stores (out, in); GPT-2's Conv1D (addmm) stores (in, out). Either way both dims must split.
        if all(d % tp == 0 for d in weight.shape):
            out += ["column", "row"]
        return tuple(out)
    if is_embedding(node):
        weight = next(captured.params[p] for p in node.params if p in captured.params)
        return ("replicate", "vocab") if weight.shape[0] % tp == 0 else ("replicate",)
    if node.params or any(k in node.target for k in _NEEDS_FULL) or not node.inputs:
        return ("replicate",)  # norms, ops with their own (unsplit) weights, and tensor factories
    if "scaled_dot_product" in node.target or "attention" in node.target:
        # Head-parallel attention: q, k and v (with GQA fewer k/v heads) split by heads; a mask
        # broadcast over heads (dim 1 of size 1) is read whole.
        heads = [
            t.shape[1] for i in node.inputs for t in captured.nodes[i].outputs[:1] if len(t.shape) == 4 and t.shape[1] > 1
        ]
        return ("replicate", "sharded") if heads and all(h % tp == 0 for h in heads) else ("replicate",)
    return ("replicate", "sharded")
