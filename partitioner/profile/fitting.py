"""From measurements to the planner's cost model (measured and calibrated), and back to a fidelity report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cost_models import MeasuredCostModel

from ..graph import PartitionGraph
from .values import ProfileError, ProfileOptions, ProfileResult, device_name
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


@dataclass(frozen=True)
class Profiled:
    """A profiling run turned into the planner's cost model."""

    result: ProfileResult
    calibration: "Calibration"
    cost_model: MeasuredCostModel  # measured nodes, calibrated model for the rest


def profile_for_planning(
    pgraph: PartitionGraph,
    cluster: "Cluster",
    cache: ProfileCache,
    options: ProfileOptions,
) -> Profiled:
    """Measure ``pgraph`` (reading the cache), fit the calibrated model, and build the measured cost model.

    On a ``local-cpu`` cluster the measurement runs with the thread count one
    rank of that cluster gets, so that the costs describe the ranks that will run.
    """
    from cost_models import AnalyticCostModel, CalibratedCostModel

    check_device(cluster, options.device)
    threads = torch.get_num_threads()
    if torch.device(options.device).type == "cpu":
        torch.set_num_threads(cpu_threads_for(cluster))
    try:
        result = profile_model(pgraph, cache, options)
        calib = calibration(cache, result.device, result.torch_version)
    finally:
        torch.set_num_threads(threads)
    base = CalibratedCostModel(AnalyticCostModel(cluster), calib)
    return Profiled(result, calib, result.cost_model(base))


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

