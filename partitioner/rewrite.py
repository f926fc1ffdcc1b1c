"""Rewrite a ``Plan`` into one runnable module per pipeline stage.

This is the phase between the ``Plan`` and the runtime (capture -> blocks ->
solve -> Plan -> **rewrite** -> run). ``split_model`` exports the model with
``torch.export`` at the plan's micro-batch shape, assigns every graph node to
the stage the plan gives it, and cuts the graph into one ``fx.GraphModule``
per stage that holds only the parameters its nodes read, registered under the
original model's (canonical) names. The split is the plan's: this module never
decides where a stage begins. ``partitioner.runtime`` wraps the stages in
``torch.distributed.pipelining.PipelineStage`` and runs them.

[Note: values that skip stages]
``torch.distributed.pipelining`` passes activations from stage ``k`` to stage
``k + 1`` only. A tensor made on stage 0 and read on stage 3 (an attention
mask, rotary tables, the input ids a BERT head never reads but a mask does)
is therefore an output of stages 0, 1 and 2 and an input of stages 1, 2 and
3: every stage forwards what later stages need, in graph order. The planner
prices exactly this (``PartitionGraph.crossing_bytes``). This is why the cut
is written here rather than with ``torch.fx.passes.split_module``, which
feeds each partition straight from the producer and cannot express the
forwarding a point-to-point pipeline needs.

[Note: matching the plan's nodes]
The plan names nodes by the stable keys capture records (``module/op#k``, see
[Note: stable node keys] in capture.py), not by FX names. The runtime graph is
exported at the micro-batch size; ``node_keys`` gives its nodes the same keys,
and each node takes the stage and strategy of the plan's node with its key:
the first ``aten.linear`` inside ``transformer.h.1.mlp.c_fc`` is the same node
in both graphs, whatever FX called it. A few ops exist only for batches above
1 (an ``expand`` of the mask to the batch); a node the plan does not name runs
replicated on the stage of its latest producer. A plan node the runtime graph
lacks is refused if the plan shards it, and refused if the graph has none of
the plan's nodes (another model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import TreeSpec

from .capture import disable_hf_cache, node_keys
from .dtensor_ops import Unshardable, check_shardable, is_check_or_query, mutated_in_place, run_check
from .errors import PlanError
from .plan import Plan

__all__ = ["StageProgram", "SplitModel", "split_model", "canonical_names", "microbatch_inputs"]

_COMPUTE = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class StageProgram:
    """One stage's graph: what it receives, what it sends on, and the parameters it owns."""

    index: int  # stage index in the plan
    module: fx.GraphModule  # parameters and buffers at their canonical FQNs
    inputs: tuple[str, ...]  # values it receives, in order (stage 0: the model's inputs)
    outputs: tuple[str, ...]  # values it sends on, in order (last stage: the model's flat outputs)
    params: tuple[str, ...]  # canonical FQNs of the trainable parameters it reads
    nodes: tuple[str, ...]  # runtime graph nodes it computes
    sharding: Mapping[str, str]  # runtime node name -> tp strategy (the plan's, translated)
    input_specs: tuple[tuple[tuple[int, ...], torch.dtype], ...] = ()  # (shape, dtype) of each input
    output_specs: tuple[tuple[tuple[int, ...], torch.dtype], ...] = ()  # (shape, dtype) of each output
    replicated: tuple[Unshardable, ...] = ()  # nodes the plan splits that run replicated ([Note: ops DTensor cannot shard])


@dataclass(frozen=True)
class SplitModel:
    """The model cut into stages by a plan."""

    stages: tuple[StageProgram, ...]
    input_names: tuple[str, ...]  # the model's positional inputs, in order
    out_spec: TreeSpec  # rebuilds the model's output (e.g. a ModelOutput) from the last stage's tuple
    shared: Mapping[str, tuple[int, ...]]  # canonical param -> the stages that read it (tied weights)
    matched_by: str  # "keys": the plan's stable node keys; see [Note: matching the plan's nodes]


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter/buffer name (tied aliases included) -> the first name it is known by."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out[name] = first.setdefault(id(t), name)
    return out


