"""Capture a PyTorch model as an FX graph and annotate every node with its costs.

This is the first phase of autopart (capture -> annotate -> blocks -> solve ->
Plan -> rewrite -> run). ``capture()`` traces the model with ``torch.export``
(non-strict) and falls back to ``torch.fx.symbolic_trace`` for models export
cannot take. It then annotates each graph node with what the planner needs:
output shapes/dtypes/bytes, the parameters it reads, forward and backward
FLOPs (counted by ``torch.utils.flop_counter`` on meta tensors), bytes read and
written, the tensors autograd saves for backward, and the owning module.

Everything runs on the ``meta`` device: a model built under
``torch.device("meta")`` is captured without allocating its weights, so a
175B-parameter model is planned on a laptop.

Glossary (shared by the whole package):
  node        an FX graph node
  block       a group of nodes aligned to a module (a transformer layer)
  stage       a pipeline stage; rank: a process; device: a GPU or CPU
  micro-batch one slice of the global batch

[Note: costs are per capture batch]
All per-node figures (FLOPs, bytes, saved activations) are for the batch of
the example inputs (``CapturedModel.batch_size`` samples). The cost model
scales them linearly to a micro-batch; that is exact for every op in a
transformer except ops whose cost does not depend on the batch (e.g. building
a causal mask), which are small.

[Note: stable node keys]
FX node names come from per-op counters over the whole graph (``addmm_7``), so
an op that exists only at some batch sizes, or a torch version that traces a
little differently, renames every later node. Plans therefore name nodes by a
*key* recorded at capture: the FQN of the innermost module that owns the node,
its op, and its occurrence among the nodes of that module with that op, in
graph order: ``transformer.h.1.mlp.c_fc/aten.addmm.default#0`` (the root
module's FQN is empty: ``/aten.view.default#0``). A key changes only where the
module itself runs different ops. The same model gives the same keys at any
sequence length and at any batch size above 1. At batch 1 torch leaves out
ops that broadcast a size-1 dimension to the batch (an ``expand`` of a mask),
so a batch-1 graph lacks those nodes, and the nodes of the same op after them
in that module count one lower; the rewriter runs a node the plan does not
name with its latest producer (see [Note: matching the plan's nodes] in
rewrite.py). ``node_keys`` computes the keys; capture and the rewriter both
call it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from .errors import CaptureError, one_line
from .vocab_split import vocab_loss

__all__ = ["TensorMeta", "NodeInfo", "ParamInfo", "CapturedModel", "capture", "node_keys", "loss_kind"]


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape and dtype of one tensor a node produces."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    bytes: int  # numel * element size


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The annotations of one FX node (a side table keyed by node name)."""

    name: str  # FX node name, unique in the graph
    op: str  # FX opcode: placeholder, call_function, call_module, call_method, get_attr, output
    target: str  # printable target, e.g. "aten.addmm.default"
    inputs: tuple[str, ...]  # names of the data nodes this node reads (parameters excluded)
    outputs: tuple[TensorMeta, ...]  # tensors produced (empty for non-tensor results)
    params: tuple[str, ...]  # canonical FQNs of parameters and buffers read directly
    forward_flops: int  # FLOPs of the forward op, counted by torch.utils.flop_counter
    backward_flops: int  # FLOPs of its backward, counted the same way
    bytes_read: int  # bytes of every tensor input, parameters included
    bytes_written: int  # bytes of every tensor output
    saved_bytes: int  # bytes of intermediates autograd saves that are neither inputs nor outputs
    saved_inputs: tuple[str, ...]  # data inputs (node names) that autograd saves for backward
    saves_output: bool  # autograd saves this node's own output for backward
    module: str  # FQN of the innermost module that owns this node ("" is the root)
    module_stack: tuple[str, ...]  # FQNs from the outermost to the innermost module
    module_type: str  # class name of the innermost owning module
    is_view: bool = False  # produces an alias of an input (view, transpose, getitem): no kernel, no traffic
    variant: str = ""  # arguments that change the kernel, e.g. "dropout,mask" for attention; see op_label
    needs_grad: bool = True  # a trainable parameter flows into its (float) output, so backward runs it
    key: str = ""  # stable key, ``module/op#occurrence``: what a Plan names it by; see [Note: stable node keys]

    @property
    def op_label(self) -> str:
        """The target plus its kernel variant, e.g. ``aten.scaled_dot_product_attention.default[causal]``.

        What cost models see as the op: attention with dropout runs a different
        (much slower) kernel than without, though its FLOPs are the same.
        """
        return f"{self.target}[{self.variant}]" if self.variant else self.target

    @property
    def output_bytes(self) -> int:
        """Activation size: the bytes of everything this node produces."""
        return sum(t.bytes for t in self.outputs)


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """A parameter or buffer of the model, deduplicated across tied names."""

    name: str  # canonical FQN (the first name under which named_parameters() yields it)
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    numel: int
    aliases: tuple[str, ...]  # other FQNs that name the same tensor (tied weights)
    is_buffer: bool
    trainable: bool  # requires_grad, so it has a gradient and optimizer state


