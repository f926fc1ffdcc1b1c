"""Calibration on the live process group: link alpha-beta and device efficiencies, into a cluster file.

``autopart calibrate`` runs under ``torchrun`` on the machines a plan will use
(gloo on CPU, NCCL on GPUs). It times point-to-point transfers and the
all-reduce, all-gather, reduce-scatter and broadcast the planner prices, at
several sizes, on groups inside a node and across nodes; fits each link
class's latency and bandwidth to the transfers, and each collective's factor
over the ring formulas ``cost_models.AnalyticCostModel`` uses; times a GEMM and a streaming op on every rank at once for the device's
matmul and memory efficiencies; and writes the result as a cluster TOML that
``--cluster`` reads. It sits beside the profiler: the profiler measures a
model's ops, this measures the cluster they run on.

[Note: fitting alpha-beta]
The analytic model prices a ring collective over ``k`` ranks of one link as
``c_lat * alpha + c_bw * S / B``, with (all-reduce) ``c_lat = 2 (k-1)``,
``c_bw = 2 (k-1) / k``, half of both for all-gather and reduce-scatter, and
``1, 1`` for a point-to-point send; ``S`` is the whole tensor (an all-gather's
output, a reduce-scatter's input). The link's ``(alpha, 1 / B)`` are fitted to
the point-to-point measurements (a ping-pong between two ranks), each one
linear equation, by non-negative least squares on relative error (small and
large messages count alike). The collectives are measured at the same sizes,
and each kind's median time over the ring model on that link becomes
``overheads.<kind>_factor``, by which the cost model multiplies it. Fitting
the transfers and the collectives together, as before, gave one link that
fitted neither (a mean error of 34-41% on the transfers and 30-80% on the
collectives, on the 2-core CPU of development): gloo's all-reduce of 2 ranks
took 1.7-2.4x the ring's time on the transfers' link (the median over sizes,
in three calibrations), its all-gather 2.8-4.2x, its reduce-scatter 4.2-7.3x
(benchmarks/results/2026-12-05-collectives.md). The fitted ``B`` is what a
transfer reaches, so the file's ``efficiency.comm`` is set to 1. Inter-node
links can only be measured when the job spans nodes; otherwise the base
cluster's figures are kept, and the report says so.

[Note: measured device efficiencies]
Rank 0 times a square GEMM and a large elementwise add alone, the other ranks
waiting, in CPU time on a CPU (the process's own work: what the profiler
measures with ``--clock cpu``, which ``plan --profile`` uses on such a
cluster); its rate over
the device's peak becomes ``efficiency.matmul`` (and ``elementwise`` for
bandwidth). If a rate beats the file's peak (the ``local-cpu`` peaks are
estimates), the peak is raised to the measured rate and the efficiency set
to 1. Then every rank times the same at once, as ranks run during training:
on a CPU they share cores and memory bandwidth (4 ranks on 2 cores run at
half speed). ``overheads.compute_slowdown``, by which the evaluator scales
every op's compute (CPU time becomes the wall time of a rank among the
others), is two factors:

* contention: the slowest rank's CPU time of the work with every rank at
  once, over rank 0's alone (shared caches and memory bandwidth), the median
  over ``SLOWDOWN_ROUNDS`` rounds, each timing the work alone and then at
  once, so that both sides of a ratio see the same machine;
* oversubscription: ``max(1, ranks / cores)``, the ranks of this node over
  the cores the process may run on (``os.sched_getaffinity``): more ranks
  than cores time-slice. Each rank has one intra-op thread (torchrun's
  default); with more, the profile's CPU time adds the threads' work and is
  no longer the rank's wall time alone, which this figure does not model.
  Nor does it see a container's CPU quota (cgroup ``cpu.max``) below its
  cores, which a wall-time ratio would.

CPU time, not wall time, because wall time also counts whatever else runs
for a moment: another process, or the hypervisor's steal. Measured on this
2-core machine beside a busy process (``benchmarks/slowdown_load.py``,
benchmarks/results/2026-12-05-slowdown-load.md), the wall-time ratio read a
median 1.93 while it ran, the CPU-time ratio 1.03; the fidelity benchmark's
per-layout calibrations had given 1.02-1.23 for most 2-rank layouts and
1.58, 1.75 and 1.90 for three, each over-predicting the step that ran a
minute later. The figure is the machine's own; a step on a loaded machine
runs slower by the load. A virtual machine's cores can still run slower for
minutes with nothing else in it (the host shares them below it): CPU time
sees that too, and a calibration taken then prices its plans slow (1.32-1.84
in five of 26 calibrations of one quiet fidelity run,
benchmarks/results/2026-12-05-fidelity-session9-c.md). On a GPU, one rank per device, both factors are wall time and
about 1. It assumes every rank computes whenever one does, which a
pipeline's bubble breaks a little.

[Note: measuring overheads]
The software costs of [Note: software overheads] (cost_models/overheads.py)
are measured by small controlled experiments, on every rank at once (the
ranks share the machine as they do in training), each the slowest rank's
median:

* the pipeline: ``a_step`` is the time of the step's own collective (the
  loss's all-reduce) and the gradients' zeroing. Then a stage of one tiny
  linear layer per rank is run by torch's ``Schedule1F1B`` (as the runtime
  runs plans) and that all-reduce, for several micro-batch counts ``M``, in
  interleaved rounds (a shared machine's load changes over seconds). The
  simulator gives the number ``U(M)`` of actions on the critical path of that
  schedule (unit actions, no transfers) and the step ``S(M)`` its transfers
  alone take on the measured link; each ``M`` gives
  ``(t(M) - S(M) - a_step) / U(M)``, and ``a_action`` is their median, at
  least 0 (a ratio of one median, not a difference of two: load noise is
  not amplified);
* torch's multi-stage runtime: the same tiny pipeline with two stages a rank
  (``MULTI_STAGE_SCHEDULES``), in a loop under ``ScheduleInterleaved1F1B`` and
  in a V under ``ScheduleZBVZeroBubble``, in rounds of their own; ``U(M)``
  counts a split backward's halves as an action each, ``S(M)`` the transfers
  between ranks only, and ``a_action_multi`` and ``a_action_v`` are the same
  median, with the ``a_step`` above;
* transfers while the ranks compute: the same ``Schedule1F1B``, each rank's
  stage now ``BUSY_DEPTH`` linear layers of width ``BUSY_WIDTH`` on
  ``BUSY_ROWS`` rows a micro-batch (milliseconds of compute an action, as
  the small models' stages), for each ``M`` of ``BUSY_PIPELINE_MICROBATCHES``.
  Each rank times its stage's forward ``f_r`` and backward ``b_r`` as the
  pipeline runs it (a received input needs its gradient: every rank but the
  first computes one; the last computes the loss), every rank at once, in CPU
  time on a CPU, in the same interleaved rounds as the steps (a shared
  machine's load moves within seconds: timed apart, the fit took a change of
  load for transfers, 0.06-13 ms within 15 minutes). Where ranks outnumber the
  cores, an action of a few milliseconds is not time-sliced: the scheduler runs
  it to its end, so "every rank at once" measures each rank's time alone (4
  ranks on 2 cores: 0.97-1.12x alone in wall time, a 3.7 ms forward and
  backward). ``a_p2p`` is the time to add to each transfer (on the measured
  link) for the simulated step of stages ``o f_r + a_action``, ``o b_r +
  a_action`` plus ``a_step`` to equal the measured step, found by bisection
  (the simulated step grows with it), the median over ``M``, at least 0. The
  step is simulated as the evaluator prices a plan: the ``o`` (oversubscription)
  puts the rank's own time on the basis of every rank at once, as ``k`` does for
  a plan's ops, and ``simulate_sharing`` gives it the cores the waiting ranks
  leave, less ``b`` ([Note: ranks sharing cores] in evaluate.py). ``b``, what a
  waiting rank still uses of a core, is read in the same steps: each rank's
  process CPU time (every thread) outside its stage's forward and backward
  actions over its wall time outside them (the runtime's timed stage records
  each action's), the mean over the ranks of each one's median; in the same rounds the
  same pipeline whose activations travel with ``BUSY_EXTRA_TENSORS`` small bool
  tensors more (each ``EXTRA_TENSOR`` a micro-batch, as a model's stage passes
  its attention mask; torch sends each as its own operation, and no gradient
  back for them): ``a_p2p_tensor`` is the time to add per further tensor of a
  forward transfer, beyond ``a_p2p``, for that simulated step to equal its
  measured one, by the same bisection, at least 0;
* the tensor-parallel interpreter: a chain of ``N`` small elementwise ops
  (an aten graph, as the runtime's stages are) run plainly, through
  ``TensorParallelModule`` with every node replicated, and with every node on
  DTensors; forward and backward each, ``a_node = (t_replicated - t_plain) / N``
  and ``a_dtensor = (t_dtensor - t_replicated) / N`` (the tp mesh is every rank),
  each the median over ``ROUNDS`` interleaved rounds of one round's
  difference (timed one variant after the other, a moment's load on the
  middle one had moved 87 us a node from ``a_dtensor`` to ``a_node``);
* the optimizer: AdamW (the runtime's default, ``adamw_factory``: fused on CUDA) stepping sets of fp32
  tensors of different counts and sizes; ``t = T a_tensor + 16 P / B_opt``
  (weight, gradient, and Adam's two moments, 4 bytes each per parameter)
  fitted by non-negative least squares on relative error;
* ZeRO-1: ``ZeroRedundancyOptimizer`` (as the runtime makes it) stepping
  ``ZERO1_TENSORS`` tensors, every rank at once; ``a_zero1 = (t - t_update -
  T g) / T`` with ``t_update`` this rank's ``1/dp`` share of the update (by the
  fitted ``a_tensor`` and ``B_opt``) and ``g`` the broadcast of a tensor, priced
  as the evaluator does (an all-gather of its ``1/dp`` share on the measured link,
  times the measured broadcast factor), at least 0;
* FSDP: a stack of ``n`` tiny linear units run plainly and with each unit and
  the root under ``fully_shard`` as ZeRO-2 does (``reshard_after_forward=False``)
  over pairs of ranks, every pair at once (with 2 ranks, the one pair; an odd
  world: one group of all), forward and backward timed apart in
  ``FSDP_ROUNDS`` interleaved rounds; ``a_fsdp = (t_fsdp - t_plain) / n - g`` for the forward
  and ``a_fsdp_bwd = (t_fsdp - t_plain) / n - r`` for the backward, where ``g``
  and ``r`` are the unit's all-gather and reduce-scatter on the measured link
  (what the evaluator prices apart, one per unit), each at least 0; then AdamW
  steps both models' parameters, and ``a_opt_dtensor = (t_fsdp - t_plain) / T``
  over their ``T`` tensors (the sizes are tiny: the difference is DTensor's
  dispatch per tensor, not bytes). Pairs, because a dp group's collectives wait
  for each of its ranks to be scheduled: on 4 ranks sharing 2 cores one group
  of 4 measured ``a_fsdp`` 11.5 ms, pairs 2.8 ms, and a pp2 x dp2 plan
  (dp groups of 2) ran as the pairs predict. A larger dp group is priced with
  the pairs' software cost and its own link terms, an under-estimate where its
  ranks share cores;
* checkpointing: a chain of ``N`` small GraphModule blocks of ``n`` nodes (a linear layer
  and ``n - 1`` GELUs) run plainly and with each block under ``torch.utils.checkpoint``
  through ``recompute.checkpointed``, the runtime's own call, forward alone and forward with
  backward: per call ``f_n = (t_f,ckpt - t_f) / N`` and
  ``b_n = ((t_fb,ckpt - t_f,ckpt) - (t_fb - t_f) - t_f) / N``, the backward's excess less
  the forward it replays; for n = 1 and 4, ``a_ckpt_node = (f_4 - f_1) / 3``,
  ``a_ckpt = f_1 - a_ckpt_node`` and ``a_ckpt_bwd = b_1``, each at least 0 (a checkpoint
  hooks every tensor a node saves: its forward grows with those nodes; its backward per
  node was no one figure across models, [Note: software overheads]);
* the split backward: stacks of ``d`` layers of width 32 (a linear, a GELU and ``k`` tanh:
  ``2 + k`` nodes that need a gradient, 2 parameter tensors), for d = 4 and 16 and k = 0 and
  4, each micro-batch's backward run fused and split as torch's zero-bubble schedules run it
  (``stage_backward_input`` then ``stage_backward_weight``), in interleaved rounds; per
  layer and micro-batch ``e_k = ((s_16 - f_16) - (s_4 - f_4)) / 12`` (the timed calls hold 4
  micro-batches each, divided out), ``a_split = (e_4 - e_0) / 4`` per node and
  ``a_split_w = (e_0 - 2 a_split) / 2`` per parameter tensor, medians over the rounds, each at
  least 0;
* gradient accumulation: the backward of an embedding lookup (``ACCUMULATE_ROWS`` x 128
  fp32, whose backward makes a dense gradient of the whole table, beyond the caches as a
  vocabulary's is) timed into no gradient (autograd hands its result over) and into a
  held one (autograd adds to it), ``ACCUMULATE_INNER`` backwards a timed call, in
  interleaved rounds: ``B_acc = G / (t_held - t_handed)`` with ``G`` the gradient bytes the
  held call adds, the median round's difference (0,
  not measured, if it is not positive);
* the overlap: a GEMM loop alone (``t_c``), an all-reduce of a few MiB alone
  (``t_r``) and the all-reduce launched asynchronously while the loop runs
  (``t_b``): ``c = (t_c + t_r - t_b) / min(t_c, t_r)``, the median over interleaved
  rounds of the three (one after the other, quiet calibrations had given 0.41 and
  0.64), clipped to [0, 1].

[Note: calibration passes]
One pass of everything above takes about ten seconds on the 2-core CPU of
development, and a shared machine's speed moves over seconds: back to back on a
quiet machine (nothing else running, 0% other load metered), 18 single passes read
the compute slowdown ``k`` at 1.05-1.79, the GEMM rate at 64-96 GFLOP/s and ``a_p2p``
at 0.23-1.67 ms, and a fixed gpt2-tiny pipeline plan priced on them 38.3-63.0 ms (two
passes caught a slow moment: ``k`` 1.70 and 1.79, the plan 58.6 and 63.0 ms). So
``autopart calibrate`` runs ``--passes`` whole passes (default ``CALIBRATION_PASSES``)
one after the other in the same job, and every figure it writes is the median of the
passes' figures, each fitted within its pass (``median_report``; of an even count the
lower middle one, so that it is a figure one pass measured): a pass that caught a slow
moment is outvoted. The same 18 passes taken three at a time priced that plan
40.6-45.5 ms; one-pass and three-pass calibrations alternated moved three plans' prices
by a median 4.0, 4.1 and 13.1% against 2.3, 3.1 and 4.2%
(benchmarks/calibration_passes.py, benchmarks/results/2026-12-08-calibration-passes.md).
Passes outvote a moment of seconds, not a stretch of minutes: a fidelity run's rounds,
18 minutes apart, still priced a layout a median 27% apart (its steps measured 20% apart,
fidelity-session28). A median per figure, not a fit
over the pooled samples: a fit would let one slow pass pull every figure. It prints
and keeps in the file's header how far the passes' main figures lay apart.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from cost_models.base import COLLECTIVES
from cost_models.overheads import Overheads

from .cluster import Cluster, DeviceSpec, LinkSpec
from .devices import rank_device
from .errors import AutopartError
from .precision import adamw_factory

__all__ = [
    "CalibrateError",
    "CommSample",
    "LinkFit",
    "ComputeRates",
    "CalibrationReport",
    "ring_coefficients",
    "fit_link",
    "run_calibration",
    "PipelineSample",
    "pipeline_overheads",
    "BusyPipelineSample",
    "transfer_overhead",
    "tp_node_overheads",
    "optimizer_overheads",
    "checkpoint_overheads",
    "CheckpointSample",
    "checkpoint_fit",
    "checkpoint_passes",
    "CheckpointBlock",
    "split_backward_overheads",
    "SplitBackwardLayer",
    "comm_overlap",
    "FsdpSample",
    "fsdp_overheads",
    "measure_overheads",
    "calibrated_cluster",
    "median_report",
    "pass_spread",
    "CALIBRATION_PASSES",
    "DEFAULT_SIZES",
]

KINDS = ("p2p", *COLLECTIVES)
CALIBRATION_PASSES = 3  # whole passes of ``autopart calibrate``, each figure their median ([Note: calibration passes])
# Message sizes in bytes per rank: 4 KiB to 16 MiB, every factor of four.
DEFAULT_SIZES = tuple(4096 * 4**i for i in range(7))


class CalibrateError(AutopartError):
    """Calibration cannot run as asked (not under torchrun, wrong world size, output in the way)."""


@dataclass(frozen=True, slots=True)
class CommSample:
    """One timed communication: the median of repeated runs, slowest rank."""

    kind: str  # p2p or a collective (cost_models.base.COLLECTIVES)
    link: str  # "intra" (inside a node) or "inter" (across nodes)
    ranks: int  # group size (2 for p2p)
    nbytes: int  # the message (p2p); the whole tensor, as the cost model prices a collective (an all-gather's output)
    seconds: float


@dataclass(frozen=True, slots=True)
class LinkFit:
    """A link class's fitted alpha-beta and how well it fits its measurements."""

    latency: float  # seconds per message step (alpha)
    bandwidth: float  # bytes/s (1 / beta), effective
    points: int
    mape: float  # mean absolute percentage error of the fit on its measurements
    factors: Mapping[str, float] = field(default_factory=dict)  # collective kind -> measured over the ring model

    def time(self, kind: str, ranks: int, nbytes: float) -> float:
        """Seconds of one ``kind`` over ``ranks`` ranks of ``nbytes`` on this link, as the cost model prices it
        ([Note: fitting alpha-beta]): the ring model, times the kind's measured factor."""
        steps, factor = ring_coefficients(kind, ranks)
        return (steps * self.latency + factor * nbytes / self.bandwidth) * self.factors.get(kind, 1.0)


