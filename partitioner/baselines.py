"""Baseline planners: how people partition models today, each producing a scored ``Plan``.

Each baseline is a *split rule* (which blocks go to which stage) and a *mesh
rule* (which tensor-parallel degrees it uses); everything else is tuned the
same way for all of them by one grid, ``tune`` (see [Note: fair baselines]).

* ``uniform``: an equal number of layers per stage, embedding with the first
  stage and head with the last (GPipe's and Megatron-LM's default); tp=1.
* ``params``: contiguous stages with balanced parameter counts (DeepSpeed's
  ``partition_method="parameters"``); tp=1.
* ``pipedream``: contiguous stages minimizing the slowest stage's time
  (compute plus its outgoing transfer), solved exactly by dynamic programming
  over the block chain (PipeDream's planner, without its replication); tp=1.
* ``megatron``: tensor parallel across the devices of a node, pipeline across
  nodes, data parallel over the rest, uniform layers (Megatron-LM's recipe).
* ``expert``: what a careful engineer does with Megatron-LM or torchtitan:
  every tensor-parallel degree inside a node (powers of two), every pipeline
  depth, the uniform split, and every data-parallel sharding level from the
  one asked for up to ZeRO-3 (dp_sharding.py) besides the grid below (which
  holds torch's zero-bubble schedules and Megatron's --sequence-parallel). It
  is the reference every other method is compared with.

[Note: fair baselines]
A baseline gets every freedom the compared method has except its split rule:
``tune`` tries, for each mesh its rule allows, every micro-batch size that
divides the per-replica batch, the schedules (GPipe, 1F1B, interleaved 1F1B
with each virtual-stage count ``v > 1`` that divides the layers and keeps a
layer per stage, and for pp > 1 the zero-bubble ones torch ships: ``zb`` with
v = 1 or those counts, ``zbv`` and ``dualpipev`` with v = 2), recomputation off and on
(never both recomputation and a split backward, nor FSDP with a split backward:
the runtime cannot run them, ``_runs``), and for tp > 1 Megatron's layout with
and without ``--sequence-parallel``, and keeps the fastest plan that fits by
the simulator. The zero-bubble schedules and sequence parallelism are in every
baseline's grid because the ILP's search reaches them too (it re-times its
plans under the zero-bubble schedules and chooses sequence parallelism per
node): leaving them out would measure them, not the split rule. The grid is
enumerated in a fixed order and visited in order of a lower bound on each
point's step time (perfectly balanced work, no communication:
``M W / pp + (W - W / pp) / v``, plus the recomputed forward; under a split
backward, whose weight gradients fill the bubble, ``M W / pp`` plus the last
rank's wait for its first input, ``(pp - 1) F / (pp v)``), stopping when the
bound reaches the best plan found: the result is the grid's optimum, and the
same on every machine (no clocks are read). Pins fix any axis of the grid.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

from .dp_sharding import DP_SHARDINGS, check_dp_sharding, hsdp_shard, spec as dp_spec
from .errors import InfeasibleError, PlanError
from .evaluate import Evaluator, StageSpec
from .plan import Mesh, Plan, Schedule
from .schedules import check_schedule, rank_stages, schedule_order, spec as schedule_spec, stage_rank
from .sharding import megatron_sharding
from .simulate import SimResult, busiest_rank_s

__all__ = [
    "METHODS", "REFERENCE", "Pins", "GridPoint", "TuneReport", "plan_baseline", "tune", "grid_points",
    "linear_partition", "uniform_partition", "with_dp_sharding", "dp_shardings_to_try", "hsdp_differs", "inflight_horizon",
    "micro_batch_sizes", "split_work_s",
]

METHODS = ("expert", "uniform", "params", "pipedream", "megatron")
REFERENCE = "expert"  # the method every speedup is measured against
# What the grid tries unless one is pinned: every schedule the registry knows (schedules.py), the
# zero-bubble ones included, since the ILP's search re-times its plans under them too
# ([Note: split-backward schedules] in solver/search.py).
TUNED_SCHEDULES = ("1f1b", "gpipe", "interleaved", "zb", "zbv", "dualpipev")
# How far above the best step a split's busiest rank must work before ``tune`` skips simulating it
# ([Note: pruning by the busiest rank]): the bound and the simulator sum the same costs in different
# orders, so a bound within rounding of the best step is simulated rather than trusted.
BOUND_SLACK = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class Pins:
    """Choices the user fixed; None means the planner decides."""

    pp: int | None = None
    tp: int | None = None
    dp: int | None = None
    microbatches: int | None = None  # micro-batches per step per data-parallel replica
    schedule: str | None = None  # a name of schedules.SCHEDULES
    virtual_stages: int | None = None  # stages per rank (interleaved, zb: any; zbv, dualpipev: 2)
    recompute: bool | None = None
    split_at: tuple[str, ...] = ()  # modules where a stage must begin (the ILP honours these)
    # The data-parallel sharding levels the search and the expert may choose from (dp_sharding.py);
    # empty: the user's ``training.dp_sharding`` and every level that shards more. A benchmark pins
    # ("none", "zero1") to plan as before ZeRO-2/3 and HSDP existed.
    dp_shardings: tuple[str, ...] = ()
    # The ILP's search re-chooses recomputation per block, with selective recomputation, where a plan
    # recomputes ([Note: recompute per block in the search]); False keeps whole stages only, as
    # before (a benchmark's "without"). The baselines always recompute whole stages.
    recompute_blocks: bool = True
    # Sequence parallelism with tp ([Note: sequence parallelism] in tp_strategies.py): None lets the
    # ILP choose it per node and the baselines' grid try Megatron's layout with and without it; True
    # gives the baselines Megatron's --sequence-parallel layout only; False keeps it out of both.
    sequence_parallel: bool | None = None

    def __post_init__(self) -> None:
        for level in self.dp_shardings:
            dp_spec(level)  # unknown names: a clear PlanError
        if self.schedule is not None:
            need = schedule_spec(self.schedule).virtual_stages  # unknown names: a clear PlanError
            if need is not None and self.virtual_stages is not None and self.virtual_stages != need:
                raise PlanError(
                    f"--virtual-stages {self.virtual_stages} does not suit --schedule {self.schedule}, "
                    f"which runs {need} stage(s) per rank"
                    + ("; use --schedule interleaved or zb" if need == 1 else f"; use --virtual-stages {need}")
                )
        elif self.virtual_stages is not None and self.virtual_stages > 1:
            # Virtual stages alone ask for the interleaved schedule.
            object.__setattr__(self, "schedule", "interleaved")


@dataclass(frozen=True, slots=True)
class GridPoint:
    """One point of the tuning grid: everything but the split."""

    mesh: Mesh
    schedule: Schedule
    recompute: bool
    dp_sharding: str  # a name of dp_sharding.REGISTRY
    # Megatron's layout with --sequence-parallel (tp > 1 only; [Note: sequence parallelism] in tp_strategies.py)
    sequence_parallel: bool = False
    lower_bound_s: float = 0.0  # no plan at this point can be faster (see [Note: fair baselines])

    def describe(self) -> str:
        s = self.schedule
        v = f" v={s.virtual_stages}" if s.virtual_stages > 1 else ""
        return (
            f"{self.mesh} {s.name}{v} {s.microbatches}x{s.micro_batch_size}"
            + (" sp" if self.sequence_parallel else "")
            + (" recompute" if self.recompute else "") + (f" {self.dp_sharding}" if self.dp_sharding != "none" else "")
        )


@dataclass
class TuneReport:
    """What one ``tune`` call did (counts only: they are the same on every machine)."""

    points: int = 0  # grid points enumerated
    evaluated: int = 0  # simulated
    pruned_bound: int = 0  # skipped: their lower bound reached the best plan found
    pruned_split: int = 0  # skipped after pricing their split: its busiest rank works longer than the best plan's step
    pruned_memory: int = 0  # skipped: the weights alone cannot fit


# A split rule: the stages' blocks for a mesh and schedule (``pp * v`` of them).
SplitRule = Callable[[Evaluator, Mesh, Schedule, dict], list[list[int]]]


def with_dp_sharding(ev: Evaluator, level: str) -> Evaluator:
    """``ev``, or an evaluator of the same model, cluster and costs with ``training.dp_sharding = level``."""
    if ev.training.dp_sharding == level:
        return ev
    return Evaluator(ev.pgraph, ev.cluster, ev.cost_model, replace(ev.training, dp_sharding=level), ev.memory_margin)


def dp_shardings_to_try(ev: Evaluator, pins: "Pins | None" = None) -> tuple[str, ...]:
    """The sharding levels a search may choose: ``pins.dp_shardings`` if given, else the one the user
    asked for and every level that shards more ([Note: sharding levels] in dp_sharding.py; only
    memory and collectives change)."""
    if pins is not None and pins.dp_shardings:
        return tuple(pins.dp_shardings)
    return DP_SHARDINGS[DP_SHARDINGS.index(ev.training.dp_sharding):]


def plan_baseline(method: str, ev: Evaluator, pins: Pins = Pins()) -> tuple[Plan, SimResult]:
    """The ``method`` baseline's plan: its split rule, tuned by ``tune`` (see [Note: fair baselines])."""
    if method not in METHODS:
        import difflib

        near = difflib.get_close_matches(method, METHODS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PlanError(f"method {method!r} is not one of {', '.join(METHODS)}{hint}")
    started = time.perf_counter()
    plan, sim, _ = tune(method, ev, _SPLITS[method], pins, tps=_tps(method, ev, pins),
                        dp_shardings=_dp_shardings(method, ev, pins))
    return replace(plan, solver=replace(plan.solver, wall_s=time.perf_counter() - started)), sim


def _tps(method: str, ev: Evaluator, pins: Pins) -> tuple[int, ...]:
    world, per_node = ev.cluster.world_size, ev.cluster.devices_per_node
    if pins.tp:
        if world % pins.tp:
            raise PlanError(f"--mesh tp={pins.tp} does not divide the cluster's {world} devices")
        return (pins.tp,)
    if method == "megatron":
        return (min(per_node, world),)
    if method == "expert":  # powers of two inside a node: a group across nodes pays the slow link
        return tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= min(per_node, world) and world % t == 0)
    return (1,)