@dataclass(frozen=True)
class CapturedModel:
    """A traced model with every node annotated. Produced by ``capture()``."""

    name: str  # a display name (zoo name or class name)
    model_class: str  # qualified class name of the captured module
    graph_module: fx.GraphModule  # the traced graph (export's module or symbolic_trace's)
    tracer: str  # "export" or "fx"
    nodes: Mapping[str, NodeInfo]  # every graph node, in topological order
    params: Mapping[str, ParamInfo]  # canonical name -> parameter/buffer
    batch_size: int  # samples in the example inputs; see [Note: costs are per capture batch]
    input_shapes: tuple[tuple[int, ...], ...]  # shapes of the tensor inputs
    dtype: str  # dominant floating dtype of the parameters
    fingerprint: str  # identifies the model's architecture: class, parameter names, shapes, dtypes
    warnings: tuple[str, ...] = field(default=())  # things the user may want to know (ops we could not count)
    param_nodes: Mapping[str, str] = field(default_factory=dict)  # placeholder/get_attr node -> canonical param FQN
    vocab_chunks: int = 1  # the head's vocabulary in this many chunks ([Note: vocabulary chunks] in vocab_split.py)

    @cached_property
    def node_of_key(self) -> Mapping[str, str]:
        """Stable key -> FX node name (see [Note: stable node keys])."""
        return {n.key: n.name for n in self.nodes.values()}

    @property
    def param_count(self) -> int:
        return sum(p.numel for p in self.params.values() if not p.is_buffer)

    @property
    def param_bytes(self) -> int:
        return sum(p.bytes for p in self.params.values())

    @property
    def forward_flops(self) -> int:
        return sum(n.forward_flops for n in self.nodes.values())

    @property
    def backward_flops(self) -> int:
        return sum(n.backward_flops for n in self.nodes.values())

    def compute_nodes(self) -> list[NodeInfo]:
        """Nodes that do work (not placeholders, parameters or the output)."""
        return [n for n in self.nodes.values() if n.op in ("call_function", "call_module", "call_method")]


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    batch_size: int | None = None,
    tracer: str = "auto",
    vocab_chunks: int = 1,
) -> CapturedModel:
    """Trace ``model`` and annotate its nodes.

    ``example_inputs``/``example_kwargs`` are what ``model.forward`` takes; they
    may live on the meta device (and should, for large models). ``batch_size``
    is the number of samples in them (default: dim 0 of the first tensor).
    ``tracer`` is "auto" (export, then fx on failure), "export" or "fx". ``vocab_chunks`` > 1 splits the
    output head's vocabulary, and the cross-entropy with it, into that many blocks; the graph then takes
    the targets as its last input and returns the mean loss ([Note: vocabulary chunks] in vocab_split.py).
    """
    if tracer not in ("auto", "export", "fx"):
        raise CaptureError(f"tracer={tracer!r} is not one of 'auto', 'export', 'fx'")
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    disable_hf_cache(model)

    if not isinstance(vocab_chunks, int) or isinstance(vocab_chunks, bool) or vocab_chunks < 1:
        raise CaptureError(f"vocab_chunks must be a whole number of at least 1, got {vocab_chunks!r}")
    if vocab_chunks > 1 and tracer == "fx":
        raise CaptureError(f"vocab_chunks={vocab_chunks} needs a torch.export graph; tracer='fx' cannot give one. "
                           "Leave vocab_chunks at 1")
    # The head and the loss in vocabulary chunks: the model's forward takes the targets too ([Note: vocabulary chunks]).
    with vocab_loss(model, vocab_chunks, args) if vocab_chunks > 1 else contextlib.nullcontext(args) as traced_args:
        gm, used, nodes, annot = _trace_and_annotate(model, traced_args, kwargs, tracer, vocab_chunks)
    params = _param_table(model)
    tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    bsz = batch_size if batch_size is not None else (tensors[0].shape[0] if tensors and tensors[0].dim() else 1)
    dtype = _dominant_dtype(params.values())
    return CapturedModel(
        name=name or type(model).__name__,
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        graph_module=gm,
        tracer=used,
        nodes=nodes,
        params=params,
        batch_size=int(bsz),
        input_shapes=tuple(tuple(t.shape) for t in tensors),
        dtype=dtype,
        fingerprint=model_fingerprint(model, params),
        warnings=tuple(annot.warnings),
        param_nodes=dict(annot.param_nodes),
        vocab_chunks=vocab_chunks,
    )


