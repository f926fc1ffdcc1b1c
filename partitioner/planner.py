"""The Python entry point for planning: model in, scored ``Plan`` out.

``plan_parallelism`` runs the whole front half of autopart (capture ->
blocks -> cost model -> planner -> simulate) and is what ``autopart plan``
calls. ``manual_plan`` turns stage boundaries written by a person (module
names) into a checked, simulated ``Plan`` so that hand-made splits are judged
exactly like the planners' own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from cost_models import AnalyticCostModel, CostModel

from .baselines import METHODS, Pins, plan_baseline
from .capture import CapturedModel, capture
from .cluster import Cluster
from .errors import PlanError
from .evaluate import Evaluator, StageSpec
from .graph import PartitionGraph, build_partition_graph
from .plan import Mesh, Plan, Schedule, Training
from .progress import SearchCallback
from .schedules import spec as schedule_spec
from .sharding import megatron_sharding
from .simulate import SimResult

__all__ = ["ALL_METHODS", "PlanResult", "plan_parallelism", "prepare", "manual_plan", "score_plan", "check_plan", "check_split_backward"]

ALL_METHODS = ("ilp", *METHODS, "manual")


@dataclass(frozen=True)
class PlanResult:
    """A plan with what produced it (kept for printing timelines and explanations)."""

    plan: Plan
    sim: SimResult
    evaluator: Evaluator
    report: Any = None  # the ILP's SearchReport (runner-up, bound, counts); None for other methods

    @property
    def pgraph(self) -> PartitionGraph:
        return self.evaluator.pgraph


def prepare(
    model: torch.nn.Module | CapturedModel | PartitionGraph,
    example_inputs: Sequence[Any] = (),
    cluster: Cluster | None = None,
    *,
    global_batch: int | None = None,
    training: Training | None = None,
    dtype: str = "bf16",
    optimizer: str = "adam-mixed",
    zero1: bool = False,
    dp_sharding: str | None = None,
    memory_reserve: float = 0.1,
    overlap_dp: bool = True,
    cost_model: CostModel | None = None,
    name: str | None = None,
    batch_size: int | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    memory_margin: float | None = None,
    vocab_chunks: int = 1,
) -> Evaluator:
    """Capture (unless given a ``CapturedModel``), coarsen (unless given a ``PartitionGraph``), and
    build the evaluator. ``memory_margin`` replaces the recorded one ([Note: the memory margin] in
    cost_models/memory.py), e.g. 0 where a test is about something else than the margin.
    ``vocab_chunks`` > 1 splits the output head's vocabulary into that many blocks when capturing
    ([Note: vocabulary chunks] in vocab_split.py).

    The training set-up is ``training`` if given (e.g. a loaded plan's),
    otherwise built from ``global_batch`` and the other keywords.
    """
    if cluster is None:
        raise PlanError("a cluster is required, e.g. Cluster.preset('dgx-a100-80g') or Cluster.local(world_size)")
    if isinstance(model, PartitionGraph):  # already captured and coarsened (e.g. by the profiler)
        pgraph = model
    else:
        if isinstance(model, CapturedModel):
            captured, module = model, None
        else:
            captured = capture(model, example_inputs, example_kwargs, name=name, batch_size=batch_size,
                               vocab_chunks=vocab_chunks)
            module = model
        pgraph = build_partition_graph(captured, module)
    if training is None:
        if global_batch is None:
            raise PlanError("global_batch is required (samples per optimizer step)")
        training = Training(
            global_batch=global_batch,
            dtype=dtype,
            optimizer=optimizer,
            dp_sharding=dp_sharding if dp_sharding is not None else ("zero1" if zero1 else "none"),
            memory_reserve=memory_reserve,
            overlap_dp=overlap_dp,
        )
    return Evaluator(pgraph, cluster, cost_model or AnalyticCostModel(cluster), training, memory_margin)


def plan_parallelism(
    model: torch.nn.Module | CapturedModel | PartitionGraph,
    example_inputs: Sequence[Any] = (),
    cluster: Cluster | None = None,
    *,
    global_batch: int,
    method: str = "ilp",
    pp: int | None = None,
    tp: int | None = None,
    dp: int | None = None,
    microbatches: int | None = None,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    recompute: bool | None = None,
    split_at: Sequence[str] | None = None,
    sequence_parallel: bool | None = None,
    time_limit_s: float = 30.0,
    progress: SearchCallback | None = None,
    **training: Any,
) -> PlanResult:
    """Plan ``model`` on ``cluster``. Every keyword left as None is the planner's to choose.

    ``method`` is "ilp" (the default: the CP-SAT planner, bounded by
    ``time_limit_s`` seconds) or a baseline. ``split_at`` (module names where
    stages 1, 2, ... begin) makes a manual plan, or with ``method="ilp"`` pins
    those stage boundaries and lets the ILP choose the rest. ``sequence_parallel``: None lets the
    ILP choose sequence parallelism per node (the baselines run Megatron's layout without it), True
    gives the baselines and manual plans Megatron's sequence-parallel layout, False keeps it out of
    the ILP too ([Note: sequence parallelism] in tp_strategies.py). Remaining keywords (``dtype``,
    ``optimizer``, ``zero1``, ``dp_sharding``, ``memory_reserve``, ``overlap_dp``,
    ``cost_model``, ``name``, ``example_kwargs``) go to :func:`prepare`. ``progress`` receives the
    ILP search's ``SearchStatus`` after each candidate (``partitioner.progress.Progress.search`` draws it).
    """
    ev = prepare(model, example_inputs, cluster, global_batch=global_batch, **training)
    pins = Pins(
        pp=pp,
        tp=tp,
        dp=dp,
        microbatches=microbatches,
        schedule=schedule,
        virtual_stages=virtual_stages,
        recompute=recompute,
        split_at=tuple(split_at or ()),
        sequence_parallel=sequence_parallel,
    )
    if method not in ALL_METHODS:
        raise PlanError(f"--method {method!r} is not one of {', '.join(ALL_METHODS)}")
    if method == "ilp":
        from .solver import plan_ilp

        result = plan_ilp(ev, pins, time_limit_s, progress)
        check_split_backward(result.plan, ev.pgraph)  # a pinned split schedule: refused here, not at run
        return PlanResult(result.plan, result.sim, ev, result.report)
    if method == "manual":
        if not split_at:
            raise PlanError("--method manual needs --split-at MODULE[,MODULE..] (where stages 1, 2, ... begin)")
        plan, sim = manual_plan(ev, split_at, pins)
    elif split_at:
        raise PlanError(f"--split-at pins stage boundaries for the ilp or manual methods, not for {method}")
    else:
        plan, sim = plan_baseline(method, ev, pins)
    check_split_backward(plan, ev.pgraph)
    return PlanResult(plan, sim, ev)


def manual_plan(ev: Evaluator, split_at: Sequence[str], pins: Pins = Pins()) -> tuple[Plan, SimResult]:
    """A plan whose stage ``i+1`` begins at the block named ``split_at[i]``.

    The mesh defaults to ``pp = len(split_at) + 1`` (times virtual stages),
    tp=1 and dp for the rest of the cluster; the schedule to 1F1B with
    micro-batch size 1.
    """
    started = time.perf_counter()
    n = len(ev.pgraph.blocks)
    starts = [ev.pgraph.block_index(m) for m in split_at]
    if starts != sorted(set(starts)) or (starts and starts[0] == 0):
        raise PlanError(
            "--split-at modules must be distinct, in model order, and after the first block "
            f"(got {', '.join(split_at)})"
        )
    bounds = [0, *starts, n]
    specs = [StageSpec.whole(range(bounds[i], bounds[i + 1]), bool(pins.recompute)) for i in range(len(bounds) - 1)]
    v = pins.virtual_stages or 1
    name = pins.schedule or ("interleaved" if v > 1 else "1f1b")
    if len(specs) % v:
        raise PlanError(f"{len(specs)} stages cannot be spread over virtual_stages={v} per rank")
    pp = len(specs) // v
    if pins.pp is not None and pins.pp != pp:
        raise PlanError(f"--mesh pp={pins.pp} contradicts --split-at, which makes {pp} pipeline stages")
    world = ev.cluster.world_size
    tp = pins.tp or 1
    if world % (pp * tp):
        raise PlanError(f"pp={pp} x tp={tp} does not divide the cluster's {world} devices")
    dp = world // (pp * tp)
    if pins.dp is not None and pins.dp != dp:
        raise PlanError(f"--mesh dp={pins.dp} contradicts pp={pp}, tp={tp} on {world} devices (dp must be {dp})")
    gb = ev.training.global_batch
    if gb % dp:
        raise PlanError(f"global batch {gb} is not divisible by dp={dp}")
    per_replica = gb // dp
    m = pins.microbatches or per_replica
    if per_replica % m:
        raise PlanError(f"--microbatches {m} does not divide the {per_replica} samples per replica")
    sharding: Mapping[str, str] = megatron_sharding(ev.captured, tp, bool(pins.sequence_parallel)) if tp > 1 else {}
    return ev.make_plan(
        specs,
        Mesh(pp, tp, dp),
        Schedule(name, m, per_replica // m, v),
        sharding=sharding,
        method="manual",
        status="MANUAL",
        started=started,
    )


def score_plan(
    plan: Plan,
    model: torch.nn.Module | CapturedModel | PartitionGraph,
    example_inputs: Sequence[Any] = (),
    cluster: Cluster | None = None,
    **kwargs: Any,
) -> PlanResult:
    """Check ``plan`` against ``model`` and ``cluster`` and re-simulate it under its own training set-up.

    Refuses (PlanError) a plan made for another model or cluster.
    """
    if cluster is None:
        raise PlanError("a cluster is required to score a plan")
    ev = prepare(model, example_inputs, cluster, training=plan.training, vocab_chunks=plan.model.vocab_chunks, **kwargs)
    plan.check_matches(ev.captured.fingerprint, cluster.to_dict())
    scored, sim = ev.score(plan)
    return PlanResult(scored, sim, ev)


def check_plan(
    plan: Plan, model: torch.nn.Module, example_inputs: Sequence[Any] = (),
    example_kwargs: Mapping[str, Any] | None = None,
) -> Plan:
    """``plan`` checked against ``model`` before anything runs: made for this model, consistent
    with itself and with the model's blocks, with each stage's nodes derived from its modules
    ([Note: what a stage holds] in plan.py). The runtime calls this on a given plan, so that
    ``autopart run`` and ``auto_parallelize(plan=...)`` refuse what ``plan --plan`` refuses.

    Captures ``model`` (a ``meta`` model too) at the plan's recorded input shapes."""
    from .capture import model_fingerprint

    plan.check_consistent()
    plan.check_matches(model_fingerprint(model))
    args = tuple(example_inputs)
    shapes = plan.model.input_shapes
    if shapes and len(shapes) == len(args):
        args = tuple(torch.zeros(s, dtype=a.dtype, device=a.device) if isinstance(a, torch.Tensor) else a
                     for s, a in zip(shapes, args))
    captured = capture(model, args, example_kwargs, name=plan.model.name, vocab_chunks=plan.model.vocab_chunks)
    pgraph = build_partition_graph(captured, model)
    plan = plan.with_blocks({b.name: tuple(captured.nodes[n].key for n in b.nodes) for b in pgraph.blocks})
    check_split_backward(plan, pgraph)
    return plan


def check_split_backward(plan: Plan, pgraph: PartitionGraph) -> None:
    """Refuse a split-backward plan with a weight that torch's split backward cannot reach on a stage
    other than the first ([Note: weights a split backward cannot reach] in graph.py). Raises PlanError."""
    if not schedule_spec(plan.schedule.name).splits_backward:
        return
    captured = pgraph.captured
    roots = set(pgraph.split_backward_roots)
    node_of_key = captured.node_of_key
    for st in plan.stages:
        if st.index == 0:
            continue
        for key in st.nodes:
            node = captured.nodes[node_of_key[key]]
            if node.name in roots:
                raise PlanError(
                    f"schedule {plan.schedule.name!r} cannot train {node.module or 'the model'} on stage {st.index}: "
                    "torch's split backward makes no gradient for a weight applied to inputs that need none "
                    f"(node {key}) outside the first stage; plan with --schedule 1f1b or interleaved, or put "
                    f"{node.module or 'that module'} on stage 0"
                )