def _dp_shardings(method: str, ev: Evaluator, pins: "Pins | None" = None) -> tuple[str, ...]:
    """The level asked for by the user stays; the expert also tries every level that shards more
    (or those ``pins.dp_shardings`` names)."""
    if method == "expert":
        return dp_shardings_to_try(ev, pins)
    return (ev.training.dp_sharding,)


def _split_uniform(ev: Evaluator, mesh: Mesh, schedule: Schedule, sharding: dict) -> list[list[int]]:
    return uniform_partition([b.is_layer for b in ev.pgraph.blocks], mesh.pp * schedule.virtual_stages)


def _split_params(ev: Evaluator, mesh: Mesh, schedule: Schedule, sharding: dict) -> list[list[int]]:
    k = mesh.pp * schedule.virtual_stages
    return linear_partition([float(b.param_count) for b in ev.pgraph.blocks], k, lambda j: 0.0)


def _split_pipedream(ev: Evaluator, mesh: Mesh, schedule: Schedule, sharding: dict) -> list[list[int]]:
    """Block time (forward + backward) plus the transfer out of the stage, balanced exactly."""
    k = mesh.pp * schedule.virtual_stages
    mbs = schedule.micro_batch_size
    times = []
    for b in ev.pgraph.blocks:
        t = ev.block_cost(b, mbs, mesh.tp, sharding).time
        times.append(t.forward_s + t.backward_s)
    scale = mbs / ev.captured.batch_size
    src, dst = mesh.rank(0), mesh.rank(1 % mesh.pp)

    def cut_cost(j: int) -> float:  # a stage ending before block j sends (and receives the gradient) once each
        return 2 * ev.cost_model.p2p_time(ev.pgraph.boundary_bytes(j) * scale / mesh.tp, src, dst)

    return linear_partition(times, k, cut_cost)