def _trace_and_annotate(model: torch.nn.Module, args: tuple, kwargs: dict, tracer: str,
                        vocab_chunks: int) -> tuple[fx.GraphModule, str, dict[str, NodeInfo], "_Annotator"]:
    """``capture``'s trace (export, else fx as ``tracer`` allows) and its annotation of every node."""
    grad_mode = torch.is_grad_enabled()  # restored after tracing and after annotation
    errors: list[str] = []
    gm: fx.GraphModule | None = None
    used = ""
    param_of_placeholder: dict[str, str] = {}
    if tracer in ("auto", "export"):
        try:
            gm, param_of_placeholder = _trace_export(model, args, kwargs)
            used = "export"
        except CaptureError:  # ours, from inside the forward (vocab_split.py): already one clear line
            raise
        except Exception as exc:  # export raises many types; we report them all the same way
            errors.append("torch.export: " + _describe_failure(exc))
    if gm is None and tracer in ("auto", "fx") and vocab_chunks == 1:
        try:
            gm = _trace_fx(model, args, kwargs)
            used = "fx"
        except Exception as exc:
            errors.append("torch.fx.symbolic_trace: " + _describe_failure(exc))
    torch.set_grad_enabled(grad_mode)
    if gm is None:
        raise CaptureError(
            f"could not trace {type(model).__name__}: "
            + "; ".join(errors)
            + ". Try: check that example_inputs match forward(); avoid data-dependent Python control flow "
            "(or wrap it in torch.cond); for Hugging Face models pass use_cache=False"
        )

    params = _param_table(model)
    alias_to_canonical = {a: p.name for p in params.values() for a in (p.name, *p.aliases)}
    annot = _Annotator(gm, used, param_of_placeholder, alias_to_canonical, model)
    try:
        nodes = annot.run()
    finally:  # whatever the traced ops did to grad mode, the caller gets theirs back
        torch.set_grad_enabled(grad_mode)
    return gm, used, nodes, annot


def loss_kind(cap: CapturedModel) -> str:
    """The loss ``autopart run`` trains ``cap``'s model with: ``cross_entropy`` for a model of token ids (its
    logits against the next tokens), else ``mse`` (runtime/loop.py); ``in_graph`` where the graph computes
    it (the vocabulary in chunks, [Note: vocabulary chunks] in vocab_split.py): no loss after the graph."""
    if cap.vocab_chunks > 1:
        return "in_graph"
    inputs = [n for n in cap.nodes.values() if n.op == "placeholder" and n.name not in cap.param_nodes and n.outputs]
    floats = ("float", "bfloat16", "half")
    token_ids = bool(inputs) and all(not t.dtype.startswith(floats) for n in inputs for t in n.outputs)
    return "cross_entropy" if token_ids else "mse"