def microbatch_inputs(example_inputs: Sequence[Any], micro_batch_size: int) -> tuple[Any, ...]:
    """``example_inputs`` resized on dim 0 to one micro-batch (rows repeated or cut)."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            reps = -(-micro_batch_size // x.shape[0])
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:micro_batch_size].contiguous()
        out.append(x)
    return tuple(out)


def split_model(
    model: torch.nn.Module, plan: Plan, example_inputs: Sequence[Any], device: torch.device | None = None
) -> SplitModel:
    """Cut ``model`` into the plan's stages. ``example_inputs`` are one micro-batch of positional inputs.

    ``device``: where the stages will run, for a model built on ``meta``
    ([Note: exporting a meta model]); None leaves the graph's devices alone.
    """
    args = tuple(example_inputs)
    disable_hf_cache(model)  # as capture does: a KV cache is not a training output
    try:
        ep = torch.export.export(model, args, strict=False)
    except Exception as exc:  # export raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        fix = "the runtime needs an exportable model"
        if "cache" in first.lower():
            fix = "the model returns a KV cache: set use_cache=False in its config (or its forward's defaults)"
        raise PlanError(f"rewrite: torch.export of {type(model).__name__} failed ({first}); {fix}") from None
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):  # export's input guard: the runtime checks shapes itself
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    if device is not None:
        _retarget_meta(graph, device)
    canon = canonical_names(model)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise PlanError(f"rewrite: the model takes {len(placeholders)} tensor inputs but {len(args)} example inputs were given")
    compute = [n for n in graph.nodes if n.op in _COMPUTE]
    stage_of, sharding, matched_by = _assign(plan, compute)
    last = len(plan.stages) - 1
    order = {n.name: i for i, n in enumerate(graph.nodes)}

    # Where each value is produced (-1: a model input) and the latest stage that reads it.
    produced = {n.name: -1 for n in placeholders} | {n.name: stage_of[n.name] for n in compute}
    for n in compute:
        for i in n.all_input_nodes:
            if i.name in produced and produced[i.name] > stage_of[n.name]:
                raise PlanError(
                    f"plan: node {n.name} on stage {stage_of[n.name]} reads {i.name} from the later stage "
                    f"{produced[i.name]}; stages must follow the graph order (re-plan, or fix stages[].nodes)"
                )
    out_node = next(n for n in graph.nodes if n.op == "output")
    last_read: dict[str, int] = {}
    for n in [*compute, out_node]:
        s = stage_of.get(n.name, last)
        for i in n.all_input_nodes:
            if i.name in produced:
                last_read[i.name] = max(last_read.get(i.name, -1), s)
    # Stage k sends every value made on stages <= k that a later stage reads ([Note: values that skip stages]).
    sends = [
        tuple(sorted((v for v, p in produced.items() if p <= k < last_read.get(v, -1)), key=order.__getitem__))
        for k in range(last)
    ]
    by_name = {n.name: n for n in graph.nodes}
    for k, vals in enumerate(sends):
        for v in vals:
            val = by_name[v].meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise PlanError(
                    f"plan: stage {k} would send {v} ({type(val).__name__}) to stage {k + 1}; only tensors can cross "
                    "a pipeline cut, so move the cut (re-plan or edit stages[].modules)"
                )
    params = {n for n, _ in model.named_parameters()}
    stages = []
    for k in range(last + 1):
        inputs = tuple(n.name for n in placeholders) if k == 0 else sends[k - 1]
        outputs = sends[k] if k < last else None
        mine = [n for n in compute if stage_of[n.name] == k]
        module, owned = _build_stage(model, graph, canon, inputs, mine, outputs, out_node)
        outs = outputs if outputs is not None else tuple(a.name for a in out_node.all_input_nodes)
        stage_sharding = {n.name: sharding[n.name] for n in mine if n.name in sharding}
        replicated = check_shardable(module.graph.nodes, stage_sharding) if plan.mesh.tp > 1 else ()
        for u in replicated:
            stage_sharding[u.node] = "replicate"
        if replicated:
            import warnings

            warnings.warn(
                f"tp: stage {k} runs {len(replicated)} op(s) replicated that DTensor cannot shard: "
                + "; ".join(u.describe() for u in replicated[:3])
                + ("; ..." if len(replicated) > 3 else "")
                + " (correct, but each gathers its inputs; see docs/runtime.md)",
                stacklevel=2,
            )
        stages.append(
            StageProgram(
                index=k,
                module=module,
                inputs=inputs,
                outputs=outputs if outputs is not None else tuple(a.name for a in out_node.all_input_nodes),
                params=tuple(p for p in owned if p in params),
                nodes=tuple(n.name for n in mine),
                sharding=stage_sharding,
                input_specs=tuple(_spec(by_name[v]) for v in inputs),
                output_specs=tuple(_spec(by_name[v]) for v in outs),
                replicated=replicated,
            )
        )
    readers: dict[str, list[int]] = {}
    for st in stages:
        for p in st.params:
            readers.setdefault(p, []).append(st.index)
    shared = {p: tuple(s) for p, s in readers.items() if len(s) > 1}
    return SplitModel(tuple(stages), tuple(n.name for n in placeholders), ep.call_spec.out_spec, shared, matched_by)


def _retarget_meta(graph: fx.Graph, device: torch.device) -> None:
    """Replace the ``meta`` device recorded in the graph's ops by ``device``.

    [Note: exporting a meta model]
    Exporting a model whose weights are on ``meta`` records that device in
    every op that makes a tensor (``arange(device=meta)`` for positions, the
    ``to(meta)`` of rotary tables) and in export's metadata asserts. The
    stages run on real weights on ``device``, so those constants are
    rewritten; nothing else in the graph depends on the device.
    """
    meta = torch.device("meta")

    def fix(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a == meta else a

    for node in graph.nodes:
        if node.op in _COMPUTE:
            node.args = fx.node.map_aggregate(node.args, fix)
            node.kwargs = fx.node.map_aggregate(node.kwargs, fix)


def _spec(node: fx.Node) -> tuple[tuple[int, ...], torch.dtype]:
    val = node.meta.get("val")
    return tuple(int(d) for d in val.shape), val.dtype


def _build_stage(
    model: torch.nn.Module,
    graph: fx.Graph,
    canon: Mapping[str, str],
    inputs: Sequence[str],
    mine: Sequence[fx.Node],
    outputs: Sequence[str] | None,
    out_node: fx.Node,
) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule computing ``mine`` from ``inputs``; its attributes are the model's own tensors."""
    g = fx.Graph()
    env: dict[str, fx.Node] = {name: g.placeholder(name) for name in inputs}
    root = torch.nn.Module()
    owned: list[str] = []

    def attr(node: fx.Node) -> fx.Node:
        name = canon.get(str(node.target), str(node.target))
        if name not in owned:
            owned.append(name)
            set_tensor(root, name, get_tensor(model, name), model)
        key = "attr:" + name
        if key not in env:
            env[key] = g.get_attr(name)
        return env[key]

    def arg(node: fx.Node) -> fx.Node:
        return attr(node) if node.op == "get_attr" else env[node.name]

    for n in mine:
        env[n.name] = g.node_copy(n, arg)
    if outputs is None:
        g.output(tuple(fx.map_arg(out_node.args[0], arg)) if isinstance(out_node.args[0], (list, tuple)) else arg(out_node.args[0]))
    else:  # point-to-point sends need dense tensors (a mask may be an expanded view)
        g.output(tuple(g.call_method("contiguous", (env[v],)) for v in outputs))
    return fx.GraphModule(root, g), owned


