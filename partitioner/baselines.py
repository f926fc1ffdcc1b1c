"""Baseline planners: how people partition models today, each producing a scored ``Plan``.

* ``uniform``: an equal number of layers per stage, embedding with the first
  stage and head with the last (GPipe's and Megatron-LM's default).
* ``params``: contiguous stages with balanced parameter counts (DeepSpeed's
  ``partition_method="parameters"``).
* ``pipedream``: contiguous stages minimizing the slowest stage's time
  (compute plus its outgoing transfer), solved exactly by dynamic programming
  over the block chain (PipeDream's planner, without its replication).
* ``megatron``: tensor parallel across the devices of a node, pipeline across
  nodes, data parallel over the rest, uniform layers (Megatron-LM's recipe).

The three pipeline-only methods use tp=1. Unless pinned, every method takes
the fewest pipeline stages whose plan fits in memory, trying without and then
with activation recomputation, as a person tuning by hand would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import InfeasibleError, PlanError
from .evaluate import Evaluator, StageSpec
from .plan import Mesh, Plan, Schedule
from .schedules import check_schedule, spec as schedule_spec
from .sharding import megatron_sharding
from .simulate import SimResult

__all__ = ["METHODS", "Pins", "plan_baseline", "linear_partition", "uniform_partition"]

METHODS = ("uniform", "params", "pipedream", "megatron")


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

    def __post_init__(self) -> None:
        # Virtual stages alone ask for the interleaved schedule.
        if self.schedule is not None:
            need = schedule_spec(self.schedule).virtual_stages
            if need is not None and self.virtual_stages is not None and self.virtual_stages != need:
                raise PlanError(
                    f"--virtual-stages {self.virtual_stages} does not suit --schedule {self.schedule}, "
                    f"which runs {need} stage(s) per rank"
                    + ("; use --schedule interleaved or zb" if need == 1 else f"; use --virtual-stages {need}")
                )
        elif self.virtual_stages is not None and self.virtual_stages > 1:
            object.__setattr__(self, "schedule", "interleaved")


def plan_baseline(method: str, ev: Evaluator, pins: Pins = Pins()) -> tuple[Plan, SimResult]:
    """The ``method`` baseline's plan for the evaluator's model, cluster and training set-up."""
    if method not in METHODS:
        raise PlanError(f"method {method!r} is not one of {', '.join(METHODS)}")
    started = time.perf_counter()
    world = ev.cluster.world_size
    n_blocks = len(ev.pgraph.blocks)
    tp = pins.tp or (min(ev.cluster.devices_per_node, world) if method == "megatron" else 1)
    if world % tp:
        raise PlanError(f"--mesh tp={tp} does not divide the cluster's {world} devices")
    sharding = megatron_sharding(ev.captured, tp) if tp > 1 else {}
    n_layers = sum(b.is_layer for b in ev.pgraph.blocks) or n_blocks
    mesh_pinned = pins.pp is not None or pins.dp is not None
    tried: list[tuple[Plan, SimResult]] = []
    skipped: PlanError | None = None  # why the last unpinned mesh was passed over
    for mesh in _meshes(world, tp, pins, n_blocks, method, ev.cluster.devices_per_node):
        schedule_name = pins.schedule or "1f1b"
        v = pins.virtual_stages or schedule_spec(schedule_name).virtual_stages or (2 if schedule_name == "interleaved" else 1)
        if ev.training.global_batch % mesh.dp and not pins.dp:
            continue  # this many replicas cannot share the batch evenly
        if method in ("uniform", "megatron") and mesh.pp * v > n_layers and not pins.pp:
            continue  # uniform_partition needs a layer per stage; with pp pinned it says so itself
        try:
            mbs, m = _micro_batching(ev.training.global_batch, mesh.dp, pins.microbatches)
        except PlanError as exc:
            if mesh_pinned:
                raise
            skipped = exc  # --microbatches fits another dp; keep looking
            continue
        if pins.schedule is None and v == 1 and m < mesh.pp:
            schedule_name = "gpipe"  # torch's 1F1B refuses fewer micro-batches than ranks; GPipe runs them
        try:
            check_schedule(schedule_name, mesh.pp, m, v)
        except PlanError:
            if pins.microbatches:
                raise
            continue
        if mesh.pp * v > n_blocks:
            continue
        schedule = Schedule(schedule_name, m, mbs, v)
        blocks = _partition(method, ev, mesh, schedule, sharding)
        for recompute in ([pins.recompute] if pins.recompute is not None else [False, True]):
            specs = [StageSpec(tuple(b), recompute) for b in blocks]
            plan, sim = ev.make_plan(specs, mesh, schedule, sharding=sharding, method=method, started=started)
            tried.append((plan, sim))
            if plan.predicted and plan.predicted.fits:
                return plan, sim
    if not tried:
        if skipped is not None:
            raise PlanError(f"{skipped} (nor for any other dp this cluster allows)")
        raise PlanError(
            f"no mesh fits the pins and the model: {n_blocks} blocks, {world} devices, "
            f"global batch {ev.training.global_batch}; pin fewer choices or change the batch"
        )
    best = min(tried, key=lambda ps: ps[0].predicted.peak_memory_bytes)
    need = best[0].predicted.peak_memory_bytes
    limit = best[0].predicted.memory_limit_bytes
    raise InfeasibleError(
        f"no {method} plan fits in device memory: the smallest-footprint plan ({best[0].mesh}, "
        f"recompute={best[0].stages[0].recompute}) needs {_fmt_bytes(need)} per device, but "
        f"{ev.cluster.device.name} allows {_fmt_bytes(limit)} (after the {ev.training.memory_reserve:.0%} reserve); "
        "use more devices (--nodes), a smaller --global-batch or micro-batch, or ZeRO-1"
    )


def _fmt_bytes(n: float) -> str:
    """GiB with two decimals, or MiB below 1 GiB, so a small shortfall never prints as 0.0 GiB."""
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.2f} MiB"


def _meshes(world: int, tp: int, pins: Pins, n_blocks: int, method: str, per_node: int) -> list[Mesh]:
    rest = world // tp
    if pins.pp and pins.dp:
        if pins.pp * pins.dp * tp != world:
            raise PlanError(f"--mesh pp={pins.pp},tp={tp},dp={pins.dp} uses {pins.pp * pins.dp * tp} devices, the cluster has {world}")
        return [Mesh(pins.pp, tp, pins.dp)]
    if pins.pp:
        if rest % pins.pp:
            raise PlanError(f"--mesh pp={pins.pp} does not divide the {rest} devices left after tp={tp}")
        return [Mesh(pins.pp, tp, rest // pins.pp)]
    if pins.dp:
        if rest % pins.dp:
            raise PlanError(f"--mesh dp={pins.dp} does not divide the {rest} devices left after tp={tp}")
        return [Mesh(rest // pins.dp, tp, pins.dp)]
    pps = [p for p in range(1, rest + 1) if rest % p == 0 and p <= n_blocks]
    if method == "megatron":
        # Pipeline across nodes: a stage spans whole nodes' worth of tp groups when it can.
        nodes = max(1, world // per_node)
        pps = [p for p in pps if nodes % p == 0] or pps
    return [Mesh(p, tp, rest // p) for p in pps]


def _micro_batching(global_batch: int, dp: int, microbatches: int | None) -> tuple[int, int]:
    """(micro_batch_size, microbatches) for one data-parallel replica."""
    if global_batch % dp:
        raise PlanError(f"global batch {global_batch} is not divisible by dp={dp}; pick a batch that is")
    per_replica = global_batch // dp
    if microbatches is None:
        return 1, per_replica  # micro-batch size 1: the smallest bubble and activation footprint
    if per_replica % microbatches:
        raise PlanError(
            f"--microbatches {microbatches} does not divide the {per_replica} samples each of the dp={dp} replicas gets"
        )
    return per_replica // microbatches, microbatches


def _partition(method: str, ev: Evaluator, mesh: Mesh, schedule: Schedule, sharding) -> list[list[int]]:
    k = mesh.pp * schedule.virtual_stages
    blocks = ev.pgraph.blocks
    if method in ("uniform", "megatron"):
        return uniform_partition([b.is_layer for b in blocks], k)
    if method == "params":
        return linear_partition([float(b.param_count) for b in blocks], k, lambda j: 0.0)
    # pipedream: block time (forward + backward) plus the transfer out of the stage.
    mbs = schedule.micro_batch_size
    times = []
    for b in blocks:
        t = ev.block_cost(b, mbs, mesh.tp, sharding).time
        times.append(t.forward_s + t.backward_s)
    scale = mbs / ev.captured.batch_size
    src, dst = mesh.rank(0), mesh.rank(1 % mesh.pp)

    def cut_cost(j: int) -> float:  # a stage ending before block j sends (and receives the gradient) once each
        return 2 * ev.cost_model.p2p_time(ev.pgraph.boundary_bytes(j) * scale / mesh.tp, src, dst)

    return linear_partition(times, k, cut_cost)


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