def node_keys(nodes: Iterable[fx.Node]) -> dict[str, str]:
    """Node name -> its stable key ``module/op#occurrence``, over ``nodes`` in graph order.

    See [Note: stable node keys]. The module is the innermost entry of the
    node's ``nn_module_stack`` ("" for the root), the op its printable target.
    """
    seen: dict[tuple[str, str], int] = {}
    out: dict[str, str] = {}
    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        base = (module, _target_name(n))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out[n.name] = f"{module}/{base[1]}#{k}"
    return out


def model_fingerprint(model: torch.nn.Module, params: Mapping[str, ParamInfo] | None = None) -> str:
    """A short hash of the architecture: class name and every parameter's name, shape and dtype.

    It does not depend on the weights' values (so a meta model and its
    materialized copy agree) nor on the batch or sequence length.
    """
    params = params if params is not None else _param_table(model)
    desc = [type(model).__qualname__] + [f"{p.name}:{p.shape}:{p.dtype}" for p in params.values()]
    return hashlib.sha256("\n".join(desc).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------


def disable_hf_cache(model: torch.nn.Module) -> None:
    """Turn a Hugging Face model's KV cache off (``config.use_cache = False``), in place.

    Every phase that exports the model calls it (capture here, the rewrite in
    rewrite.py), so a stock ``GPT2LMHeadModel(GPT2Config(...))`` works as it
    comes. A KV cache is an inference feature; as an output it is a Cache
    object that export cannot flatten, and training never reads it.
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "use_cache", False):
        cfg.use_cache = False


class _FlattenOutputs(torch.nn.Module):
    """Wraps a model whose output is a dataclass/dict/cache into one returning a tuple of tensors."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(_tensors_in(self.inner(*args, **kwargs)))


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)
    elif hasattr(obj, "to_tuple"):  # transformers.ModelOutput
        yield from _tensors_in(obj.to_tuple())


def _trace_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, dict[str, str]]:
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as first:
        # Outputs that export cannot flatten (caches, custom classes) are the
        # commonest failure: retry once with the outputs flattened to tensors.
        if "output" not in str(first).lower() and "pytree" not in str(first).lower():
            raise
        ep = torch.export.export(_FlattenOutputs(model), args, kwargs, strict=False)
        strip = "inner."
        sig = ep.graph_signature
        mapping = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        gm = ep.graph_module
        _strip_module_prefix(gm, strip)
        return gm, {k: v.removeprefix(strip) for k, v in mapping.items()}
    sig = ep.graph_signature
    mapping = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    return ep.graph_module, dict(mapping)


def _strip_module_prefix(gm: fx.GraphModule, prefix: str) -> None:
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (v[0].removeprefix(prefix) if v[0] != "inner" else "", v[1]) for k, v in stack.items()
            }