_SPLITS: dict[str, SplitRule] = {
    "expert": _split_uniform,
    "uniform": _split_uniform,
    "params": _split_params,
    "pipedream": _split_pipedream,
    "megatron": _split_uniform,
}
_UNIFORM = {"expert", "uniform", "megatron"}  # split rules that need a layer per stage


def grid_points(
    method: str, ev: Evaluator, pins: Pins, tps: Sequence[int], dp_shardings: Sequence[str]
) -> Iterator[GridPoint]:
    """Every point of ``method``'s grid, in a fixed order (bounds not yet set).

    Raises PlanError where the pins contradict the cluster, the model or the batch.
    """
    world, per_node = ev.cluster.world_size, ev.cluster.devices_per_node
    n_blocks = len(ev.pgraph.blocks)
    n_layers = sum(b.is_layer for b in ev.pgraph.blocks) or n_blocks
    units = n_layers if method in _UNIFORM else n_blocks  # what each stage needs at least one of
    gb = ev.training.global_batch
    for tp in tps:
        rest = world // tp
        # Megatron's layout with and without --sequence-parallel, unless pinned; nothing to split at tp = 1.
        sps = ([bool(pins.sequence_parallel)] if pins.sequence_parallel is not None else [False, True]) if tp > 1 else [False]
        if pins.pp and pins.dp:
            if pins.pp * pins.dp * tp != world:
                raise PlanError(
                    f"--mesh pp={pins.pp},tp={tp},dp={pins.dp} uses {pins.pp * pins.dp * tp} devices, the cluster has {world}"
                )
            pps = [pins.pp]
        elif pins.pp:
            if rest % pins.pp:
                if len(tps) > 1:
                    continue
                raise PlanError(f"--mesh pp={pins.pp} does not divide the {rest} devices left after tp={tp}")
            pps = [pins.pp]
        elif pins.dp:
            if rest % pins.dp:
                if len(tps) > 1:
                    continue
                raise PlanError(f"--mesh dp={pins.dp} does not divide the {rest} devices left after tp={tp}")
            pps = [rest // pins.dp]
        else:
            pps = [p for p in range(1, rest + 1) if rest % p == 0 and p <= units]
            if method == "megatron":  # pipeline across nodes: a stage spans whole nodes when it can
                nodes = max(1, world // per_node)
                pps = [p for p in pps if nodes % p == 0] or pps
        for pp in pps:
            dp = rest // pp
            if gb % dp:
                if pins.dp or (pins.pp and len(pps) == 1 and len(tps) == 1):
                    raise PlanError(f"global batch {gb} is not divisible by dp={dp}; pick a batch that is")
                continue
            per_replica = gb // dp
            for mbs in micro_batch_sizes(per_replica, pins.microbatches, range(1, per_replica + 1)):
                m = per_replica // mbs
                for name, v in _schedules(pins, pp, m, n_layers, units):
                    for recompute in ([pins.recompute] if pins.recompute is not None else [False, True]):
                        if recompute and schedule_spec(name).splits_backward:
                            continue  # torch cannot run it yet (schedules.check_recompute)
                        for z in (dp_shardings if dp > 1 else dp_shardings[:1]):  # nothing to shard without dp
                            if dp > 1 and not (_runs(z, name, recompute) and hsdp_differs(ev, z, tp, dp)):
                                continue
                            for sp in sps:
                                yield GridPoint(Mesh(pp, tp, dp), Schedule(name, m, mbs, v), recompute, z, sp)


def hsdp_differs(ev: Evaluator, level: str, tp: int, dp: int) -> bool:
    """False for ``hsdp`` where the dp group spreads unevenly over nodes, or (unless the user asked
    for it) where it is another level: a group in one node (ZeRO-3) or one rank per node; True for
    every other level."""
    if not dp_spec(level).within_node:
        return True
    try:
        shard = hsdp_shard(Mesh(1, tp, dp).dp_group(0), ev.cluster.node_of)
    except PlanError:
        return False
    return level == ev.training.dp_sharding or 1 < shard < dp


def _runs(level: str, schedule: str, recompute: bool) -> bool:
    """Whether the runtime runs sharding ``level`` with ``schedule`` and ``recompute`` (dp_sharding.py)."""
    try:
        check_dp_sharding(level, schedule, schedule_spec(schedule).splits_backward, recompute)
    except PlanError:
        return False
    return True


def _schedules(pins: Pins, pp: int, m: int, n_layers: int, units: int) -> list[tuple[str, int]]:
    """(schedule, virtual stages) pairs of the grid at this ``pp`` and ``m`` that torch can run."""
    names = [pins.schedule] if pins.schedule else list(TUNED_SCHEDULES)
    out = []
    for name in names:
        if pp == 1 and not pins.schedule and schedule_spec(name).splits_backward:
            continue  # one rank has no bubble to fill (the ILP's search does not re-time pp = 1 either)
        fixed = schedule_spec(name).virtual_stages
        if pins.virtual_stages:
            vs = [pins.virtual_stages]
        elif fixed is not None:
            vs = [fixed]
        else:  # Megatron's interleaving: chunks that divide the layers evenly
            vs = [v for v in range(2, n_layers + 1) if n_layers % v == 0]
            if name != "interleaved":
                vs = [1] + vs
        for v in vs:
            if v > 1 and (pp == 1 or pp * v > units):  # with v = 1 the split rule says why it cannot
                continue
            try:
                check_schedule(name, pp, m, v)  # the registry's rules: what torch refuses, we never plan
            except PlanError:
                continue
            out.append((name, v))
    return out


def tune(
    method: str,
    ev: Evaluator,
    split: SplitRule,
    pins: Pins = Pins(),
    *,
    tps: Sequence[int] = (1,),
    dp_shardings: Sequence[str] | None = None,
    report: TuneReport | None = None,
    prune: bool = True,
) -> tuple[Plan, SimResult, TuneReport]:
    """The fastest plan that fits over ``method``'s grid with the ``split`` rule (see [Note: fair baselines]).

    Deterministic: the grid is enumerated in a fixed order, visited in order of
    its lower bounds (ties by description), and pruned only by lower bounds.
    ``prune=False`` simulates every point that may fit, in the same order (the
    tests' reference: the result is the same).

    [Note: pruning by the busiest rank]
    Past the grid point's bound (which knows no split), a point's split is
    known, and its busiest rank's work (``simulate.busiest_rank_s``: every
    micro-batch's forward and backward of its stages, plus its once-per-step
    work) is a lower bound of its simulated step. It is checked twice: first
    from the blocks' compute alone (``split_work_s``, never above the priced
    bound), before the stages are priced; then from the priced stages (``stage_costs``), before the
    memory check and the simulation. A point is kept only if its step is
    *strictly* shorter than the best so far, so a point whose bound exceeds
    the best step cannot win, nor tie and win, and is skipped. The bound
    must exceed the best step by ``BOUND_SLACK`` (relative), more than the
    rounding between the sums, which add the same terms in other orders.
    Where ranks share cores ([Note: ranks sharing cores] in evaluate.py), a
    rank's priced work can run up to ``oversubscribed`` times faster (alone on
    a core), so every bound here is divided by it (``floor``; 1 elsewhere).
    """
    report = report or TuneReport()
    dp_shardings = tuple(dp_shardings) if dp_shardings is not None else (ev.training.dp_sharding,)
    evs = {z: with_dp_sharding(ev, z) for z in dp_shardings}
    limit = ev.usable_memory_bytes  # the reserve and the memory margin kept free
    floor = 1.0 / ev.overheads.oversubscribed  # the least share of its priced work a rank takes (pruning's bounds)
    shardings: dict[tuple[int, bool], dict] = {}  # (tp, sequence parallel) -> Megatron's layout
    work: dict[tuple[int, bool, int], tuple[float, float]] = {}  # (tp, sp, mbs) -> (forward + backward, forward) per micro-batch
    # (tp, sp, mbs) -> per block, (forward + backward, forward) per micro-batch ([Note: pruning by the busiest rank])
    block_work: dict[tuple[int, bool, int], tuple[list[float], list[float]]] = {}
    static: dict[tuple[int, bool, int, str], float] = {}  # (tp, sp, dp, dp_sharding) -> all static bytes of one tp rank

    def sharding_for(pt: GridPoint) -> dict:
        key = (pt.mesh.tp, pt.sequence_parallel)
        if key not in shardings:
            shardings[key] = megatron_sharding(ev.captured, pt.mesh.tp, pt.sequence_parallel) if pt.mesh.tp > 1 else {}
        return shardings[key]

    points = []
    heaviest: tuple[tuple[float, bool], GridPoint] | None = None  # the lightest point pruned for its weights
    for pt in grid_points(method, ev, pins, tps, dp_shardings):
        report.points += 1
        tp, sp, mbs = pt.mesh.tp, pt.sequence_parallel, pt.schedule.micro_batch_size
        if (tp, sp, mbs) not in work:
            costs = [ev.block_cost(b, mbs, tp, sharding_for(pt)).time for b in ev.pgraph.blocks]
            work[(tp, sp, mbs)] = (sum(c.forward_s + c.backward_s for c in costs), sum(c.forward_s for c in costs))
            block_work[(tp, sp, mbs)] = ([c.forward_s + c.backward_s for c in costs], [c.forward_s for c in costs])
        key = (tp, sp, pt.mesh.dp, pt.dp_sharding)
        if key not in static:
            split_params = ev.split_params(sharding_for(pt)) if tp > 1 else set()
            static[key] = float(evs[pt.dp_sharding].resident_bytes(ev.captured.params, tp, pt.mesh.dp, split_params)[0])
        if static[key] / pt.mesh.pp > limit:  # even a perfect split of the weights cannot fit
            report.pruned_memory += 1
            if heaviest is None or (static[key] / pt.mesh.pp, not pt.recompute) < heaviest[0]:
                heaviest = ((static[key] / pt.mesh.pp, not pt.recompute), pt)
            continue
        w, f = work[(tp, sp, mbs)]
        if pt.recompute:
            w += f
        pp, v, m = pt.mesh.pp, pt.schedule.virtual_stages, pt.schedule.microbatches
        avg = w / pp
        if schedule_spec(pt.schedule.name).splits_backward:
            # Weight gradients fill the bubble; only the last rank's wait for its first input remains.
            bound = m * avg + (pp - 1) * f / (pp * v)
        else:
            bound = m * avg + (w - avg) / v
        points.append(replace(pt, lower_bound_s=bound * floor))
    points.sort(key=lambda p: (p.lower_bound_s, p.describe()))
    best: tuple[Plan, SimResult] | None = None
    smallest: tuple[float, GridPoint, list[StageSpec]] | None = None  # the smallest footprint seen, for the error
    split_error: PlanError | None = None
    for pt in points:
        if prune and best is not None and pt.lower_bound_s >= best[0].predicted.step_time_s:
            report.pruned_bound += 1
            continue
        e = evs[pt.dp_sharding]
        sharding = sharding_for(pt)
        try:
            blocks = split(e, pt.mesh, pt.schedule, sharding)
        except PlanError as exc:
            split_error = exc  # this split rule has no split here (e.g. more stages than layers)
            continue
        specs = [StageSpec.whole(b, pt.recompute) for b in blocks]
        if (schedule_spec(pt.schedule.name).splits_backward and not pins.schedule
                and e.pgraph.split_backward_refused(blocks)):  # [Note: weights a split backward cannot reach]
            continue
        if prune and best is not None:  # [Note: pruning by the busiest rank]
            fb, f = block_work[(pt.mesh.tp, pt.sequence_parallel, pt.schedule.micro_batch_size)]
            if split_work_s(blocks, fb, f if pt.recompute else None, pt.schedule, pt.mesh.pp) * floor > \
                    best[0].predicted.step_time_s * (1 + BOUND_SLACK):
                report.pruned_split += 1
                continue
        costs = e.stage_costs(specs, pt.mesh, pt.schedule, sharding)
        if prune and best is not None and busiest_rank_s(
            costs, pt.schedule.name, pt.schedule.microbatches, pt.mesh.pp
        ) * floor > best[0].predicted.step_time_s * (1 + BOUND_SLACK):
            report.pruned_split += 1
            continue
        need = _peak_memory(costs, pt.schedule, pt.mesh.pp)
        if need > limit:  # the simulator's own peak, without simulating: this point cannot fit
            report.pruned_memory += 1
            if smallest is None or need < smallest[0]:
                smallest = (need, pt, specs)
            continue
        plan, sim = e.make_plan(specs, pt.mesh, pt.schedule, sharding=sharding, method=method)
        report.evaluated += 1
        if plan.predicted.fits and (best is None or plan.predicted.step_time_s < best[0].predicted.step_time_s):
            best = (plan, sim)
    if best is not None:
        return best[0], best[1], report
    if smallest is None and heaviest is None:
        raise split_error or _no_point_error(method, ev, pins)
    if smallest is None:  # every point was pruned for its weights: price the lightest for the message
        pt = heaviest[1]
        specs = [StageSpec.whole(b, pt.recompute) for b in split(evs[pt.dp_sharding], pt.mesh, pt.schedule, sharding_for(pt))]
    else:
        _, pt, specs = smallest
    plan, _ = evs[pt.dp_sharding].make_plan(specs, pt.mesh, pt.schedule, sharding=sharding_for(pt), method=method)
    # A smaller batch only shrinks activations: no help when the weights and optimizer state alone overflow.
    limit_b = plan.predicted.memory_limit_bytes
    static = max((st.predicted.static_bytes for st in plan.stages if st.predicted), default=0)
    more = "more processes (--cluster local-cpu:N)" if ev.cluster.name == "local-cpu" else "more devices (--nodes)"
    raise InfeasibleError(
        f"no {method} plan fits in device memory: the smallest-footprint plan ({plan.mesh}, "
        f"recompute={bool(plan.stages[0].recompute)}, dp_sharding={plan.training.dp_sharding}) needs {_fmt_bytes(plan.predicted.peak_memory_bytes)} per device, but "
        f"{ev.cluster.device.name} allows {_fmt_bytes(limit_b)} (after the "
        f"{ev.training.memory_reserve:.0%} reserve); "
        f"use {more}" + ("" if plan.training.dp_sharding == "zero3" else ", or --dp-sharding zero3")
        + ("" if static > limit_b else ", or a smaller --global-batch or micro-batch")
    )


def split_work_s(
    blocks: Sequence[Sequence[int]], work_s: Sequence[float], replay_s: Sequence[float] | None, schedule: Schedule,
    pp: int,
) -> float:
    """A lower bound of ``simulate.busiest_rank_s`` of the plan whose stages hold ``blocks``, from the
    blocks' own compute alone: ``M`` times the most per-micro-batch work (``work_s``, each block's
    forward and backward, plus ``replay_s``, its forward again, where the stages recompute) that one
    rank's stages hold. The stages' costs add only non-negative terms to these sums (per-action
    overhead, FSDP's exposed collectives, the once-per-step work), so pricing them can only raise it
    ([Note: pruning by the busiest rank])."""
    layout = schedule_spec(schedule.name).layout
    per_rank = [0.0] * pp
    for s, part in enumerate(blocks):
        w = sum(work_s[b] for b in part)
        if replay_s is not None:
            w += sum(replay_s[b] for b in part)
        per_rank[stage_rank(s, pp, layout)] += w
    return schedule.microbatches * max(per_rank)


def _peak_memory(costs, schedule: Schedule, pp: int) -> float:
    """A lower bound of the largest per-rank peak the simulator finds (static, buffers and activations in
    flight, or the optimizer step), without simulating.

    In-flight counts change only at a rank's own actions, so they depend on the schedule's
    order alone: each rank's distinct count vectors over its chunks are computed once per
    schedule shape (``_inflight_counts``) and reused.
    """
    sp = schedule_spec(schedule.name)
    patterns = _inflight_counts(schedule.name, pp, inflight_horizon(schedule.name, pp, schedule.microbatches,
                                                                    schedule.virtual_stages), schedule.virtual_stages)
    peak = 0.0
    for r, pats in enumerate(patterns):
        mine = [costs[st] for st in rank_stages(r, pp, schedule.virtual_stages, sp.layout)]
        act = max(sum(n * c.activation_bytes for n, c in zip(pat, mine)) for pat in pats)
        # A lower bound of the simulator's walk ([Note: memory over the step] in simulate.py): the
        # gradients made afresh may not exist yet at the in-flight peak; the optimizer step has them.
        during = sum(c.static_bytes - c.fresh_grad_bytes + c.buffer_bytes for c in mine) + act
        step = sum(c.static_bytes + c.buffer_bytes for c in mine) + max(c.optimizer_workspace_bytes for c in mine)
        peak = max(peak, during, step)
    return peak


@functools.lru_cache(maxsize=1024)
def _inflight_counts(name: str, pp: int, microbatches: int, virtual_stages: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per rank, the distinct vectors of micro-batches in flight on each of its chunks over the
    schedule's order, sorted. A function of the schedule's shape alone, so kept for the whole
    process: every baseline's grid (and the search's seeds) meets the same shapes."""
    if name == "gpipe":
        return (((microbatches,),),) * pp
    if name == "1f1b":
        return tuple(((min(pp - r, microbatches),),) for r in range(pp))
    layout = schedule_spec(name).layout
    patterns = []
    for r, order in enumerate(schedule_order(name, pp, microbatches, virtual_stages)):
        mine = rank_stages(r, pp, virtual_stages, layout)
        counts = [0] * len(mine)
        seen = set()
        for a in order:
            # Activations are held from F until the backward that frees them: B, or W
            # where the backward is split (I keeps them; [Note: zero-bubble memory]).
            if a.kind == "F":
                counts[mine.index(a.stage)] += 1
                seen.add(tuple(counts))
            elif a.kind in ("B", "W"):
                counts[mine.index(a.stage)] -= 1
        patterns.append(tuple(sorted(seen)))
    return tuple(patterns)


def inflight_horizon(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> int:
    """The fewest micro-batches whose in-flight patterns are those of ``microbatches`` (interleaved).

    The interleaved order is a warm-up of at most ``2 (pp - 1) + (v - 1) pp`` forwards, then
    forward/backward pairs whose chunk sequence repeats every ``pp v`` actions, then a drain
    that only lowers the counts. Once the steady part spans a whole period, more micro-batches
    visit no new in-flight vector: four groups of ``pp`` are always enough.
    """
    if schedule != "interleaved" or virtual_stages == 1:
        return microbatches
    return min(microbatches, 4 * pp)


def _no_point_error(method: str, ev: Evaluator, pins: Pins) -> PlanError:
    gb, world = ev.training.global_batch, ev.cluster.world_size
    if pins.schedule and pins.pp and pins.microbatches:  # the registry's rule, if that is what refused them
        v = pins.virtual_stages or schedule_spec(pins.schedule).virtual_stages or 1
        try:
            check_schedule(pins.schedule, pins.pp, pins.microbatches, v)
        except PlanError as exc:
            return exc
    if pins.microbatches:
        return PlanError(
            f"--microbatches {pins.microbatches} does not divide the samples each data-parallel replica gets "
            f"(global batch {gb}) for any mesh {method} may use on {world} devices; pick another count"
        )
    return PlanError(
        f"no mesh fits the pins and the model for {method}: {len(ev.pgraph.blocks)} blocks, {world} devices, "
        f"global batch {gb}; pin fewer choices or change the batch"
    )


def _fmt_bytes(n: float) -> str:
    """GiB with two decimals, or MiB below 1 GiB, so a small shortfall never prints as 0.0 GiB."""
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.2f} MiB"


def uniform_partition(is_layer: Sequence[bool], k: int) -> list[list[int]]:
    """Split the layer blocks into ``k`` runs of equal length (earlier stages take the remainder).

    Non-layer blocks before the first layer go to the first stage, the others
    to the stage of the layer before them.
    """
    layers = [i for i, l in enumerate(is_layer) if l] or list(range(len(is_layer)))
    if len(layers) < k:
        raise PlanError(f"the model has {len(layers)} layers, fewer than the {k} stages asked for; use fewer stages")
    q, r = divmod(len(layers), k)
    stage_of_layer: dict[int, int] = {}
    pos = 0
    for s in range(k):
        for _ in range(q + (1 if s < r else 0)):
            stage_of_layer[layers[pos]] = s
            pos += 1
    stages: list[list[int]] = [[] for _ in range(k)]
    current = 0
    for i in range(len(is_layer)):
        current = stage_of_layer.get(i, current)
        stages[current].append(i)
    return stages


# Micro-batch sizes the ILP's search tries: the divisors of the per-replica batch up to 8, and powers of two
# up to 32 (the baselines' grids try every divisor).
SEARCH_MICRO_BATCH_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


def micro_batch_sizes(per_replica: int, microbatches: int | None, candidates: Iterable[int]) -> list[int]:
    """Micro-batch sizes to try for ``per_replica`` samples per data-parallel replica: the one
    that ``microbatches`` (pinned) gives, if it divides, else every candidate that divides."""
    if microbatches:
        return [per_replica // microbatches] if per_replica % microbatches == 0 else []
    return [b for b in candidates if per_replica % b == 0]


def linear_partition(weights: Sequence[float], k: int, cut_cost: Callable[[int], float]) -> list[list[int]]:
    """Contiguous split of ``weights`` into ``k`` non-empty parts minimizing the largest part.

    A part ``i..j-1`` that is not the last costs ``sum(weights[i:j]) + cut_cost(j)``.
    Exact dynamic programming, O(n^2 k): ``best[s][j]`` is the smallest possible
    maximum over the first ``s`` parts covering ``weights[:j]``. Ties prefer the
    earliest cut, so the result is deterministic.
    """
    n = len(weights)
    if k > n:
        raise PlanError(f"cannot split {n} blocks into {k} non-empty stages; use at most {n} stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    cuts = [cut_cost(j) if 0 < j < n else 0.0 for j in range(n + 1)]
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            b, a = inf, s - 1
            for i in range(s - 1, j):
                if best[s - 1][i] == inf:
                    continue
                part = prefix[j] - prefix[i] + cuts[j]
                v = best[s - 1][i] if best[s - 1][i] > part else part
                if v < b - 1e-15:
                    b, a = v, i
            best[s][j], arg[s][j] = b, a
    bounds = [n]
    for s in range(k, 0, -1):
        bounds.append(arg[s][bounds[-1]])
    bounds.reverse()
    return [list(range(bounds[s], bounds[s + 1])) for s in range(k)]