def get_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    t = getattr(mod, leaf)
    if not isinstance(t, torch.Tensor):
        raise PlanError(f"rewrite: {name} is not a tensor of the model")
    return t


def set_tensor(root: torch.nn.Module, name: str, t: torch.Tensor, model: torch.nn.Module) -> None:
    """Register ``t`` under the dotted ``name`` (parameter, buffer, or constant as in the model)."""
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(t, torch.nn.Parameter):
        mod.register_parameter(leaf, t)
    else:
        owner = model.get_submodule(".".join(path)) if path else model
        persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
        mod.register_buffer(leaf, t, persistent=persistent)


# --------------------------------------------------------------------------------------
# Node -> stage, from the plan
# --------------------------------------------------------------------------------------


def _assign(plan: Plan, compute: Sequence[fx.Node]) -> tuple[dict[str, int], dict[str, str], str]:
    """Stage and tp strategy of every runtime node, matched by key; see [Note: matching the plan's nodes]."""
    plan_stage = {key: st.index for st in plan.stages for key in st.nodes}
    key_of = node_keys(compute)
    runtime_keys = set(key_of.values())
    missing = [k for k in plan_stage if k not in runtime_keys]
    if plan_stage and len(missing) == len(plan_stage):
        raise PlanError(
            f"plan: none of the nodes the stages name (e.g. {missing[0]!r}) is in this model's graph; "
            "the plan is for another model, or was written before node keys (version 1): re-plan"
        )
    lost = sorted(k for k in missing if k in plan.sharding)
    if lost:
        raise PlanError(
            f"plan: node {lost[0]!r} is sharded ({plan.sharding[lost[0]]}) but this model's graph has no such node "
            "at the micro-batch shape; re-plan for this model and torch version"
        )
    stage_of: dict[str, int] = {}
    sharding: dict[str, str] = {}
    for n in compute:
        key = key_of[n.name]
        if key in plan_stage:
            stage_of[n.name] = plan_stage[key]
            if key in plan.sharding:
                sharding[n.name] = plan.sharding[key]
        else:  # an op only this batch size needs: with its latest producer
            stage_of[n.name] = max((stage_of.get(i.name, 0) for i in n.all_input_nodes), default=0)
    return stage_of, sharding, "keys"