def _trace_fx(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """symbolic_trace, then shape propagation on fake tensors; module stacks from call_module targets."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    # Arguments the example leaves out keep their defaults: trace with them fixed,
    # or `if mask is not None:` on a proxy would take the wrong branch.
    concrete: dict[str, Any] = {}
    try:
        sig_params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        sig_params = []
    named = [p for p in sig_params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for p in named[len(args):]:
        if p.name not in kwargs and isinstance(p.default, (type(None), bool, int, float, str)):
            concrete[p.name] = p.default
    gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(a: Any) -> Any:
        return mode.from_tensor(a) if isinstance(a, torch.Tensor) else a

    # Placeholders follow forward()'s signature: a keyword argument goes to the
    # placeholder of its name, and a skipped optional one keeps its default
    # (placeholder.args holds it), so later keywords do not shift into its slot.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ordered = [fake(a) for a in args]
    for p in placeholders[len(args):]:
        if p.target in kwargs:
            ordered.append(fake(kwargs[p.target]))
        elif p.args:
            ordered.append(p.args[0])
        else:
            raise CaptureError(f"forward() argument {p.target!r} has no default and is not in example_kwargs")
    FakeTensorProp(gm, mode).propagate(*ordered)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            parts = str(node.target).split(".")
            stack = {}
            for i in range(1, len(parts) + 1):
                fqn = ".".join(parts[:i])
                stack[fqn] = (fqn, type(gm.get_submodule(fqn)).__qualname__)
            node.meta["nn_module_stack"] = stack
    return gm


def _describe_failure(exc: BaseException) -> str:
    """One line: the exception's first line (or its cause's) plus the innermost frame in the user's code."""
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        fn = frame.filename.replace("\\", "/")
        if "/torch/" not in fn and "/partitioner/" not in fn:
            where = f" (at {fn}:{frame.lineno}: {(frame.line or '').strip()[:120]})"
            break
    return f"{one_line(exc)}{where}"


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def _param_table(model: torch.nn.Module) -> dict[str, ParamInfo]:
    """Parameters and buffers keyed by canonical name, tied aliases collected."""
    seen: dict[int, list[str]] = {}
    tensors: dict[int, tuple[torch.Tensor, bool]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
        tensors[id(p)] = (p, False)
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is None:
            continue
        seen.setdefault(id(b), []).append(name)
        tensors[id(b)] = (b, True)
    table: dict[str, ParamInfo] = {}
    for key, names in seen.items():
        t, is_buffer = tensors[key]
        table[names[0]] = ParamInfo(
            name=names[0],
            shape=tuple(t.shape),
            dtype=_dtype_name(t.dtype),
            bytes=t.numel() * t.element_size(),
            numel=t.numel(),
            aliases=tuple(names[1:]),
            is_buffer=is_buffer,
            trainable=bool(t.requires_grad) and not is_buffer,
        )
    return table


def _dominant_dtype(params: Iterable[ParamInfo]) -> str:
    counts: dict[str, int] = {}
    for p in params:
        if not p.is_buffer:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel
    return max(counts, key=counts.__getitem__) if counts else "float32"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------
# Annotation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _OpCost:
    forward_flops: int
    backward_flops: int
    saved_input_idx: tuple[int, ...]  # positions (in flattened tensor args) autograd saves
    saves_output: bool
    saved_other_bytes: int


class _Annotator:
    """Walks the graph once and builds the NodeInfo side table.

    Op costs are measured by running each op on fresh meta tensors under
    ``FlopCounterMode`` (forward, then an autograd backward) with
    ``saved_tensors_hooks`` recording what autograd keeps. Results are cached by
    the op's signature (target, shapes, dtypes, constants), so the 96 identical
    layers of GPT-3 cost one measurement.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        tracer: str,
        param_of_placeholder: Mapping[str, str],
        alias_to_canonical: Mapping[str, str],
        model: torch.nn.Module,
    ) -> None:
        self.gm = gm
        self.tracer = tracer
        self.param_of_placeholder = param_of_placeholder
        self.alias = alias_to_canonical
        self.model = model
        self.cache: dict[str, _OpCost] = {}
        self.warnings: list[str] = []
        self._uncounted: set[str] = set()

    def run(self) -> dict[str, NodeInfo]:
        self.keys = node_keys(self.gm.graph.nodes)
        param_nodes: dict[str, str] = {}  # node name -> canonical param FQN
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.name in self.param_of_placeholder:
                fqn = self.param_of_placeholder[node.name]
                param_nodes[node.name] = self.alias.get(fqn, fqn)
            elif node.op == "get_attr":
                fqn = str(node.target)
                param_nodes[node.name] = self.alias.get(fqn, fqn)
        self.param_nodes = param_nodes
        self.grad_nodes = _grad_flow(self.gm, param_nodes, self.model)
        out: dict[str, NodeInfo] = {}
        for node in self.gm.graph.nodes:
            out[node.name] = self._annotate(node, param_nodes)
        if self._uncounted:
            self.warnings.append(
                "FLOPs/saved tensors not measurable on meta for: " + ", ".join(sorted(self._uncounted))
            )
        return out

    def _annotate(self, node: fx.Node, param_nodes: Mapping[str, str]) -> NodeInfo:
        stack_meta = node.meta.get("nn_module_stack") or {}
        stack = tuple(v[0] for v in stack_meta.values())
        module_type = ""
        if stack_meta:
            module_type = str(list(stack_meta.values())[-1][1]).rsplit(".", 1)[-1]
        module = stack[-1] if stack else ""
        outputs = tuple(_tensor_metas(node.meta.get("val")))
        inputs = [a for a in node.all_input_nodes if a.name not in param_nodes]
        params = tuple(dict.fromkeys(param_nodes[a.name] for a in node.all_input_nodes if a.name in param_nodes))
        in_bytes = sum(t.bytes for a in node.all_input_nodes for t in _tensor_metas(a.meta.get("val")))
        if node.op == "call_module":
            # fx keeps a leaf module's weights inside it rather than as graph inputs.
            own = self._module_params(node)
            params = tuple(dict.fromkeys(params + tuple(own)))
            in_bytes += sum(t.numel() * t.element_size() for t in own.values())
        fwd = bwd = saved_other = 0
        saved_inputs: tuple[str, ...] = ()
        saves_output = False
        if node.op in ("call_function", "call_method", "call_module") and outputs:
            cost = self._op_cost(node)
            if cost is not None:
                fwd, bwd, saved_other = cost.forward_flops, cost.backward_flops, cost.saved_other_bytes
                saves_output = cost.saves_output
                flat_inputs = _flat_tensor_arg_nodes(node)
                saved_inputs = tuple(
                    dict.fromkeys(
                        flat_inputs[i].name
                        for i in cost.saved_input_idx
                        if i < len(flat_inputs) and flat_inputs[i].name not in param_nodes
                    )
                )
            if _is_fused_attention(node):
                saved_inputs, saves_output, saved_other = _flash_attention_saved(node)
        return NodeInfo(
            name=node.name,
            op=node.op,
            target=_target_name(node),
            inputs=tuple(a.name for a in inputs),
            outputs=outputs,
            params=params,
            forward_flops=int(fwd),
            backward_flops=int(bwd),
            bytes_read=int(in_bytes),
            bytes_written=sum(t.bytes for t in outputs),
            saved_bytes=int(saved_other),
            saved_inputs=saved_inputs,
            saves_output=saves_output,
            module=module,
            module_stack=stack,
            module_type=module_type,
            is_view=_is_view(node),
            variant=_kernel_variant(node),
            needs_grad=node.name in self.grad_nodes,
            key=self.keys[node.name],
        )

    def _module_params(self, node: fx.Node) -> dict[str, torch.Tensor]:
        """Canonical FQN -> tensor of the parameters and buffers a call_module node's module owns."""
        mod = self.gm.get_submodule(str(node.target))
        out: dict[str, torch.Tensor] = {}
        for n, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            fqn = f"{node.target}.{n}"
            out[self.alias.get(fqn, fqn)] = t
        return out

    def _callable(self, node: fx.Node) -> tuple[Callable[..., Any], list[torch.Tensor]] | None:
        """The op to measure and the meta weights it closes over (call_module only)."""
        if node.op == "call_function":
            return node.target, []  # type: ignore[return-value]
        if node.op == "call_method":
            return (lambda self_, *a, **k: getattr(self_, node.target)(*a, **k)), []  # type: ignore[arg-type]
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            meta_params = {
                n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
                for n, p in list(mod.named_parameters()) + list(mod.named_buffers())
            }
            return (lambda *a, **k: torch.func.functional_call(mod, meta_params, a, k)), list(meta_params.values())
        return None

    def _op_cost(self, node: fx.Node) -> _OpCost | None:
        found = self._callable(node)
        if found is None:
            return None
        fn, weights = found
        try:
            # The same op costs differently when different operands need a gradient.
            grads = [a.name in self.grad_nodes for a in _flat_tensor_arg_nodes(node)]
            key = _signature(node) + json.dumps(grads)
        except _Unhashable:
            key = None
        if key is not None and key in self.cache:
            return self.cache[key]
        cost = self._measure(node, fn, weights)
        if key is not None and cost is not None:
            self.cache[key] = cost
        return cost

    def _measure(self, node: fx.Node, fn: Callable[..., Any], weights: Sequence[torch.Tensor] = ()) -> _OpCost | None:
        """Count the op's FLOPs and saved tensors. ``weights`` are a leaf module's own
        parameters (fx tracing): their gradients are part of the backward, and
        autograd saving them is not an activation."""
        fresh: list[torch.Tensor] = []  # in the order of _flat_tensor_arg_nodes(node)

        def to_meta(a: Any) -> Any:
            if isinstance(a, fx.Node):
                val = a.meta.get("val")
                if isinstance(val, torch.Tensor):
                    t = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
                    # Only what the training backward differentiates: autograd saves an operand
                    # for the gradient of the other one only when that one needs it (rotary
                    # embeddings multiply by cos and sin, which no parameter flows into).
                    if t.is_floating_point() and a.name in self.grad_nodes:
                        t.requires_grad_(True)
                    fresh.append(t)
                    return t
                return val
            return a

        try:
            args = tree_map(to_meta, node.args, is_leaf=lambda x: isinstance(x, fx.Node))
            kwargs = tree_map(to_meta, dict(node.kwargs), is_leaf=lambda x: isinstance(x, fx.Node))
        except Exception:
            self._uncounted.add(_target_name(node))
            return None
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        try:
            fwd_counter = FlopCounterMode(display=False)
            # enable_grad: a traced op may switch grad mode (export's wrap_with_set_grad_enabled,
            # seen on torch 2.11) and a failure inside it must not leave it off for later nodes.
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fwd_counter:
                out = fn(*args, **kwargs)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            grad_outs = [t for t in outs if t.requires_grad and t.grad_fn is not None]
            needs = [t for t in (*fresh, *weights) if t.requires_grad]
            bwd_flops = 0
            if grad_outs and needs:
                bwd_counter = FlopCounterMode(display=False)
                with torch.enable_grad(), bwd_counter:
                    torch.autograd.grad(
                        grad_outs, needs, [torch.empty_like(t) for t in grad_outs], allow_unused=True
                    )
                bwd_flops = bwd_counter.get_total_flops()
        except Exception:
            self._uncounted.add(_target_name(node))
            return None
        idx: list[int] = []
        saves_output = False
        other = 0
        for s in saved:
            pos = next((i for i, t in enumerate(fresh) if t is s or _same_view(t, s)), None)
            if pos is not None:
                idx.append(pos)  # fresh[i] was made from flat_nodes[i]
            elif any(s is o or _same_view(o, s) for o in outs):
                saves_output = True
            elif any(s is w or _same_view(w, s) for w in weights):
                pass  # a weight: resident anyway, not an activation
            else:  # an intermediate such as a dropout mask or layer-norm statistics
                other += s.numel() * s.element_size()
        return _OpCost(int(fwd_counter.get_total_flops()), int(bwd_flops), tuple(sorted(set(idx))), saves_output, other)


# Composite ops whose schema says "may alias": they copy when the input is not
# already in the requested layout or dtype.
_MAYBE_COPY = {"reshape", "contiguous", "to", "type_as", "flatten", "_to_copy"}


def _grad_flow(gm: fx.GraphModule, param_nodes: Mapping[str, str], model: torch.nn.Module) -> set[str]:
    """Nodes with a float output that a trainable parameter flows into: backward runs exactly these."""
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    out: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            fqn = param_nodes.get(node.name)
            if fqn is not None and fqn in trainable:
                out.add(node.name)
        elif node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if any(p.requires_grad for p in mod.parameters()) or any(a.name in out for a in node.all_input_nodes):
                out.add(node.name)
        elif any(a.name in out for a in node.all_input_nodes):
            if any(t.dtype.is_floating_point for t in flat_tensors(node.meta.get("val"))):
                out.add(node.name)
    return out


def flat_tensors(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in flat_tensors(v)]
    return []


_GEMMS = {"linear": (0, 1, "nk"), "addmm": (1, 2, "kn"), "mm": (0, 1, "kn"), "bmm": (0, 1, "kn")}


def _kernel_variant(node: fx.Node) -> str:
    """Arguments that select an op's kernel: for attention an explicit mask, causal, dropout; for a
    matmul, "unaligned" when an inner or output dimension is not a multiple of 8 (tensor cores
    then fall back to slower kernels: GPT-2's vocabulary of 50257 runs several times below peak)."""
    target = str(node.target)
    base = target.split(".")[1] if target.startswith("aten.") and "." in target else ""
    if base in _GEMMS:
        a, b, layout = _GEMMS[base]
        vals = [x.meta.get("val") if isinstance(x, fx.Node) else None for x in node.args[a:b + 1]]
        if len(vals) == 2 and all(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in vals):
            k = vals[0].shape[-1]
            n = vals[1].shape[-2] if layout == "nk" else vals[1].shape[-1]
            if int(k) % 8 or int(n) % 8:
                return "unaligned"
        return ""
    if "scaled_dot_product" not in target:
        return ""
    # aten.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, ...)
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    out = []
    if args.get("attn_mask") is not None:
        out.append("mask")
    if args.get("is_causal"):
        out.append("causal")
    dropout = args.get("dropout_p")
    if isinstance(dropout, (int, float)) and dropout > 0:
        out.append("dropout")
    return ",".join(out)


def _is_view(node: fx.Node) -> bool:
    """True when the node only re-describes existing memory (no kernel runs)."""
    import operator

    if node.op == "call_function" and node.target is operator.getitem:
        return True
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    if not returns or not all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return False
    name = target._schema.name.split("::")[-1]
    if name not in _MAYBE_COPY:
        return True
    src = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
    out = node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return src.dtype == out.dtype and src.is_contiguous()


def _is_fused_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and "scaled_dot_product" in str(node.target)


def _flash_attention_saved(node: fx.Node) -> tuple[tuple[str, ...], bool, int]:
    """What a fused (flash / memory-efficient) attention kernel keeps for backward.

    [Note: attention memory]
    On meta tensors ``scaled_dot_product_attention`` runs its math fallback,
    which saves the ``s x s`` attention probabilities. The kernels that run
    on GPUs (FlashAttention, memory-efficient attention) keep only q, k, v,
    the output and a float32 log-sum-exp per query row, so that is what we
    record (Dao et al. 2022; Korthikanti et al. 2022 count 34 s b h bytes per
    layer without the s^2 term for the same reason).
    """
    qkv = [a for a in node.args[:3] if isinstance(a, fx.Node)]
    out = node.meta.get("val")
    lse = 0
    if isinstance(out, torch.Tensor) and out.dim() >= 2:
        lse = int(out.numel() // out.shape[-1]) * 4  # one fp32 per (batch, head, query)
    return tuple(dict.fromkeys(a.name for a in qkv)), True, lse


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Autograd may save a view of an input (linear saves x.view(-1, k)); on meta
    # there are no data pointers, so compare the storage objects.
    try:
        return a.untyped_storage()._cdata == b.untyped_storage()._cdata
    except Exception:
        return False


def _flat_tensor_arg_nodes(node: fx.Node) -> list[fx.Node]:
    """The node's arguments that carry tensors, in the order ``_measure`` creates them."""
    found: list[fx.Node] = []

    def visit(a: Any) -> Any:
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
            found.append(a)
        return a

    tree_map(visit, node.args, is_leaf=lambda x: isinstance(x, fx.Node))
    tree_map(visit, dict(node.kwargs), is_leaf=lambda x: isinstance(x, fx.Node))
    return found


class _Unhashable(Exception):
    pass


def _signature(node: fx.Node) -> str:
    """The op and everything that determines its cost: shapes, strides, dtypes and constants."""

    def enc(a: Any) -> Any:
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                return ["T", list(v.shape), list(v.stride()), str(v.dtype)]
            if isinstance(v, (int, float, bool, type(None))):
                return ["V", v]
            raise _Unhashable
        if isinstance(a, (list, tuple)):
            return [enc(x) for x in a]
        if isinstance(a, dict):
            return {str(k): enc(v) for k, v in a.items()}
        if isinstance(a, (int, float, bool, str, type(None))):
            return a
        if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(a)
        raise _Unhashable

    if node.op == "call_module":
        raise _Unhashable  # fx fallback only: measured per call, never cached
    return json.dumps([node.op, str(node.target), enc(node.args), enc(dict(node.kwargs))], sort_keys=True)


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        if hasattr(t, "_overloadpacket") or isinstance(t, torch._ops.OpOverload):
            return str(t)
        return getattr(t, "__qualname__", None) or getattr(t, "__name__", str(t))
    return str(t)


def _tensor_metas(val: Any) -> Iterable[TensorMeta]:
    for t in tree_flatten(val)[0]:
        if isinstance(t, torch.Tensor):
            yield TensorMeta(tuple(int(s) for s in t.shape), _dtype_name(t.dtype), int(t.numel() * t.element_size()))
