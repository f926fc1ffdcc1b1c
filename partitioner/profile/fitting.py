"""From measurements to the planner's cost model (measured and calibrated), and back to a fidelity report."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from cost_models import MeasuredCostModel, MeasuredLoss, MeasuredOp, NodeRef, SplitShare

from ..errors import one_line
from ..graph import PartitionGraph
from .values import ProfileError, ProfileOptions, ProfileResult, ProfileStats, device_name
from .cache import ProfileCache
from .timing import profile_model

if TYPE_CHECKING:
    from cost_models import Calibration

    from ..cluster import Cluster


# --------------------------------------------------------------------------------------
# From measurements to the planner's cost model, and back to a report
# --------------------------------------------------------------------------------------


def calibration(cache: ProfileCache, device: str, torch_version: str | None = None) -> "Calibration":
    """Fit the calibrated op model to every node ``device`` has in the cache (all models profiled there)."""
    from cost_models import fit_calibration

    return fit_calibration(device, cache.samples(device, torch_version or torch.__version__))


def gpu_preset(gpu: str) -> str:
    """The cluster preset whose device is ``gpu`` (a torch.cuda.get_device_name()), for reports."""
    name = gpu.upper()
    if "H200" in name:
        return "dgx-h200"
    if "H100" in name:
        return "dgx-h100"
    if "A100" in name:
        return "dgx-a100-80g" if "80" in name else "dgx-a100-40g"
    if "V100" in name:
        return "p3-v100"
    raise ProfileError(f"no cluster preset has a {gpu}; write a cluster file for it (docs/cluster.md) and pass --cluster")


def check_device(cluster: "Cluster", device: str) -> None:
    """Measured costs only describe the cluster if the cluster's devices are the one measured."""
    kind = torch.device(device).type
    gpu_cluster = not cluster.name.startswith("local-cpu") and "cpu" not in cluster.device.name.lower()
    if kind == "cpu" and gpu_cluster:
        raise ProfileError(
            f"--profile measures this machine's CPU, but --cluster {cluster.name} has {cluster.device.name} devices; "
            "plan with --cluster local-cpu[:N] here, or profile on that GPU with --device cuda"
        )
    if kind == "cuda":
        have = device_name(device)
        words = [w for w in ("A100", "H100", "H200", "V100", "L40", "B200") if w in cluster.device.name.upper()]
        if not gpu_cluster or (words and not any(w in have.upper() for w in words)):
            raise ProfileError(
                f"--device {device} is a {have}, but --cluster {cluster.name} has {cluster.device.name} devices; "
                "give the cluster of the GPU measured"
            )