# --------------------------------------------------------------------------------------
# Tensor parallelism: the plan's per-node strategies on DTensor
# --------------------------------------------------------------------------------------


def param_placements(stage: StageProgram, tp: int) -> dict[str, int]:
    """Canonical param -> the dim it is split on over the tp axis, from the plan's strategies.

    [Note: tensor-parallel parameters]
    ``column`` splits a linear's output features and ``row`` its input
    features; ``vocab`` splits an embedding's rows. Where those features live
    depends on the op: ``aten.linear`` stores its weight (out, in), GPT-2's
    ``Conv1D`` (``aten.addmm(bias, x, W)``) and ``aten.mm``/``matmul`` store
    it (in, out). A bias is split with the output of a column linear and whole
    for a row linear (it is added after the all-reduce). A parameter that two
    nodes would split differently keeps the first node's split; DTensor
    redistributes it for the other, which is correct and costs a gather.
    Parameters of replicated nodes stay whole on every tp rank.
    """
    out: dict[str, int] = {}
    if tp == 1:
        return out
    graph = stage.module.graph
    for node in graph.nodes:
        strat = stage.sharding.get(node.name)
        if strat not in ("column", "row", "vocab") or node.op != "call_function":
            continue
        op = getattr(node.target, "_overloadpacket", node.target)
        name = getattr(op, "__name__", str(op))
        args = list(node.args)

        def put(i: int, dim: int | None) -> None:
            if i < len(args) and isinstance(args[i], fx.Node) and args[i].op == "get_attr" and dim is not None:
                out.setdefault(str(args[i].target), dim)

        if strat == "vocab":
            put(0, 0)  # aten.embedding(weight, ids)
        elif name == "linear":
            put(1, 0 if strat == "column" else 1)
            put(2, 0 if strat == "column" else None)
        elif name == "addmm":
            put(2, 1 if strat == "column" else 0)
            put(0, 0 if strat == "column" else None)
        elif name in ("mm", "matmul"):
            put(1, 1 if strat == "column" else 0)
    return out