@dataclass(frozen=True, slots=True)
class ComputeRates:
    """Measured on one rank alone, and the slowdown when every rank runs the same at once."""

    matmul_flops: float  # FLOP/s of a square GEMM in the calibration dtype, one rank alone
    memory_bandwidth: float  # bytes/s of an elementwise add (two reads, one write), one rank alone
    dtype: str
    slowdown: float = 1.0  # the same work on every rank at once, over one rank alone (>= 1)
    contention: float = 1.0  # its two factors ([Note: measured device efficiencies]): shared caches and bandwidth,
    oversubscribed: float = 1.0  # and more ranks than cores


@dataclass(frozen=True)
class CalibrationReport:
    """Everything one calibration run measured and fitted."""

    samples: tuple[CommSample, ...]
    links: dict[str, LinkFit]  # "intra" / "inter" -> fit (missing: not measurable in this job)
    compute: ComputeRates
    world_size: int
    backend: str
    overheads: Overheads = Overheads()  # [Note: measuring overheads]; default: not measured


def ring_coefficients(kind: str, k: int) -> tuple[float, float]:
    """(latency steps, bytes factor) of ``kind`` over ``k`` ranks; see [Note: fitting alpha-beta]."""
    if kind == "p2p":
        return 1.0, 1.0
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    steps, factor = 2.0 * (k - 1), 2.0 * (k - 1) / k
    return (steps, factor) if kind == "all_reduce" else (steps / 2, factor / 2)