def cpu_threads_for(cluster: "Cluster") -> int:
    """Threads one process of a ``local-cpu`` cluster gets: this machine's CPUs shared among its ranks."""
    from ..cluster import available_cpus

    return max(1, available_cpus() // max(1, cluster.devices_per_node))


def profile_clock(cluster: "Cluster", device: str) -> str:
    """The profiler's clock for ``cluster``: on a CPU cluster whose calibration measured the ranks' compute
    slowdown, an op's CPU time alone, which the slowdown turns into wall time ([Note: measured device
    efficiencies] in calibrate.py); else wall time."""
    cpu = torch.device(device).type == "cpu"
    return "cpu" if cpu and cluster.overheads.compute_slowdown != 1.0 else "wall"


# At most this many micro-batch sizes are profiled by default, the capture batch's among them
# ([Note: measured at several micro-batch sizes] in cost_models/profiled.py).
PROFILED_SIZES = 4


def micro_batches_to_profile(capture_batch: int, world: int, global_batch: int, *, pp: int | None = None,
                             tp: int | None = None, dp: int | None = None, microbatches: int | None = None,
                             most: int = PROFILED_SIZES) -> tuple[int, ...]:
    """Micro-batch sizes besides ``capture_batch`` to profile the model at: of the sizes the ILP's search
    may choose for ``world`` devices and ``global_batch`` samples under these pins (``--microbatches``
    pins one per data-parallel width; else the search's sizes that divide a replica's batch), all if
    there are few, else the smallest, the largest, and the rest spread evenly between them in log scale;
    ``most`` counts the capture batch. Increasing. (The baselines' grids also try other divisors: those
    are priced between the sizes measured.)"""
    from ..baselines import SEARCH_MICRO_BATCH_SIZES, micro_batch_sizes

    if dp:
        dps = [dp]
    elif pp and tp:
        dps = [world // (pp * tp)] if world % (pp * tp) == 0 else []
    else:
        fixed = (pp or 1) * (tp or 1)
        dps = [d for d in range(1, world + 1) if world % d == 0 and (world // d) % fixed == 0]
    sizes: set[int] = set()
    for d in dps:
        if d > 0 and global_batch % d == 0:
            sizes.update(micro_batch_sizes(global_batch // d, microbatches, SEARCH_MICRO_BATCH_SIZES))
    sizes.discard(capture_batch)
    ordered = sorted(b for b in sizes if b > 0)
    room = max(0, most - 1)
    if len(ordered) <= room:
        return tuple(ordered)
    if room == 0:
        return ()
    if room == 1:
        return (ordered[-1],)
    lo, hi = math.log(ordered[0]), math.log(ordered[-1])
    picked: list[int] = []
    for i in range(room):
        target = lo + (hi - lo) * i / (room - 1)
        best = min((b for b in ordered if b not in picked), key=lambda b: (abs(math.log(b) - target), b))
        picked.append(best)
    return tuple(sorted(picked))


def recaptured(model: torch.nn.Module, example_inputs: Sequence[Any], example_kwargs: Mapping[str, Any] | None,
               name: str, sizes: Sequence[int], vocab_chunks: int = 1) -> tuple[dict[int, PartitionGraph], dict[int, str]]:
    """``model`` captured again with its positional inputs resized to each micro-batch size (as the runtime
    builds its stages, ``rewrite.microbatch_inputs``; keyword inputs as given): the graphs to profile at
    those sizes, and the sizes that could not be captured, each with why."""
    from ..capture import capture
    from ..errors import AutopartError
    from ..graph import build_partition_graph
    from ..rewrite import microbatch_inputs

    out, failed = {}, {}
    for b in sizes:
        try:
            cap = capture(model, microbatch_inputs(example_inputs, b), example_kwargs, name=name, batch_size=b,
                          vocab_chunks=vocab_chunks)
            out[b] = build_partition_graph(cap, model)
        except AutopartError as exc:
            failed[b] = one_line(exc, 160)
    return out, failed


@dataclass(frozen=True)
class Profiled:
    """A profiling run turned into the planner's cost model."""

    result: ProfileResult  # at the capture batch
    calibration: "Calibration"
    cost_model: MeasuredCostModel  # measured nodes, calibrated model for the rest
    others: Mapping[int, ProfileResult] = field(default_factory=dict)  # micro-batch size -> its measurements
    skipped: Mapping[int, str] = field(default_factory=dict)  # sizes that could not be profiled -> why

    @property
    def stats(self) -> ProfileStats:
        """Every size's measurements together."""
        runs = [self.result.stats, *(r.stats for r in self.others.values())]
        return ProfileStats(sum(r.measured for r in runs), sum(r.cached for r in runs), sum(r.corrupt for r in runs),
                            sum(r.unmeasured for r in runs), sum(r.profiling_s for r in runs))

    def sizes_said(self, capture_batch: int) -> str:
        """``"at micro-batch sizes 1, 2, 4"`` (empty with the capture batch alone), and what was skipped."""
        if not self.others and not self.skipped:
            return ""
        said = " at micro-batch sizes " + ", ".join(str(b) for b in sorted({capture_batch, *self.others}))
        return said + "".join(f" (not {b}: {why})" for b, why in sorted(self.skipped.items()))

    def summary(self, capture_batch: int, cache_path: Path | str, moved_aside: Path | None = None) -> str:
        """The one line ``autopart plan --profile`` prints and ``autopart compare`` reports: where and at
        which sizes the model was profiled, what was measured and read from the cache, and how long."""
        st = self.stats
        budget = f", {st.unmeasured} left to the calibrated model (budget)" if st.unmeasured else ""
        corrupt = f", {st.corrupt} corrupt cache entries measured again" if st.corrupt else ""
        aside = f"; the unreadable cache file was moved to {moved_aside}" if moved_aside else ""
        return (f"profiled on {self.result.device}{self.sizes_said(capture_batch)}: {st.measured} measured, "
                f"{st.cached} from the cache{corrupt}{budget} in {st.profiling_s:.2f} s (cache {cache_path}){aside}")


def matched_nodes(pgraph: PartitionGraph, other: PartitionGraph) -> dict[str, str]:
    """``other``'s node names (the model captured at another micro-batch size) -> ``pgraph``'s node that is
    the same: the same stable key (module and occurrence of its op, [Note: stable node keys]) and op, with
    an output that grows with the batch or stays the same size. Names alone could pair different nodes:
    torch.export may add a broadcast at one batch size that another does not have (gpt2-tiny at 1 and 2
    samples), and the names after it shift."""
    mine = {info.key or name: name for name, info in pgraph.captured.nodes.items()}
    k = other.captured.batch_size / pgraph.captured.batch_size
    out = {}
    for name, b in other.captured.nodes.items():
        here = mine.get(b.key or name)
        a = pgraph.captured.nodes.get(here) if here is not None else None
        if a is None or a.target != b.target:
            continue
        if b.output_bytes == a.output_bytes or math.isclose(b.output_bytes, a.output_bytes * k, rel_tol=1e-9):
            out[name] = here
    return out


def measured_cost_model(base, pgraph: PartitionGraph, result: ProfileResult,
                        others: Mapping[int, tuple[PartitionGraph, ProfileResult]] = {}) -> MeasuredCostModel:
    """The planner's cost model: ``result`` (the capture batch) with the same nodes' measurements at the other
    sizes ([Note: measured at several micro-batch sizes] in cost_models/profiled.py), ``base`` for the rest."""
    ops = result.measured_ops()
    more: dict[NodeRef, list[MeasuredOp]] = {}
    losses: list[MeasuredLoss] = []
    for b in sorted(others):
        graph, res = others[b]
        names = matched_nodes(pgraph, graph)
        for ref, m in res.measured_ops().items():
            here = names.get(ref.name)
            mine = NodeRef(here, ref.strategy, ref.tp) if here is not None else None
            if mine in ops:
                more.setdefault(mine, []).append(m)
        if res.loss is not None:
            losses.append(res.loss)
    shares: dict[str, list[SplitShare]] = {}
    for graph, res in [(pgraph, result), *(others[b] for b in sorted(others))]:
        for name, share in split_shares(res, graph.captured.batch_size).items():
            shares.setdefault(name, []).append(share)
    return MeasuredCostModel(base, ops, result.loss, {r: tuple(ms) for r, ms in more.items()}, tuple(losses),
                             {name: tuple(s) for name, s in shares.items()})


def split_shares(result: ProfileResult, micro_batch: int) -> dict[str, SplitShare]:
    """Per block whose split backward was measured, its ``SplitShare`` at ``micro_batch`` samples ([Note: the
    split backward per block] in profile/__init__.py)."""
    out = {}
    for name, m in result.blocks.items():
        if m.backward_input is None or m.backward_weight is None or m.backward.median_s <= 0:
            continue
        split = m.backward_input.median_s + m.backward_weight.median_s
        if split > 0:
            out[name] = SplitShare(micro_batch, split / m.backward.median_s, m.backward_weight.median_s / split)
    return out


def profile_for_planning(
    pgraph: PartitionGraph,
    cluster: "Cluster",
    cache: ProfileCache,
    options: ProfileOptions,
    others: Mapping[int, PartitionGraph] = {},
    not_captured: Mapping[int, str] = {},
) -> Profiled:
    """Measure ``pgraph`` (reading the cache), and each of ``others`` (the model captured at other micro-batch
    sizes, ``recaptured``), fit the calibrated model, and build the measured cost model.

    On a ``local-cpu`` cluster the measurement runs with the thread count one
    rank of that cluster gets, so that the costs describe the ranks that will run.
    A size whose profiling fails (out of memory, or an op that cannot run at that
    size) is left out and said in ``Profiled.skipped``; the capture batch's must succeed.
    """
    from cost_models import AnalyticCostModel, CalibratedCostModel

    check_device(cluster, options.device)
    threads = torch.get_num_threads()
    if torch.device(options.device).type == "cpu":
        torch.set_num_threads(cpu_threads_for(cluster))
    done: dict[int, tuple[PartitionGraph, ProfileResult]] = {}
    skipped: dict[int, str] = dict(not_captured)
    started = time.perf_counter()
    try:
        result = profile_model(pgraph, cache, options)
        for b in sorted(others):
            left = None if options.budget_s is None else options.budget_s - (time.perf_counter() - started)
            if left is not None and left <= 0:  # --profile-budget is for all sizes together
                skipped[b] = "the profile budget was spent"
                continue
            try:
                done[b] = (others[b], profile_model(others[b], cache, replace(options, budget_s=left)))
            except (ProfileError, torch.OutOfMemoryError) as exc:
                skipped[b] = one_line(exc, 160)
        calib = calibration(cache, result.device, result.torch_version)
    finally:
        torch.set_num_threads(threads)
    base = CalibratedCostModel(AnalyticCostModel(cluster), calib)
    return Profiled(result, calib, measured_cost_model(base, pgraph, result, done),
                    {b: r for b, (_, r) in done.items()}, skipped)


@dataclass(frozen=True, slots=True)
class BlockFidelity:
    """One block type: predicted and measured times for one micro-batch of the capture batch."""

    block: str  # the first block of its type
    count: int  # blocks of this type
    measured: tuple[float, float]  # (forward, backward) seconds
    analytic: tuple[float, float]  # the datasheet roofline
    calibrated: tuple[float, float]  # the fitted op model (sum of its nodes)
    spread: float  # the measurement's relative interquartile range, forward

    @staticmethod
    def error(pred: float, meas: float) -> float:
        return (pred - meas) / meas if meas > 0 else 0.0


def fidelity(pgraph: PartitionGraph, result: ProfileResult, cluster: "Cluster", calib: "Calibration",
             dtype: str) -> list[BlockFidelity]:
    """Per block type: analytic and calibrated predictions next to the measurement."""
    from cost_models import AnalyticCostModel, CalibratedCostModel

    from ..evaluate import Evaluator
    from ..plan import Training

    training = Training(global_batch=pgraph.captured.batch_size, dtype=dtype)
    analytic = Evaluator(pgraph, cluster, AnalyticCostModel(cluster), training)
    calibrated = Evaluator(pgraph, cluster, CalibratedCostModel(AnalyticCostModel(cluster), calib), training)
    mb = pgraph.captured.batch_size
    rows: dict[str, list] = {}
    for block in pgraph.blocks:
        m = result.blocks.get(block.name)
        if m is None:
            continue
        key = json.dumps([block.signature, m.forward.median_s])
        if key in rows:
            rows[key][1] += 1
            continue
        a = analytic.block_cost(block, mb, 1, {}).compute
        c = calibrated.block_cost(block, mb, 1, {}).compute
        rows[key] = [block.name, 1, (m.forward.median_s, m.backward.median_s), (a.forward_s, a.backward_s),
                     (c.forward_s, c.backward_s), m.forward.spread]
    return [BlockFidelity(*r) for r in rows.values()]

