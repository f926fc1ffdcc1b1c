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
prices exactly this (``PartitionGraph.crossings``). This is why the cut
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

import contextlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import TreeSpec

from .capture import disable_hf_cache, node_keys
from .dtensor_ops import Unshardable, check_shardable, is_check_or_query, run_check, tree_full
from .errors import AutopartError, PlanError
from .plan import Plan
from .recompute import run_region
from .schedules import spec as schedule_spec
from .tp_strategies import INPUT_LAYOUT, OUTPUT_LAYOUT, STRATEGIES, TPContext
from .vocab_split import vocab_loss

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
    chunks = plan.model.vocab_chunks
    splits_backward = schedule_spec(plan.schedule.name).splits_backward  # [Note: a split backward's stage outputs]
    try:
        # The head and the loss in vocabulary chunks, as capture traced them: the targets are one more
        # input and the loss the output ([Note: vocabulary chunks] in vocab_split.py).
        with vocab_loss(model, chunks, args) if chunks > 1 else contextlib.nullcontext(args) as args:
            ep = torch.export.export(model, args, strict=False)
    except AutopartError:
        raise
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
        module, owned = _build_stage(model, graph, canon, inputs, mine, outputs, out_node, splits_backward)
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
    splits_backward: bool = False,
) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule computing ``mine`` from ``inputs``; its attributes are the model's own tensors.
    ``splits_backward``: the schedule splits the backward, and the outputs sent on are never views
    ([Note: a split backward's stage outputs])."""
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
        own = dict(memory_format=torch.contiguous_format)  # [Note: a split backward's stage outputs]
        g.output(tuple(g.call_method("clone", (env[v],), own) if splits_backward else
                       g.call_method("contiguous", (env[v],)) for v in outputs))
    return fx.GraphModule(root, g), owned


# [Note: a split backward's stage outputs]
# torch's zero-bubble schedules compute a stage's input gradients apart from its weight gradients
# (``stage_backward_input``), and then detach the stage's outputs in place to drop their graph.
# ``detach_`` refuses a view, and a stage may well end in one: GPT-2's final norm is followed by a
# ``view`` of its output, so a zbv plan whose middle stage ends at ``ln_f`` failed on its first
# backward ("Can't detach views in-place"; the ILP's plan for the measured-quality GPT-2 in run 22,
# 2026-12-07). Under such schedules a stage sends copies of its outputs (``clone``: the exported
# graph's values do not say which are views). A copy is an activation's size, small beside a stage's
# compute, and is not priced; the plain schedules keep ``contiguous``.


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

    Each strategy's ``param_dims`` says which of a node's arguments it splits
    and on which dim ([Note: tensor-parallel parameters] in tp_strategies.py).
    A parameter that two nodes would split differently keeps the first node's
    split; DTensor redistributes it for the other, which is correct and costs
    a gather. Parameters of replicated nodes stay whole on every tp rank.
    """
    out: dict[str, int] = {}
    if tp == 1:
        return out
    for node in stage.module.graph.nodes:
        strat = STRATEGIES.get(stage.sharding.get(node.name, "replicate"))
        if strat is None or strat.param_split == "none" or node.op != "call_function":
            continue
        for i, dim in strat.param_dims(str(node.target)).items():
            arg = node.args[i] if i < len(node.args) else None
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                out.setdefault(str(arg.target), dim)
    return out


class TensorParallelModule(torch.nn.Module):
    """A stage graph whose parameters are this tp rank's shards, run with DTensor where the plan shards.

    [Note: realizing strategies with DTensor]
    A tensor in layout ``R`` (see [Note: layouts and resharding] in
    tp_strategies.py) is a plain, whole tensor; a tensor in layout ``S`` is a
    DTensor sharded over the tp mesh axis. Each node runs as its strategy
    says (its ``realize`` in ``tp_strategies.STRATEGIES``): a ``replicate`` node gets whole tensors (a DTensor input is
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

    def __init__(self, stage: StageProgram, mesh: Any, regions: Sequence[Sequence[str]] = ()) -> None:
        super().__init__()
        self.graph_module = stage.module
        self.mesh = mesh
        # Node regions run as one checkpointed function each ([Note: recompute in the runtime] in recompute.py)
        self.regions = tuple(tuple(r) for r in regions)
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

    def forward(self, *args: Any) -> Any:
        interpreter = _TPInterpreter(self)
        try:
            return interpreter.run(*args)
        finally:
            # The interpreter and its context refer to each other, so it lives until the cyclic
            # garbage collector runs; its values (the output among them: the logits on the last
            # stage) must not. Measured: every micro-batch's logits stayed alive through the step
            # (benchmarks/results/2026-12-05-fidelity-memory.md, tensor parallelism).
            interpreter.env.clear()
            interpreter._gathered.clear()


def _replace_param(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    mod.register_parameter(leaf, param)


class _TPInterpreter(fx.Interpreter):
    """Runs one stage graph under the plan's strategies; see [Note: realizing strategies with DTensor]."""

    def __init__(self, owner: TensorParallelModule) -> None:
        super().__init__(owner.graph_module, garbage_collect_values=True)
        self.owner = owner
        self.ctx = TPContext(owner.mesh, lambda n, args, kwargs: getattr(self, n.op)(n.target, args, kwargs))
        by_name = {n.name: n for n in owner.graph_module.graph.nodes}
        self._region_of: dict[fx.Node, tuple[fx.Node, ...]] = {}
        for names in owner.regions:
            region = tuple(by_name[x] for x in names)
            self._region_of.update({n: region for n in region})
        self._done: dict[fx.Node, Any] = {}  # values a region computed ahead of its nodes' turn
        # Sequence-split values gathered for the nodes that read them whole:
        # producer -> (value, gathered, readers still to come)
        self._gathered: dict[str, tuple[Any, Any, int]] = {}

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        from torch.distributed.tensor import DTensor, Shard

        t = super().get_attr(target, args, kwargs)
        dim = self.owner.split_dim.get(str(target))
        if dim is None:
            return t
        return DTensor.from_local(t, self.owner.mesh, [Shard(dim)], run_check=False)

    def run_node(self, n: fx.Node) -> Any:
        region = self._region_of.get(n)
        if region is not None:  # [Note: recompute in the runtime] in recompute.py
            if n is region[0]:
                self._done.update(run_region(region, self.env, self._compute))
            return self._done.pop(n, None)
        if n.op not in _COMPUTE:
            result = super().run_node(n)
            if n.op == "output":
                return tree_full(result)
            return result
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return self._compute(n, args, kwargs)

    def _compute(self, n: fx.Node, args: Any, kwargs: Any) -> Any:
        if n.op not in _COMPUTE:  # a weight read by a recomputed region
            return getattr(self, n.op)(n.target, args, kwargs)
        if is_check_or_query(n.target):  # [Note: checks and queries under DTensor] in dtensor_ops.py
            return run_check(n.target, args, kwargs)
        strategy = self.owner.sharding.get(n.name, "replicate")
        if INPUT_LAYOUT[strategy] == "R":
            args, kwargs = self._gather_sequence(n, args, kwargs)
        return STRATEGIES[strategy].realize(self.ctx, n, args, kwargs)

    def _gather_sequence(self, n: fx.Node, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """``args`` with each sequence-split input (``Q``) replaced by its gather, made once per
        value and shared by every node that reads it whole, so that the backward reduces their
        gradients once ([Note: sequence parallelism] in tp_strategies.py)."""
        from torch.distributed.tensor import DTensor, Replicate
        from torch.utils._pytree import tree_flatten, tree_map

        swap: dict[int, Any] = {}
        # The values come from the arguments, matched to the graph's by position, not from the
        # environment: a recomputed region runs again in backward, after the environment is cleared.
        for i, value in zip(tree_flatten((n.args, n.kwargs))[0], tree_flatten((args, kwargs))[0]):
            if not isinstance(i, fx.Node) or not isinstance(value, DTensor) or id(value) in swap:
                continue
            if OUTPUT_LAYOUT[self.owner.sharding.get(i.name, "replicate")] != "Q":
                continue
            hit = self._gathered.get(i.name)
            if hit is None or hit[0] is not value:
                readers = sum(INPUT_LAYOUT[self.owner.sharding.get(u.name, "replicate")] == "R" for u in i.users)
                hit = (value, value.redistribute(self.owner.mesh, [Replicate()]), readers)
            if hit[2] > 1:  # kept for the other readers only: the last one lets it go
                self._gathered[i.name] = (hit[0], hit[1], hit[2] - 1)
            else:
                self._gathered.pop(i.name, None)
            swap[id(value)] = hit[1]
        if not swap:
            return args, kwargs
        return tree_map(lambda x: swap.get(id(x), x), args), tree_map(lambda x: swap.get(id(x), x), kwargs)