class TensorParallelModule(torch.nn.Module):
    """A stage graph whose parameters are this tp rank's shards, run with DTensor where the plan shards.

    [Note: realizing strategies with DTensor]
    A tensor in layout ``R`` (see [Note: layouts and resharding] in
    sharding.py) is a plain, whole tensor; a tensor in layout ``S`` is a
    DTensor sharded over the tp mesh axis. Each node runs as its strategy
    says: a ``replicate`` node gets whole tensors (a DTensor input is
    gathered, ``S -> R``); any other node gets DTensors (a whole input is
    wrapped as replicated, and a ``row`` node's input is split, ``R -> S``),
    and DTensor's sharding propagation does the rest: column linears produce
    outputs split by features, attention on heads split by the column QKV
    stays split, and row linears produce partial sums that the next
    replicated node all-reduces. Stage outputs are whole, as the plan's
    block boundaries are. Gradients follow DTensor's autograd, so the
    backward collectives (Megatron's f and g) come out of the same rules.
    Parameters are held as plain local shards (so DDP and optimizers see
    ordinary tensors) and wrapped with ``DTensor.from_local`` at use.
    """

    def __init__(self, stage: StageProgram, mesh: Any) -> None:
        super().__init__()
        from torch.distributed.tensor import Replicate, Shard

        self.graph_module = stage.module
        self.mesh = mesh
        self.sharding = dict(stage.sharding)
        tp = mesh.size()
        rank = mesh.get_local_rank()
        self.split_dim = param_placements(stage, tp)
        for name, dim in self.split_dim.items():
            full = stage.module.get_parameter(name) if name in dict(stage.module.named_parameters()) else None
            if full is None:
                continue
            if full.shape[dim] % tp:
                raise PlanError(f"sharding: {name} has {full.shape[dim]} rows on dim {dim}, not divisible by tp={tp}")
            local = full.detach().chunk(tp, dim=dim)[rank].clone()
            _replace_param(stage.module, name, torch.nn.Parameter(local, requires_grad=full.requires_grad))
        self._shard = Shard
        self._replicate = Replicate

    def forward(self, *args: Any) -> Any:
        return _TPInterpreter(self).run(*args)