def collective_factors(samples: Sequence[CommSample], fit: LinkFit) -> dict[str, float]:
    """Per collective kind measured, the median over its sizes of its time over the ring model on ``fit``
    ([Note: fitting alpha-beta])."""
    out = {}
    for kind in COLLECTIVES:
        ratios = [s.seconds / fit.time(kind, s.ranks, s.nbytes) for s in samples if s.kind == kind and s.seconds > 0]
        if ratios:
            out[kind] = statistics.median(ratios)
    return out


def fit_link(samples: Sequence[CommSample]) -> LinkFit | None:
    """Fit alpha and 1/B of one link class to its point-to-point samples, then each collective's factor over
    the ring model on it ([Note: fitting alpha-beta]); None without point-to-point measurements."""
    from cost_models.calibrated import nnls_relative

    pts = [s for s in samples if s.seconds > 0 and s.kind == "p2p"]
    if not pts:
        return None
    rows = []
    for s in pts:
        steps, factor = ring_coefficients(s.kind, s.ranks)
        rows.append((steps, factor * s.nbytes))
    alpha, beta = nnls_relative(rows, [s.seconds for s in pts])
    if beta <= 0:
        raise CalibrateError(
            "the measured times do not grow with message size (a busy machine?); rerun with a larger --max-bytes or --reps"
        )
    err = [abs(r[0] * alpha + r[1] * beta - s.seconds) / s.seconds for r, s in zip(rows, pts)]
    fit = LinkFit(alpha, 1.0 / beta, len(pts), sum(err) / len(err))
    return replace(fit, factors=collective_factors(samples, fit))


# --------------------------------------------------------------------------------------
# Measuring (inside an initialized process group)
# --------------------------------------------------------------------------------------


def _device() -> torch.device:
    """This rank's own device: cuda:LOCAL_RANK under NCCL, else cpu (see devices.py)."""
    return rank_device().device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _process_clock(device: torch.device) -> Callable[[], float]:
    """On a CPU the process's CPU time (its own work, whatever else the machine runs), on a GPU wall time."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def _timed(fn: Callable[[], None], device: torch.device, reps: int, warmup: int = 2,
           clock: Callable[[], float] = time.perf_counter) -> float:
    """Median over ``reps`` of the slowest rank's time of ``fn`` (every rank calls it), by ``clock``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = clock()
        fn()
        _sync(device)
        times.append(_slowest(clock() - t0, device))
    return statistics.median(times)


def _rounds(fns: Sequence[Callable[[], None]], device: torch.device, rounds: int) -> list[tuple[float, ...]]:
    """Per round, the slowest rank's time of each of ``fns``, once each and in order: interleaved rounds, so
    that a shared machine's drift falls on every variant of an experiment alike (never warmed up here)."""
    return [tuple(_timed(f, device, 1, warmup=0) for f in fns) for _ in range(rounds)]


@dataclass(frozen=True, slots=True)
class PassTimes:
    """One variant's times over an experiment's rounds: its forward, and its forward and backward."""

    forward: tuple[float, ...]
    both: tuple[float, ...]


