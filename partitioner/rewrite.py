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
The plan names the nodes of the graph captured at its example batch (usually
1). The runtime graph is exported at the micro-batch size, and a few ops
exist only for batches above 1 (an ``expand`` of the mask to the batch), which
shifts FX's per-op name counters. When the names differ, nodes are matched
by (innermost module, op, occurrence): the n-th ``aten.linear`` inside
``transformer.h.1.mlp.c_fc`` is the same node in both graphs. A node the plan
does not know (the extra ``expand``) runs replicated on the stage of its
latest producer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import TreeSpec

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


@dataclass(frozen=True)
class SplitModel:
    """The model cut into stages by a plan."""

    stages: tuple[StageProgram, ...]
    input_names: tuple[str, ...]  # the model's positional inputs, in order
    out_spec: TreeSpec  # rebuilds the model's output (e.g. a ModelOutput) from the last stage's tuple
    shared: Mapping[str, tuple[int, ...]]  # canonical param -> the stages that read it (tied weights)
    matched_by: str  # "names" (the plan's node names) or "structure"; see [Note: matching the plan's nodes]


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


def split_model(model: torch.nn.Module, plan: Plan, example_inputs: Sequence[Any]) -> SplitModel:
    """Cut ``model`` into the plan's stages. ``example_inputs`` are one micro-batch of positional inputs."""
    args = tuple(example_inputs)
    try:
        ep = torch.export.export(model, args, strict=False)
    except Exception as exc:  # export raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PlanError(f"rewrite: torch.export of {type(model).__name__} failed ({first}); the runtime needs an exportable model") from None
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):  # export's input guard: the runtime checks shapes itself
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    canon = canonical_names(model)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise PlanError(f"rewrite: the model takes {len(placeholders)} tensor inputs but {len(args)} example inputs were given")
    compute = [n for n in graph.nodes if n.op in _COMPUTE]
    stage_of, sharding, matched_by = _assign(model, plan, compute, args)
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
        stages.append(
            StageProgram(
                index=k,
                module=module,
                inputs=inputs,
                outputs=outputs if outputs is not None else tuple(a.name for a in out_node.all_input_nodes),
                params=tuple(p for p in owned if p in params),
                nodes=tuple(n.name for n in mine),
                sharding={n.name: sharding[n.name] for n in mine if n.name in sharding},
            )
        )
    readers: dict[str, list[int]] = {}
    for st in stages:
        for p in st.params:
            readers.setdefault(p, []).append(st.index)
    shared = {p: tuple(s) for p, s in readers.items() if len(s) > 1}
    return SplitModel(tuple(stages), tuple(n.name for n in placeholders), ep.call_spec.out_spec, shared, matched_by)


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
            _set_tensor(root, name, _lookup(model, name), model)
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
    else:
        g.output(tuple(env[v] for v in outputs))
    return fx.GraphModule(root, g), owned


def _lookup(model: torch.nn.Module, name: str) -> torch.Tensor:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    t = getattr(mod, leaf)
    if not isinstance(t, torch.Tensor):
        raise PlanError(f"rewrite: {name} is not a tensor of the model")
    return t


def _set_tensor(root: torch.nn.Module, name: str, t: torch.Tensor, model: torch.nn.Module) -> None:
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


def _assign(
    model: torch.nn.Module, plan: Plan, compute: Sequence[fx.Node], args: tuple[Any, ...]
) -> tuple[dict[str, int], dict[str, str], str]:
    """Stage and tp strategy of every runtime node; see [Note: matching the plan's nodes]."""
    plan_stage = {n: st.index for st in plan.stages for n in st.nodes}
    names = [n.name for n in compute]
    if set(names) == set(plan_stage):
        return {n: plan_stage[n] for n in names}, dict(plan.sharding), "names"
    # Re-export at the plan's example shapes and match nodes by (module, op, occurrence).
    shapes = plan.model.input_shapes
    if len(shapes) != len(args):
        raise PlanError(
            f"plan: model.input_shapes lists {len(shapes)} inputs but the model takes {len(args)}; re-plan for this model"
        )
    plan_args = tuple(
        torch.zeros(s, dtype=a.dtype, device=a.device) if isinstance(a, torch.Tensor) else a for s, a in zip(shapes, args)
    )
    try:
        ref = torch.export.export(model, plan_args, strict=False).graph
    except Exception as exc:
        raise PlanError(f"rewrite: cannot re-export at the plan's input shapes {shapes}: {type(exc).__name__}") from None
    ref_compute = [n for n in ref.nodes if n.op in _COMPUTE]
    missing = sorted(set(plan_stage) - {n.name for n in ref_compute})
    if missing:
        raise PlanError(
            f"plan: stages name node(s) {', '.join(missing[:3])} that this model's graph does not have; "
            "the plan is for another model or another version of it: re-plan"
        )
    ref_by_key = dict(zip(_structural_keys(ref_compute), (n.name for n in ref_compute)))
    stage_of: dict[str, int] = {}
    sharding: dict[str, str] = {}
    for n, key in zip(compute, _structural_keys(compute)):
        ref_name = ref_by_key.get(key)
        if ref_name is not None and ref_name in plan_stage:
            stage_of[n.name] = plan_stage[ref_name]
            if ref_name in plan.sharding:
                sharding[n.name] = plan.sharding[ref_name]
        else:  # an op only this batch size needs: with its latest producer
            stage_of[n.name] = max((stage_of.get(i.name, 0) for i in n.all_input_nodes), default=0)
    return stage_of, sharding, "structure"


def _structural_keys(nodes: Sequence[fx.Node]) -> list[tuple[str, str, int]]:
    seen: dict[tuple[str, str], int] = {}
    keys = []
    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        base = (module, str(n.target))
        seen[base] = seen.get(base, 0) + 1
        keys.append((*base, seen[base]))
    return keys