def _replace_param(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    mod.register_parameter(leaf, param)


class _TPInterpreter(fx.Interpreter):
    """Runs one stage graph under the plan's strategies; see [Note: realizing strategies with DTensor]."""

    def __init__(self, owner: TensorParallelModule) -> None:
        super().__init__(owner.graph_module, garbage_collect_values=True)
        self.owner = owner

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        from torch.distributed.tensor import DTensor

        t = super().get_attr(target, args, kwargs)
        dim = self.owner.split_dim.get(str(target))
        if dim is None:
            return t
        return DTensor.from_local(t, self.owner.mesh, [self.owner._shard(dim)], run_check=False)

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in _COMPUTE:
            result = super().run_node(n)
            if n.op == "output":
                return _tree_full(result)
            return result
        strat = self.owner.sharding.get(n.name, "replicate")
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if is_check_or_query(n.target):  # [Note: checks and queries under DTensor] in dtensor_ops.py
            return run_check(n.target, args, kwargs)
        if strat == "vocab":
            return self._vocab_embedding(n, args, kwargs)
        if strat == "sharded" and "scaled_dot_product" in str(n.target):
            return self._head_parallel_attention(n, args, kwargs)
        if strat == "replicate":
            args, kwargs = _tree_full(args), _tree_full(kwargs)
        else:
            args, kwargs = self._as_dtensors(args), self._as_dtensors(kwargs)
            if strat == "row":
                args = self._split_activation(n, args)
        out = getattr(self, n.op)(n.target, args, kwargs)
        return _contiguous_grads(out, copy=mutated_in_place(n)) if strat != "replicate" else out

    def _vocab_embedding(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Vocabulary-parallel lookup: each rank looks up the ids in its rows, zero elsewhere; the
        partial sums are reduced by the first replicated reader (DTensor's ``Partial``). Written out
        because DTensor's own masked partial cannot be reduced outside the op that made it."""
        from torch.distributed.tensor import DTensor, Partial

        weight, ids = args[0], args[1]
        if not isinstance(weight, DTensor):
            return self.call_function(n.target, _tree_full(args), _tree_full(kwargs))
        local = weight.to_local()
        rows = local.shape[0]
        start = self.owner.mesh.get_local_rank() * rows
        ids = _tree_full(ids)
        outside = (ids < start) | (ids >= start + rows)
        pad = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)  # aten.embedding's padding_idx
        local_pad = pad - start if isinstance(pad, int) and start <= pad < start + rows else None
        out = torch.nn.functional.embedding((ids - start).masked_fill(outside, 0), local, padding_idx=local_pad)
        out = out * (~outside).unsqueeze(-1).to(out.dtype)
        return DTensor.from_local(out, self.owner.mesh, [Partial()], run_check=False)

    def _head_parallel_attention(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Attention on this rank's heads: q, k, v split on dim 1 (heads; with grouped-query
        attention k and v have fewer heads, split alike), the mask whole. Heads are independent,
        so the kernel runs on the local shards; DTensor has no rule for every CPU attention
        kernel's backward, so it is not asked for one."""
        from torch.distributed.tensor import DTensor

        mesh, shard = self.owner.mesh, self.owner._shard(1)

        def heads(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [self.owner._replicate()], run_check=False)
            if x.placements[0] != shard:
                x = x.redistribute(mesh, [shard])
            return x.to_local()

        q, k, v, *rest = args
        rest = _tree_full(rest)
        kwargs = _tree_full(kwargs)
        out = self.call_function(n.target, (heads(q), heads(k), heads(v), *rest), kwargs)
        return DTensor.from_local(out, mesh, [shard], run_check=False)

    def _as_dtensors(self, tree: Any) -> Any:
        from torch.distributed.tensor import DTensor
        from torch.utils._pytree import tree_map

        mesh, rep = self.owner.mesh, self.owner._replicate

        def wrap(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) and x.dim() > 0:
                return DTensor.from_local(x, mesh, [rep()], run_check=False)
            return x

        return tree_map(wrap, tree)

    def _split_activation(self, n: fx.Node, args: tuple) -> tuple:
        """A row linear reads its activation split on the last dim (``R -> S`` is a free slice)."""
        op = getattr(n.target, "_overloadpacket", n.target)
        i = 1 if getattr(op, "__name__", "") == "addmm" else 0
        x = args[i] if i < len(args) else None
        if _is_dtensor(x) and not _is_sharded(x):
            x = x.redistribute(x.device_mesh, [self.owner._shard(x.dim() - 1)])
            args = (*args[:i], x, *args[i + 1 :])
        return args


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    DTensor's backward of a resharding can hand a strided local shard to the
    next op's backward, whose ``view`` then fails (seen with GPT-2's fused QKV
    split on a sharded dim); every sharded node's output passes through this.
    ``copy``: return a copy rather than a view, for an output a later op writes
    in place (autograd forbids writing into a custom Function's view; Mixtral's
    router divides its top-k weights in place)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, copy: bool) -> torch.Tensor:
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(), None


def _contiguous_grads(tree: Any, copy: bool = False) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(
        lambda x: _ContiguousGrad.apply(x, copy) if isinstance(x, torch.Tensor) and x.requires_grad else x, tree
    )


def _is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _is_sharded(x: Any) -> bool:
    return any(p.is_shard() for p in x.placements)


def _tree_full(tree: Any) -> Any:
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree)