def _timed_passes(runs: dict[str, Callable[[], torch.Tensor]], device: torch.device, rounds: int) -> dict[str, PassTimes]:
    """Per variant, its forward and its forward-and-backward timed in ``rounds`` interleaved rounds
    (``_rounds``); each variant's forward output is held until its next one, as a training step holds it
    until its backward (so each variant frees its own graph, never another's)."""
    held: dict[str, torch.Tensor] = {}

    def forward(name: str, run: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: held.__setitem__(name, run())

    def both(run: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: run().sum().backward()

    fns = [fn for name, run in runs.items() for fn in (forward(name, run), both(run))]
    for fn in fns:  # warm-up
        fn(), fn()
    got = _rounds(fns, device, rounds)
    return {name: PassTimes(tuple(r[2 * i] for r in got), tuple(r[2 * i + 1] for r in got))
            for i, name in enumerate(runs)}


def _collective(kind: str, nbytes: int, group, size: int, device: torch.device) -> tuple[Callable[[], None], int]:
    """``kind`` on ``nbytes`` per rank, and the size the cost model prices it by: the whole tensor (an
    all-gather's output, a reduce-scatter's input)."""
    n = max(size, nbytes // 4 // size * size)  # float32 elements, divisible by the group
    x = torch.ones(n, dtype=torch.float32, device=device)
    if kind == "all_reduce":
        return (lambda: dist.all_reduce(x, group=group)), 4 * n
    if kind == "all_gather":
        out = torch.empty(n * size, dtype=torch.float32, device=device)
        return (lambda: dist.all_gather_into_tensor(out, x, group=group)), 4 * n * size
    if kind == "broadcast":  # from the group's first rank; priced as an all-gather of its 1/size share (ZeRO-1's)
        src = dist.get_process_group_ranks(group)[0]
        return (lambda: dist.broadcast(x, src=src, group=group)), 4 * n // size
    out = torch.empty(n // size, dtype=torch.float32, device=device)
    return (lambda: dist.reduce_scatter_tensor(out, x, group=group)), 4 * n


def _ping_pong(a: int, b: int, nbytes: int, device: torch.device) -> Callable[[], None]:
    """Rank ``a`` sends to ``b`` and back; the time is two one-way transfers (halved by the caller)."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    rank = dist.get_rank()

    def run() -> None:
        if rank == a:
            dist.send(x, b)
            dist.recv(x, b)
        elif rank == b:
            dist.recv(x, a)
            dist.send(x, a)

    return run


def _timed_alone(fn: Callable[[], None], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median over ``reps`` of rank 0's time of ``fn`` while the other ranks wait in a barrier: on a CPU
    the process's CPU time (its own work, whatever else the machine runs), on a GPU wall time."""
    rank = dist.get_rank()
    now = _process_clock(device)
    times = []
    for i in range(warmup + reps):
        dist.barrier()
        if rank == 0:
            t0 = now()
            fn()
            _sync(device)
            if i >= warmup:
                times.append(now() - t0)
        dist.barrier()
    t = torch.tensor([statistics.median(times) if times else 0.0], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def oversubscription(local_ranks: int) -> float:
    """``max(1, ranks / cores)``: this node's ranks over the cores the process may run on, each rank with
    one intra-op thread (torchrun's default) ([Note: measured device efficiencies])."""
    from .cluster import available_cpus

    return max(1.0, local_ranks / available_cpus())


def compute_slowdown(ratios: Sequence[float], oversubscribed: float = 1.0) -> float:
    """``overheads.compute_slowdown`` from the rounds' contention ratios (CPU time at once over alone) and
    the oversubscription factor: the contention (their median, at least 1) times it
    ([Note: measured device efficiencies])."""
    if not ratios:
        raise CalibrateError("the compute slowdown needs at least one round")
    return max(1.0, statistics.median(ratios)) * max(1.0, oversubscribed)


def _compute_rates(device: torch.device, dtype: str, local_ranks: int) -> ComputeRates:
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}[dtype]
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=tdtype)
    b = torch.randn(n, n, device=device, dtype=tdtype)
    m = (16 << 20) if device.type == "cpu" else (256 << 20)
    x = torch.ones(m // 4, device=device)
    y = torch.ones(m // 4, device=device)
    out = torch.empty_like(x)
    ops = (lambda: torch.mm(a, b), lambda: torch.add(x, y, out=out))
    gemm, add = (_timed_alone(f, device, reps=5) for f in ops)
    ratios = []
    for _ in range(SLOWDOWN_ROUNDS):  # interleaved: alone and all at once see the same machine in a round
        alone = sum(_timed_alone(f, device, reps=1, warmup=0) for f in ops)
        # every rank at once, each process's own time: what another process takes for a moment is not counted
        ratios.append(sum(_timed(f, device, 1, warmup=0, clock=_process_clock(device)) for f in ops) / alone)
    over = oversubscription(local_ranks) if device.type == "cpu" else 1.0
    return ComputeRates(2 * n**3 / gemm, 3 * m / add, dtype, compute_slowdown(ratios, over),
                        compute_slowdown(ratios), over)


def run_calibration(
    sizes: Sequence[int] = DEFAULT_SIZES, reps: int = 5, dtype: str = "fp32", local_world_size: int | None = None,
    overheads: bool = True,
) -> CalibrationReport:
    """Measure every link class this job spans and the device rates. Call on every rank."""
    if not dist.is_initialized():
        raise CalibrateError("run_calibration needs an initialized process group (run under torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2:
        raise CalibrateError("calibration needs at least 2 ranks: torchrun --nproc-per-node 2 ...")
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local:
        raise CalibrateError(f"world size {world} is not a whole number of nodes of {local} ranks")
    nodes = world // local
    device = _device()
    # Groups: each node's ranks (inside), and ranks with the same local index (across). Every rank
    # creates every group, as new_group requires.
    intra = [dist.new_group(list(range(n * local, (n + 1) * local))) for n in range(nodes)] if local > 1 else []
    inter = [dist.new_group(list(range(i, world, local))) for i in range(local)] if nodes > 1 else []
    samples: list[CommSample] = []
    with warnings.catch_warnings():  # torch renames the *_tensor collectives; the calls are the same
        warnings.simplefilter("ignore", FutureWarning)
        _measure_links(samples, intra, inter, local, nodes, rank, sizes, reps, device)
    links = {}
    for link in ("intra", "inter"):
        fit = fit_link([s for s in samples if s.link == link])
        if fit is not None:
            links[link] = fit
    compute = _compute_rates(device, dtype, local)
    link = links.get("intra") or links.get("inter")
    overheads = (measure_overheads(device, link, reps, compute.slowdown, compute.oversubscribed) if overheads
                 else Overheads.from_file(collective_fields(link)))
    return CalibrationReport(tuple(samples), links, compute, world, dist.get_backend(), overheads)


def median_report(reports: Sequence[CalibrationReport]) -> CalibrationReport:
    """One report from whole calibration passes ([Note: calibration passes]): every link's latency,
    bandwidth, fit error and collective factors, the device rates and every overhead the median of the
    passes' figures (of an even count the lower middle), each fitted within its own pass; the samples of every pass. A link is kept where
    every pass measured it."""
    if not reports:
        raise CalibrateError("a calibration needs at least one pass")
    if len(reports) == 1:
        return reports[0]
    # the lower middle of an even count: a figure one pass measured, at the precision it was written in (the
    # mean of two middles is not: 1165.5 us printed as 1165 and read back from the file as 1166)
    med = statistics.median_low
    links = {}
    for name in reports[0].links:
        fits = [r.links[name] for r in reports if name in r.links]
        if len(fits) != len(reports):
            continue
        kinds = set.intersection(*(set(f.factors) for f in fits))
        links[name] = LinkFit(med(f.latency for f in fits), med(f.bandwidth for f in fits),
                              min(f.points for f in fits), med(f.mape for f in fits),
                              {k: med(f.factors[k] for f in fits) for k in sorted(kinds)})
    rates = [r.compute for r in reports]
    compute = ComputeRates(med(c.matmul_flops for c in rates), med(c.memory_bandwidth for c in rates), rates[0].dtype,
                           med(c.slowdown for c in rates), med(c.contention for c in rates),
                           med(c.oversubscribed for c in rates))
    overheads = Overheads(**{f.name: med(getattr(r.overheads, f.name) for r in reports)
                             for f in fields(Overheads)})
    first = reports[0]
    return CalibrationReport(tuple(s for r in reports for s in r.samples), links, compute, first.world_size,
                             first.backend, overheads)


# The figures whose spread between passes ``pass_spread`` reports: (label, figure of a report, unit scale, unit).
SPREAD_FIGURES: tuple[tuple[str, Callable[[CalibrationReport], float], float, str], ...] = (
    ("compute slowdown", lambda r: r.compute.slowdown, 1.0, "x"),
    ("GEMM", lambda r: r.compute.matmul_flops, 1e-9, " GFLOP/s"),
    ("streaming", lambda r: r.compute.memory_bandwidth, 1e-9, " GB/s"),
    ("link bandwidth", lambda r: next(iter(r.links.values())).bandwidth if r.links else 0.0, 1e-9, " GB/s"),
    ("pipeline action", lambda r: r.overheads.action_s, 1e6, " us"),
    ("pipeline transfer wait", lambda r: r.overheads.p2p_transfer_s, 1e6, " us"),
)


def pass_spread(reports: Sequence[CalibrationReport]) -> str:
    """How far apart the passes' main figures lay, the median kept ([Note: calibration passes]): "compute
    slowdown 1.05-1.79x (kept 1.14), ...", one clause per figure that some pass measured (of one pass: its
    figures)."""
    def fig(x: float) -> str:
        return f"{x:.3g}" if x < 1000 else f"{x:.0f}"

    parts = []
    for label, figure, scale, unit in SPREAD_FIGURES:
        values = [figure(r) * scale for r in reports]
        if len(values) == 1 and values[0] > 0:
            parts.append(f"{label} {fig(values[0])}{unit}")
        elif max(values) > 0:
            parts.append(f"{label} {fig(min(values))}-{fig(max(values))}{unit} (kept {fig(statistics.median_low(values))})")
    return ", ".join(parts)


def _measure_links(samples, intra, inter, local, nodes, rank, sizes, reps, device) -> None:
    for link, groups, size in (("intra", intra, local), ("inter", inter, nodes)):
        if not groups:
            continue
        mine = groups[rank // local] if link == "intra" else groups[rank % local]
        peer = 1 if link == "intra" else local  # rank 0's partner for point-to-point
        for nbytes in sizes:
            t = _timed(_ping_pong(0, peer, nbytes, device), device, reps)
            samples.append(CommSample("p2p", link, 2, nbytes, t / 2))
            for kind in COLLECTIVES:
                run, priced = _collective(kind, nbytes, mine, size, device)
                samples.append(CommSample(kind, link, size, priced, _timed(run, device, reps)))


# --------------------------------------------------------------------------------------
# Software overheads ([Note: measuring overheads])
# --------------------------------------------------------------------------------------

PIPELINE_MICROBATCHES = (4, 8, 12)  # the micro-batch counts M of the pipeline experiment (more on > 4 ranks)
ROUNDS = 7  # interleaved rounds of an experiment whose variants are compared (each timed once a round)
SLOWDOWN_ROUNDS = 9  # rounds of the compute slowdown's contention (one rank alone, then every rank at once, each round)
TP_CHAIN = 48  # N: elementwise ops in the tensor-parallel experiment
CHECKPOINT_CHAIN = 16  # N: checkpointed blocks in the checkpointing experiment
CHECKPOINT_BLOCK_NODES = (1, 4)  # n: graph nodes per block in it, two sizes (per call and per node)
# (tensors, elements each) of the optimizer experiment: few large, many small, and between
OPTIMIZER_SETS = ((4, 1 << 18), (64, 1 << 10), (16, 1 << 16), (128, 1 << 12))
ADAM_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two moments
ZERO1_TENSORS = (32, 1 << 12)  # (tensors, elements each) of the ZeRO-1 experiment: a small model's parameter list
ZERO1_STEPS = 21  # its timed steps (the median)


def _microbatch_counts(base: Sequence[int], world: int) -> tuple[int, ...]:
    """``base`` scaled so that the least is at least one micro-batch per rank (torch's 1F1B refuses fewer)."""
    k = -(-world // min(base))
    return tuple(m * k for m in base)


def _mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The pipeline experiments' loss."""
    return ((y - t) ** 2).mean()


class _PassThrough(torch.nn.Module):
    """A stage that hands its extra inputs on beside its output, as a model's stage passes an attention mask."""

    def __init__(self, stage: torch.nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.stage(x), *extra)


def _mse_first(out: tuple[torch.Tensor, ...], t: torch.Tensor) -> torch.Tensor:
    return _mse(out[0], t)


EXTRA_TENSOR = (2, 64, 64)  # one extra tensor of a transfer, per micro-batch: bool, gpt2-tiny's mask of 2 samples


def pipeline_steps(stage: torch.nn.Module, counts: Sequence[int], rows: int, width: int, device: torch.device,
                    finish: Callable[[], None], extra: int = 0,
                    actions: list[Any] | None = None) -> dict[int, Callable[[], None]]:
    """Per micro-batch count ``M``: one training step of torch's ``Schedule1F1B`` over ``stage`` on every
    rank (one stage a rank), micro-batches of ``rows`` rows of ``width``, then ``finish`` (the step's own
    work outside the schedule); each warmed up twice (torch builds the stage's buffers on the first step).
    ``extra``: that many bool tensors of ``EXTRA_TENSOR`` a micro-batch travel beside the activation (no
    gradient comes back for them). ``actions``: where the stage records each forward and backward it runs
    (the runtime's timed stage, ``StepEvent``s with their wall and CPU time)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    stage_cls: Any = PipelineStage
    if actions is not None:
        from .runtime.model import timed_stage_class

        stage_cls = timed_stage_class()
    world, rank = dist.get_world_size(), dist.get_rank()
    runs = {}
    for m in counts:
        module, loss_fn = (_PassThrough(stage), _mse_first) if extra else (stage, _mse)
        pipe_stage = stage_cls(module, rank, world, device)
        if actions is not None:
            pipe_stage.events = actions
        schedule = Schedule1F1B(pipe_stage, m, loss_fn=loss_fn)
        x = torch.randn(m * rows, width, device=device)
        more = [torch.ones(m * EXTRA_TENSOR[0], *EXTRA_TENSOR[1:], dtype=torch.bool, device=device)
                for _ in range(extra)]
        target = torch.zeros(m * rows, width, device=device)

        def step(schedule: Any = schedule, x: torch.Tensor = x, more: list = more, target: torch.Tensor = target) -> None:
            if rank == 0:
                schedule.step(x, *more)
            elif rank == world - 1:
                schedule.step(target=target, losses=[])
            else:
                schedule.step()
            finish()

        for _ in range(2):
            step()
        runs[m] = step
    return runs


@dataclass(frozen=True, slots=True)
class PipelineSample:
    """One timed step of the tiny pipeline, and what the simulator says about its schedule."""

    microbatches: int
    seconds: float  # the slowest rank's step (schedule and loss all-reduce), median
    unit_actions: float  # U(M): the simulated step with unit actions and free transfers
    transfers_s: float  # S(M): the simulated step with free actions and the measured link


def pipeline_overheads(samples: Sequence[PipelineSample], step_s: float) -> float:
    """``a_action`` from pipeline samples and the measured ``a_step`` ([Note: measuring overheads])."""
    if not samples:
        raise CalibrateError("the pipeline experiment needs at least one micro-batch count")
    per = [(x.seconds - x.transfers_s - step_s) / x.unit_actions for x in samples]
    return max(0.0, statistics.median(per))


TINY_WIDTH = 16  # the tiny pipelines' layers: Linear(TINY_WIDTH, TINY_WIDTH), one micro-batch a row


def _tiny_sample(schedule: str, ranks: int, virtual: int, microbatches: int, seconds: float,
                 link: LinkFit | None) -> PipelineSample:
    """A timed step of a tiny pipeline with what the simulator says of ``schedule`` on ``ranks`` ranks with
    ``virtual`` stages each: ``U(M)``, every action a unit (a split backward's halves one each), and ``S(M)``,
    free actions and a row's transfer on ``link`` between ranks (a hand-off on one rank is free)."""
    from .schedules import spec as schedule_spec, stage_rank
    from .simulate import StageCost, simulate

    send = link.latency + TINY_WIDTH * 4 / link.bandwidth if link else 0.0
    spec = schedule_spec(schedule)
    stages = ranks * virtual
    unit = StageCost(1.0, 2.0, backward_weight_s=1.0) if spec.splits_backward else StageCost(1.0, 1.0)
    sends = [send if stage_rank(s + 1, ranks, spec.layout) != stage_rank(s, ranks, spec.layout) else 0.0
             for s in range(stages)]
    u = simulate([unit] * stages, schedule, microbatches, virtual_stages=virtual).step_time_s
    t = simulate([StageCost(0.0, 0.0, send_s=x) for x in sends], schedule, microbatches,
                 virtual_stages=virtual).step_time_s
    return PipelineSample(microbatches, seconds, u, t)


def _pipeline_samples(device: torch.device, link: LinkFit | None, reps: int) -> tuple[list[PipelineSample], float]:
    """(one sample per micro-batch count, ``a_step``)."""
    world = dist.get_world_size()
    width = TINY_WIDTH
    torch.manual_seed(0)
    layer = torch.nn.Linear(width, width).to(device)
    loss = torch.zeros((), device=device)

    def finish() -> None:  # the step's own work outside the schedule: zeroing, the loss's all-reduce
        layer.zero_grad(set_to_none=False)
        dist.all_reduce(loss)

    step_s = _timed(finish, device, reps)
    runs = pipeline_steps(layer, _microbatch_counts(PIPELINE_MICROBATCHES, world), 1, width, device, finish)
    times: dict[int, list[float]] = {m: [] for m in runs}
    for _ in range(reps):  # interleaved rounds: each M sees the same spread of load
        for m, step in runs.items():
            times[m].append(_timed(step, device, 1, warmup=0))
    return [_tiny_sample("1f1b", world, 1, m, statistics.median(times[m]), link) for m in runs], step_s


# The multi-stage runtime's schedules timed for a_action_multi and a_action_v: (schedule, torch class), two
# stages a rank, in a loop and in a V ([Note: software overheads] in cost_models/overheads.py).
MULTI_STAGE_SCHEDULES = (("interleaved", "ScheduleInterleaved1F1B"), ("zbv", "ScheduleZBVZeroBubble"))


def _multi_stage_samples(device: torch.device, link: LinkFit | None, reps: int) -> dict[str, list[PipelineSample]]:
    """Per layout ("loop", "v"): the tiny pipeline of ``_pipeline_samples`` with two stages a rank, run by torch's
    multi-stage runtime, one sample per micro-batch count (``_tiny_sample``)."""
    import torch.distributed.pipelining as pipelining

    from .schedules import spec as schedule_spec, stage_rank

    world, rank = dist.get_world_size(), dist.get_rank()
    width = TINY_WIDTH
    torch.manual_seed(0)
    counts = _microbatch_counts(PIPELINE_MICROBATCHES, world)
    runs: dict[tuple[str, int], Callable[[], None]] = {}
    for name, cls in MULTI_STAGE_SCHEDULES:
        layout = schedule_spec(name).layout
        ids = [s for s in range(2 * world) if stage_rank(s, world, layout) == rank]
        layers = [torch.nn.Linear(width, width).to(device) for _ in ids]
        loss = torch.zeros((), device=device)
        first, last = rank == stage_rank(0, world, layout), rank == stage_rank(2 * world - 1, world, layout)

        def finish(layers: list = layers, loss: torch.Tensor = loss) -> None:
            for layer in layers:
                layer.zero_grad(set_to_none=False)
            dist.all_reduce(loss)

        for m in counts:
            schedule = getattr(pipelining, cls)(
                [pipelining.PipelineStage(layer, i, 2 * world, device) for layer, i in zip(layers, ids, strict=True)],
                m, loss_fn=_mse)
            x, target = torch.randn(m, width, device=device), torch.zeros(m, width, device=device)

            def step(schedule: Any = schedule, args: tuple = (x,) if first else (),
                     target: torch.Tensor | None = target if last else None,
                     finish: Callable[[], None] = finish) -> None:
                schedule.step(*args, **({} if target is None else dict(target=target, losses=[])))
                finish()

            for _ in range(2):  # torch builds the stages' buffers on the first step
                step()
            runs[(name, m)] = step
    times: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
    for _ in range(reps):  # interleaved rounds: every schedule and M sees the same spread of load
        for k, step in runs.items():
            times[k].append(_timed(step, device, 1, warmup=0))
    out: dict[str, list[PipelineSample]] = {}
    for name, _ in MULTI_STAGE_SCHEDULES:
        out[schedule_spec(name).layout] = [_tiny_sample(name, world, 2, m, statistics.median(times[(name, m)]), link)
                                           for m in counts]
    return out


BUSY_PIPELINE_MICROBATCHES = (4, 8)  # M of the pipeline experiment whose ranks compute
BUSY_WIDTH, BUSY_DEPTH, BUSY_ROWS = 384, 4, 64  # its stage: BUSY_DEPTH linear layers, BUSY_ROWS rows a micro-batch


@dataclass(frozen=True, slots=True)
class BusyPipelineSample:
    """One micro-batch count of the pipeline experiment whose ranks compute ([Note: measuring overheads])."""

    microbatches: int
    seconds: float  # the slowest rank's step (schedule and loss all-reduce), median
    # per pipeline rank, one micro-batch's forward and backward of its stage as the pipeline runs it (the
    # first without an input gradient, the last with the loss), medians of their CPU time with every rank
    # computing at once: a rank's own work (an action of a few milliseconds is not time-sliced: its wall time
    # is its time alone, [Note: ranks sharing cores] in evaluate.py)
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    send_s: float  # one micro-batch's activation on the measured link (latency + bytes / bandwidth)


def transfer_overhead(samples: Sequence[BusyPipelineSample], action_s: float, step_s: float,
                      oversubscribed: float = 1.0, idle_use: float = 0.0) -> float:
    """``a_p2p``: the seconds to add to every transfer between pipeline ranks so that the simulated
    1F1B step of each sample equals its measured one, the median over the samples, at least 0
    ([Note: measuring overheads]). The step is simulated as the evaluator prices a plan: with
    ``oversubscribed`` ranks a core, each rank's compute (its own time, the samples' CPU time) on the basis
    of every rank computing at once (``oversubscribed`` times it), then scaled to the cores the waiting
    ranks leave it, less the ``idle_use`` of a core each waiting rank still uses ([Note: ranks sharing
    cores] in evaluate.py); else the transfers' fitted time would take up what the evaluator prices
    apart."""
    if not samples:
        raise CalibrateError("the busy pipeline experiment needs at least one micro-batch count")

    def step(x: BusyPipelineSample, extra: float) -> float:
        return _busy_step(x, action_s, step_s, oversubscribed, idle_use, x.send_s + extra)

    return _fitted_wait(samples, step)


def tensor_overhead(samples: Sequence[BusyPipelineSample], action_s: float, step_s: float, transfer_s: float,
                    extra: int, oversubscribed: float = 1.0, idle_use: float = 0.0) -> float:
    """``a_p2p_tensor``: the seconds to add per further tensor of a forward transfer, beyond ``a_p2p``
    (``transfer_s``) for its first, so that the simulated 1F1B step of each sample (whose activations
    travel with ``extra`` tensors more, and whose gradients alone) equals its measured one; the median
    over the samples, at least 0 ([Note: measuring overheads]), simulated as ``transfer_overhead``
    simulates it."""
    if not samples or extra < 1:
        raise CalibrateError("the extra-tensor pipeline experiment needs a sample and at least one extra tensor")

    def step(x: BusyPipelineSample, each: float) -> float:
        return _busy_step(x, action_s, step_s, oversubscribed, idle_use, x.send_s + transfer_s + extra * each,
                          grad_send_s=x.send_s + transfer_s)

    return _fitted_wait(samples, step)


def _busy_step(x: BusyPipelineSample, action_s: float, step_s: float, oversubscribed: float, idle_use: float,
               send_s: float, grad_send_s: float | None = None) -> float:
    """The busy pipeline sample ``x``'s 1F1B step simulated as the evaluator prices a plan (see
    ``transfer_overhead``), its activations sent in ``send_s`` and their gradients in ``grad_send_s``
    (None: the same)."""
    from .simulate import StageCost, simulate_sharing

    o = oversubscribed
    stages = [StageCost(o * f + action_s, o * b + action_s, send_s=send_s, grad_send_s=grad_send_s)
              for f, b in zip(x.forward_s, x.backward_s, strict=True)]
    return simulate_sharing(stages, "1f1b", x.microbatches, oversubscribed=o, idle_use=idle_use)[0].step_time_s + step_s


def _fitted_wait(samples: Sequence[BusyPipelineSample], step: Callable[[BusyPipelineSample, float], float]) -> float:
    """The median over ``samples`` of the wait ``w >= 0`` at which ``step(x, w)``, growing with ``w``, equals
    the sample's measured step (0 where the step is no slower than ``step(x, 0)``)."""
    out = []
    for x in samples:
        if step(x, 0.0) >= x.seconds:
            out.append(0.0)
            continue
        lo, hi = 0.0, x.seconds  # the simulated step grows with the transfer time, without bound
        for _ in range(60):  # bisection to far below a microsecond
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if step(x, mid) < x.seconds else (lo, mid)
        out.append((lo + hi) / 2)
    return max(0.0, statistics.median(out))


BUSY_EXTRA_TENSORS = 3  # the further tensors of each forward transfer in the experiment's second pipeline


def _busy_pipeline_samples(device: torch.device, link: LinkFit | None,
                           reps: int) -> tuple[list[BusyPipelineSample], list[BusyPipelineSample], float]:
    """The pipeline experiment whose ranks compute: one sample per micro-batch count, with one tensor a transfer
    and with ``BUSY_EXTRA_TENSORS`` more forward, timed in the same rounds; and ``b``, the share of a core a
    rank uses outside its forward and backward actions in the first ones' steps (on a CPU; 0 on a GPU)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    stage = torch.nn.Sequential(*(torch.nn.Linear(BUSY_WIDTH, BUSY_WIDTH) for _ in range(BUSY_DEPTH))).to(device)
    loss = torch.zeros((), device=device)
    # This rank's stage as the pipeline runs it: a received input needs its gradient (torch's stage asks
    # for it), the first stage's does not; the last stage computes the loss.
    x1 = torch.randn(BUSY_ROWS, BUSY_WIDTH, device=device, requires_grad=rank > 0)
    t1 = torch.zeros(BUSY_ROWS, BUSY_WIDTH, device=device)

    def forward() -> torch.Tensor:
        y = stage(x1)
        return _mse(y, t1) if rank == world - 1 else y.sum()

    def forward_backward() -> None:
        x1.grad = None
        forward().backward()

    for _ in range(2):  # warm-up
        forward_backward()
    stage.zero_grad(set_to_none=False)

    def finish() -> None:
        stage.zero_grad(set_to_none=False)
        dist.all_reduce(loss)

    counts = _microbatch_counts(BUSY_PIPELINE_MICROBATCHES, world)
    actions: list[Any] = []  # the first variant's forward and backward actions, of the step being timed
    idle: list[float] = []  # per timed step of it, the cores this rank used outside them

    def metered(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            actions.clear()
            p0, w0 = time.process_time(), time.perf_counter()
            step()
            p1, w1 = time.process_time(), time.perf_counter()
            cpu, wall = sum(e.cpu_s for e in actions), sum(e.end_s - e.start_s for e in actions)
            if w1 - w0 > wall:
                idle.append(max(0.0, (p1 - p0 - cpu) / (w1 - w0 - wall)))
        return run

    variants = [pipeline_steps(stage, counts, BUSY_ROWS, BUSY_WIDTH, device, finish, extra,
                               actions if extra == 0 else None)
                for extra in (0, BUSY_EXTRA_TENSORS)]
    variants[0] = {m: metered(step) for m, step in variants[0].items()}
    times: list[dict[int, list[float]]] = [{m: [] for m in runs} for runs in variants]
    fwd: list[float] = []
    bwd: list[float] = []

    clock = _process_clock(device)  # on a CPU the process's CPU time: the rank's own work, not its wait for a core

    def own(fn: Callable[[], Any]) -> float:  # this rank's own time, every rank computing at once
        dist.barrier()
        t0 = clock()
        fn()
        _sync(device)
        return clock() - t0

    for _ in range(reps):  # interleaved rounds: the stage's compute and the steps see the same load
        f = own(forward)
        fwd.append(f)
        bwd.append(max(0.0, own(forward_backward) - f))
        for runs, timed in zip(variants, times, strict=True):
            for m, step in runs.items():
                timed[m].append(_timed(step, device, 1, warmup=0))
    mine = (statistics.median(fwd), statistics.median(bwd), statistics.median(idle) if idle else 0.0)
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, mine)
    send = link.latency + BUSY_ROWS * BUSY_WIDTH * 4 / link.bandwidth if link else 0.0
    one, more = ([BusyPipelineSample(m, statistics.median(timed[m]), tuple(r[0] for r in per_rank),
                                     tuple(r[1] for r in per_rank), send) for m in timed] for timed in times)
    idle_use = min(1.0, statistics.fmean(r[2] for r in per_rank)) if device.type == "cpu" else 0.0
    return one, more, idle_use


def _chain(width: int, n: int) -> Any:
    """An aten graph of ``n`` small elementwise ops (what the runtime's stage graphs hold)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x: torch.Tensor) -> torch.Tensor:
        for i in range(n):
            x = x * 1.0001 if i % 2 else x + 0.001
        return x

    return make_fx(f)(torch.ones(width, width))


def tp_node_overheads(device: torch.device, reps: int) -> tuple[float, float, float, float]:
    """``(a_node, a_node_bwd, a_dtensor, a_dtensor_bwd)``: the tensor-parallel interpreter's and DTensor's
    cost per node, forward and backward, over a plain aten graph ([Note: measuring overheads])."""
    from torch.distributed.device_mesh import init_device_mesh

    from .rewrite import StageProgram, TensorParallelModule

    gm = _chain(8, TP_CHAIN).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))["tp"]
    names = tuple(n.name for n in gm.graph.nodes if n.op == "call_function")

    def program(strategy: str) -> StageProgram:
        return StageProgram(0, gm, ("x",), ("out",), (), names, {n: strategy for n in names})

    runners = {"plain": gm, "replicated": TensorParallelModule(program("replicate"), mesh),
               "dtensor": TensorParallelModule(program("sharded"), mesh)}
    x = torch.ones(8, 8, device=device, requires_grad=True)
    times = _timed_passes({name: (lambda run=run: run(x)) for name, run in runners.items()}, device,
                          max(reps, ROUNDS))
    n = len(names)

    def per(a: str, b: str, backward: bool) -> float:  # the median over rounds of one round's difference
        ta, tb = times[a], times[b]
        diffs = [((ab - af) - (bb - bf)) if backward else (af - bf)
                 for af, ab, bf, bb in zip(ta.forward, ta.both, tb.forward, tb.both, strict=True)]
        return max(0.0, statistics.median(diffs) / n)

    return per("replicated", "plain", False), per("replicated", "plain", True), per("dtensor", "replicated", False), per(
        "dtensor", "replicated", True)


def optimizer_overheads(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float]:
    """``(a_tensor, B_opt)`` fitted to ``(tensors, elements in all, seconds)`` ([Note: measuring overheads])."""
    from cost_models.calibrated import nnls_relative

    rows = [(float(t), float(p * ADAM_BYTES_PER_PARAM)) for t, p, _ in samples]
    a, per_byte = nnls_relative(rows, [sec for *_, sec in samples])
    return a, (1.0 / per_byte if per_byte > 0 else 0.0)


def _optimizer_samples(device: torch.device, reps: int) -> list[tuple[int, int, float]]:
    out = []
    for count, numel in OPTIMIZER_SETS:
        params = [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = adamw_factory(device)(params)
        out.append((count, count * numel, _timed(opt.step, device, reps)))
    return out


def zero1_overhead(device: torch.device, link: LinkFit | None, reps: int, tensor_s: float, bandwidth: float) -> float:
    """``a_zero1``: ZeroRedundancyOptimizer's step (as the runtime makes it, ``zero1_optimizer``) over
    ``ZERO1_TENSORS`` tensors on every rank at once, less what the model already prices (this rank's share of
    the update by ``a_tensor`` and ``B_opt``, and each tensor's broadcast as an all-gather of its ``1/dp``
    share on the measured link), per tensor, at least 0 ([Note: measuring overheads])."""
    from .runtime.state import zero1_optimizer

    count, numel = ZERO1_TENSORS
    world = dist.get_world_size()
    params = [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = zero1_optimizer(adamw_factory(device), params, None)
    t = _timed(opt.step, device, max(reps, ZERO1_STEPS))  # a step of many broadcasts moves much: more of them
    priced = Overheads(optimizer_tensor_s=tensor_s, optimizer_bandwidth=bandwidth)  # as the evaluator prices it
    update = priced.optimizer_time(count / world, count * numel / world, ADAM_BYTES_PER_PARAM)
    gather = count * link.time("broadcast", world, numel * 4 / world) if link else 0.0
    return max(0.0, (t - update - gather) / count)


@dataclass(frozen=True, slots=True)
class FsdpSample:
    """The FSDP experiment's medians (slowest rank): ``units`` tiny linear units, plainly and under FSDP2."""

    units: int  # n: FSDP units (each one linear layer; the root holds no parameters)
    ranks: int  # the dp group's size (FSDP_GROUP, or every rank of an odd world)
    unit_bytes: int  # one unit's weights (and fp32 gradients), whole
    tensors: int  # T: parameter tensors the optimizer steps
    plain_forward_s: float
    plain_backward_s: float
    fsdp_forward_s: float
    fsdp_backward_s: float
    plain_optimizer_s: float
    fsdp_optimizer_s: float


def fsdp_overheads(sample: FsdpSample, link: LinkFit | None) -> tuple[float, float, float]:
    """``(a_fsdp, a_fsdp_bwd, a_opt_dtensor)`` from the FSDP experiment ([Note: measuring overheads]): the
    per-unit time beyond plain, less the unit's collective on ``link`` (None: not subtracted)."""
    def on_link(kind: str) -> float:
        return link.time(kind, sample.ranks, sample.unit_bytes) if link is not None else 0.0

    n = sample.units
    forward = (sample.fsdp_forward_s - sample.plain_forward_s) / n - on_link("all_gather")
    backward = (sample.fsdp_backward_s - sample.plain_backward_s) / n - on_link("reduce_scatter")
    optimizer = (sample.fsdp_optimizer_s - sample.plain_optimizer_s) / sample.tensors
    return max(0.0, forward), max(0.0, backward), max(0.0, optimizer)


FSDP_UNITS = 8  # n: units of the FSDP experiment
FSDP_WIDTH = 16  # each unit a Linear(width, width)
FSDP_GROUP = 2  # the dp group of the FSDP experiment: pairs of ranks, every pair at once
# Its rounds: a unit's gloo collective is a few hundred microseconds with a long tail, and the software
# cost is the difference of two such sums; over 7 rounds a_fsdp_bwd read 31-2352 us in one fidelity run
# (48 calibrations), and over 21 the per-unit totals' coefficient of variation between calibrations fell
# from 0.17-0.21 to 0.08-0.13 (benchmarks/results/2026-12-07-fsdp-calibration.md).
FSDP_ROUNDS = 21


def _fsdp_sample(device: torch.device, reps: int) -> FsdpSample:
    """Time the FSDP experiment on every rank at once ([Note: measuring overheads])."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = torch.nn.Sequential(*(torch.nn.Linear(FSDP_WIDTH, FSDP_WIDTH) for _ in range(FSDP_UNITS))).to(device)
    sharded = copy.deepcopy(plain)
    world = dist.get_world_size()
    pairs = world // FSDP_GROUP if world % FSDP_GROUP == 0 else 0
    mesh = (init_device_mesh(device.type, (pairs, FSDP_GROUP), mesh_dim_names=("rest", "dp")) if pairs > 1
            else init_device_mesh(device.type, (world,), mesh_dim_names=("dp",)))["dp"]
    for unit in sharded:
        fully_shard(unit, mesh=mesh, reshard_after_forward=False)  # ZeRO-2, as the runtime shards it
    fully_shard(sharded, mesh=mesh, reshard_after_forward=False)
    x = torch.randn(4, FSDP_WIDTH, device=device)
    models = {"plain": plain, "fsdp": sharded}
    optimizers = {k: adamw_factory(device)(list(m.parameters())) for k, m in models.items()}
    times: dict[str, list[list[float]]] = {k: [[], [], []] for k in models}

    def one(name: str, record: bool) -> None:
        model, opt = models[name], optimizers[name]
        held: list[torch.Tensor] = []
        passes = (lambda: held.append(model(x)), lambda: held.pop().sum().backward(), opt.step)
        for i, fn in enumerate(passes):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            _sync(device)
            t = _slowest(time.perf_counter() - t0, device)
            if record:
                times[name][i].append(t)
        opt.zero_grad(set_to_none=False)

    for r in range(2 + reps):  # two warm-up rounds, then interleaved rounds: each sees the same spread of load
        for name in models:
            one(name, r >= 2)
    med = {k: [statistics.median(v) for v in ts] for k, ts in times.items()}
    unit_bytes = sum(p.numel() * p.element_size() for p in plain[0].parameters())
    return FsdpSample(FSDP_UNITS, mesh.size(), unit_bytes, len(list(plain.parameters())),
                      med["plain"][0], med["plain"][1], med["fsdp"][0], med["fsdp"][1], med["plain"][2], med["fsdp"][2])


class CheckpointBlock(torch.nn.Module):
    """A linear layer and ``n - 1`` GELUs: ``n`` graph nodes, each saving a tensor for its backward."""

    def __init__(self, nodes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.gelus = nodes - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        for _ in range(self.gelus):
            x = torch.nn.functional.gelu(x)
        return x


@dataclass(frozen=True, slots=True, order=True)
class CheckpointSample:
    """What one checkpoint call added, per call, over a chain of blocks of ``nodes`` graph nodes (medians)."""

    nodes: int
    forward_s: float
    backward_s: float


def checkpoint_fit(samples: Sequence[CheckpointSample]) -> tuple[float, float, float]:
    """``(a_ckpt, a_ckpt_bwd, a_ckpt_node)`` from the samples of blocks of two sizes or more: the forward a
    line through the smallest and the largest, the backward the smallest's, each at least 0 ([Note:
    measuring overheads])."""
    small, large = min(samples), max(samples)
    (n0, f0, b0), (n1, f1) = (small.nodes, small.forward_s, small.backward_s), (large.nodes, large.forward_s)
    if n1 == n0:
        raise CalibrateError("the checkpointing experiment needs blocks of two sizes (CHECKPOINT_BLOCK_NODES)")
    node_f = max(0.0, (f1 - f0) / (n1 - n0))
    return max(0.0, f0 - n0 * node_f), max(0.0, b0), node_f


def checkpoint_passes(blocks: Sequence[torch.nn.Module], x: torch.Tensor,
                      held: dict[bool, torch.Tensor]) -> list[Callable[[], None]]:
    """The four passes the checkpointing experiment times over the chain ``blocks``: its forward plain and
    checkpointed (each output kept in ``held[checkpointed]`` until that pass's next run, so that each pass
    frees its own graph, never the other's), then forward and backward plain and checkpointed. Built per
    chain (give each its own ``held``), so that each size's passes run that size's blocks."""
    from .recompute import checkpointed

    def run(ckpt: bool) -> torch.Tensor:
        y = x
        for block in blocks:
            y = checkpointed(block, y) if ckpt else block(y)
        return y

    out: list[Callable[[], None]] = [lambda c=c: held.__setitem__(c, run(c)) for c in (False, True)]
    return out + [lambda c=c: run(c).sum().backward() for c in (False, True)]


def checkpoint_overheads(device: torch.device, reps: int) -> tuple[float, float, float]:
    """``(a_ckpt, a_ckpt_bwd, a_ckpt_node)``: what one ``torch.utils.checkpoint`` call adds to a block's
    forward and to its backward beyond the replayed forward, and each node inside it to the forward
    ([Note: measuring overheads]). The blocks are GraphModules called through ``recompute.checkpointed``,
    as the runtime's folded blocks are ([Note: a replay that stops early] in recompute.py)."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    n = CHECKPOINT_CHAIN
    held: dict[int, dict[bool, torch.Tensor]] = {}  # each pass's forward output, held as a step holds it
    passes: dict[int, list[Callable[[], None]]] = {}
    for size in CHECKPOINT_BLOCK_NODES:
        blocks = [torch.fx.symbolic_trace(CheckpointBlock(size)).to(device) for _ in range(n)]
        passes[size] = checkpoint_passes(blocks, x, held.setdefault(size, {}))
        for fn in passes[size]:
            _timed(fn, device, 1)  # warm-up
    sizes = list(passes)
    got = _rounds([fn for size in sizes for fn in passes[size]], device, max(reps, ROUNDS))
    samples = []
    for i, size in enumerate(sizes):
        per = [r[4 * i:4 * i + 4] for r in got]  # (f, f_ckpt, fb, fb_ckpt) of each round
        samples.append(CheckpointSample(size, statistics.median((fc - f) / n for f, fc, _, _ in per),
                                        statistics.median(((fbc - fc) - (fb - f) - f) / n for f, fc, fb, fbc in per)))
    return checkpoint_fit(samples)


SPLIT_BACKWARD_DEPTHS = (4, 16)  # layers in the split-backward experiment
SPLIT_BACKWARD_EXTRA = 4  # weight-free nodes (tanh) the second kind of layer adds to a linear and a GELU


class SplitBackwardLayer(torch.nn.Module):
    """A linear (2 parameter tensors), a GELU and ``extra`` tanh: ``2 + extra`` graph nodes that need a
    gradient, as the evaluator counts them (``Evaluator.grad_nodes``)."""

    def __init__(self, width: int, extra: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.gelu(self.linear(x))
        for _ in range(self.extra):
            x = torch.tanh(x)
        return x


def split_backward_overheads(device: torch.device, reps: int) -> tuple[float, float]:
    """``(a_split, a_split_w)``: what torch's split backward adds over one fused backward per graph node
    that needs a gradient and per parameter tensor ([Note: measuring overheads]; [Note: software
    overheads] in cost_models/overheads.py)."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    torch.manual_seed(0)
    width, batch, inner = 32, 8, 4  # tiny: the walk, the hooks and the calls, not the arithmetic

    def passes(depth: int, extra: int) -> tuple[Callable[[], None], Callable[[], None]]:
        model = torch.nn.Sequential(*[SplitBackwardLayer(width, extra) for _ in range(depth)]).to(device)

        def fused() -> None:
            for _ in range(inner):
                y = model(torch.randn(batch, width, device=device, requires_grad=True))
                torch.autograd.backward(y, torch.ones_like(y))

        def split() -> None:
            for _ in range(inner):
                x = torch.randn(batch, width, device=device, requires_grad=True)
                y = model(x)
                _, groups = stage_backward_input([y], [torch.ones_like(y)], [x], model.parameters())
                stage_backward_weight(model.parameters(), groups)

        return fused, split

    small, large = SPLIT_BACKWARD_DEPTHS
    fns = [fn for extra in (0, SPLIT_BACKWARD_EXTRA) for depth in (small, large) for fn in passes(depth, extra)]
    for fn in fns:  # warm-up
        fn(), fn()
    layers = (large - small) * inner  # the layers the larger stacks add, per timed call
    nodes, weights = [], []
    for f0s, s0s, f0l, s0l, f4s, s4s, f4l, s4l in _rounds(fns, device, max(reps, ROUNDS)):
        plain = ((s0l - f0l) - (s0s - f0s)) / layers  # 2 nodes and 2 parameters a layer
        more = ((s4l - f4l) - (s4s - f4s)) / layers  # 2 + extra nodes and 2 parameters a layer
        node = (more - plain) / SPLIT_BACKWARD_EXTRA
        nodes.append(node)
        weights.append((plain - 2 * node) / 2)
    return max(0.0, statistics.median(nodes)), max(0.0, statistics.median(weights))


ACCUMULATE_ROWS = 32768  # x 128 fp32: a 16 MiB weight, beyond the caches as a vocabulary's is
ACCUMULATE_INNER = 4  # backwards per timed call: the difference of two calls is the noise of one over four


def grad_accumulate_bandwidth(device: torch.device, reps: int) -> float:
    """``B_acc``: gradient bytes per second that autograd adds into a ``.grad`` it already holds
    ([Note: measuring overheads]; [Note: software overheads] in cost_models/overheads.py). The same
    backward of an embedding (a dense gradient of the whole table) timed into no gradient, which it
    hands over, and into a held one, which it adds to; the difference is the addition."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(ACCUMULATE_ROWS, 128, device=device))
    tokens = torch.randint(0, ACCUMULATE_ROWS, (1, 64), device=device)

    def backward() -> None:
        torch.nn.functional.embedding(tokens, weight).sum().backward()

    def fresh() -> None:
        for _ in range(ACCUMULATE_INNER):
            weight.grad = None
            backward()

    def held() -> None:
        for _ in range(ACCUMULATE_INNER):
            backward()

    for fn in (fresh, held):  # warm-up
        fn(), fn()
    nbytes = weight.numel() * weight.element_size() * ACCUMULATE_INNER
    diffs = [t_held - t_handed for t_handed, t_held in _rounds((fresh, held), device, max(reps, ROUNDS))]
    diff = statistics.median(diffs)
    return nbytes / diff if diff > 0 else 0.0


def comm_overlap(device: torch.device, reps: int) -> float:
    """``c``: the share of an all-reduce that runs beside compute ([Note: measuring overheads])."""
    n = 256 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device)
    buf = torch.ones((4 << 20) // 4, device=device)

    def compute() -> None:
        for _ in range(8):
            torch.mm(a, a)

    def reduce() -> None:
        dist.all_reduce(buf)

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()

    for f in (compute, reduce, both):  # warm-up
        _timed(f, device, 1)
    hidden = [(t_c + t_r - t_b) / min(t_c, t_r) for t_c, t_r, t_b in _rounds((compute, reduce, both), device,
                                                                           max(reps, ROUNDS))]
    return min(1.0, max(0.0, statistics.median(hidden)))


def measure_overheads(device: torch.device, link: LinkFit | None, reps: int, slowdown: float = 1.0,
                      oversubscribed: float = 1.0) -> Overheads:
    """Every overhead of [Note: measuring overheads], rounded to four significant digits."""
    samples, step = _pipeline_samples(device, link, max(reps, ROUNDS))
    action = pipeline_overheads(samples, step)
    multi = {layout: pipeline_overheads(x, step)
             for layout, x in _multi_stage_samples(device, link, max(reps, ROUNDS)).items()}
    busy, busy_more, idle = _busy_pipeline_samples(device, link, max(reps, ROUNDS))
    # the file's figures, as the evaluator reads them back ([Note: ranks sharing cores] in evaluate.py)
    shared, idle = min(round(oversubscribed, 3), round(slowdown, 3)), round(idle, 3)
    p2p = transfer_overhead(busy, action, step, shared, idle)
    p2p_tensor = tensor_overhead(busy_more, action, step, p2p, BUSY_EXTRA_TENSORS, shared, idle)
    node, node_b, dt, dt_b = tp_node_overheads(device, reps)
    tensor_s, bandwidth = optimizer_overheads(_optimizer_samples(device, reps))
    zero1 = zero1_overhead(device, link, reps, tensor_s, bandwidth)
    ckpt, ckpt_b, ckpt_node = checkpoint_overheads(device, reps)
    overlap = comm_overlap(device, reps)
    split, split_w = split_backward_overheads(device, reps)
    accumulate = grad_accumulate_bandwidth(device, reps)
    fsdp_f, fsdp_b, opt_dt = fsdp_overheads(_fsdp_sample(device, max(reps, FSDP_ROUNDS)), link)
    us = lambda x: _sig(x * 1e6)  # noqa: E731  # the file's units: exact when read back
    return Overheads.from_file(dict(
        action_us=us(action), multi_action_us=us(multi["loop"]), v_action_us=us(multi["v"]), step_us=us(step),
        tp_node_forward_us=us(node), tp_node_backward_us=us(node_b),
        dtensor_op_forward_us=us(dt), dtensor_op_backward_us=us(dt_b), optimizer_tensor_us=us(tensor_s),
        optimizer_dtensor_us=us(opt_dt), zero1_tensor_us=us(zero1), fsdp_unit_forward_us=us(fsdp_f), fsdp_unit_backward_us=us(fsdp_b),
        optimizer_gbps=_sig(bandwidth / 1e9), checkpoint_forward_us=us(ckpt), checkpoint_backward_us=us(ckpt_b),
        checkpoint_node_forward_us=us(ckpt_node), p2p_transfer_us=us(p2p), p2p_tensor_us=us(p2p_tensor),
        split_backward_node_us=us(split),
        split_backward_param_us=us(split_w), grad_accumulate_gbps=_sig(accumulate / 1e9),
        comm_overlap=round(overlap, 3), compute_slowdown=round(slowdown, 3),
        oversubscribed=shared, idle_core_use=idle, **collective_fields(link)))


def collective_fields(link: LinkFit | None) -> dict[str, float]:
    """The ``[overheads]`` keys of ``link``'s collective factors ([Note: fitting alpha-beta]); none without it."""
    return {f"{kind}_factor": _sig(f) for kind, f in link.factors.items()} if link is not None else {}


def _sig(x: float) -> float:
    """Four significant digits: measured figures, not more precise than that."""
    return float(f"{x:.4g}")


def calibrated_cluster(base: Cluster, report: CalibrationReport) -> Cluster:
    """``base`` with the measured links and efficiencies; see the module's notes."""
    intra, inter = base.intra_node, base.inter_node
    if "intra" in report.links:
        f = report.links["intra"]
        intra = LinkSpec(_sig(f.bandwidth), _sig(f.latency), f"{base.intra_node.name or 'intra-node'} (measured)")
    if "inter" in report.links:
        f = report.links["inter"]
        inter = LinkSpec(_sig(f.bandwidth), _sig(f.latency), f"{base.inter_node.name or 'inter-node'} (measured)")
    elif base.nodes == 1:
        inter = intra  # one node: nothing crosses nodes, keep the file self-consistent
    dev = base.device
    c = report.compute
    peak = dev.peak_flops.get(c.dtype)
    peaks = dict(dev.peak_flops)
    if peak is None or c.matmul_flops > peak:
        peaks[c.dtype] = float(f"{c.matmul_flops:.3g}")
        matmul = 1.0
    else:
        matmul = round(c.matmul_flops / peak, 3)
    bandwidth = dev.memory_bandwidth
    if c.memory_bandwidth > bandwidth:
        bandwidth = float(f"{c.memory_bandwidth:.3g}")
        elementwise = 1.0
    else:
        elementwise = round(c.memory_bandwidth / bandwidth, 3)
    device = DeviceSpec(dev.name, dev.memory_bytes, peaks, bandwidth)
    eff = replace(base.efficiency, matmul=matmul, elementwise=elementwise, comm=1.0)
    name = base.name if base.name.endswith("-calibrated") else f"{base.name}-calibrated"
    overheads = report.overheads if report.overheads.measured else base.overheads
    return Cluster(name, base.nodes, base.devices_per_node, device, intra, inter, eff, overheads)

