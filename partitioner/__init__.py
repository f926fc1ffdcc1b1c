"""autopart: automatic pipeline, tensor and data-parallel partitioning for PyTorch training.

The flow (one module per phase): ``capture`` (trace + annotate) -> ``graph``
(blocks) -> ``evaluate`` with ``cost_models`` -> planners (``baselines``) ->
``Plan`` -> ``simulate``. ``plan_parallelism`` runs it end to end.
"""

from .baselines import METHODS, Pins, plan_baseline
from .capture import CapturedModel, capture
from .cluster import Cluster, DeviceSpec, Efficiency, LinkSpec, load_cluster
from .errors import AutopartError, CaptureError, ClusterError, InfeasibleError, PlanError
from .evaluate import Evaluator, StageSpec
from .graph import Block, PartitionGraph, build_partition_graph
from .plan import Mesh, Plan, Schedule, Training
from .planner import ALL_METHODS, PlanResult, manual_plan, plan_parallelism, prepare, score_plan
from .simulate import SimResult, StageCost, simulate


def auto_parallelize(*args, **kwargs):  # noqa: D103 - documented in runtime/entry.py; imported lazily (torch.distributed)
    from .runtime import auto_parallelize as impl

    return impl(*args, **kwargs)


auto_parallelize.__doc__ = "Plan and build the distributed model on this rank; see partitioner.runtime.auto_parallelize."

__all__ = [
    "METHODS", "Pins", "plan_baseline", "CapturedModel", "capture", "Cluster", "DeviceSpec", "Efficiency",
    "LinkSpec", "load_cluster", "AutopartError", "CaptureError", "ClusterError", "InfeasibleError", "PlanError",
    "Evaluator", "StageSpec", "Block", "PartitionGraph", "build_partition_graph", "Mesh", "Plan", "Schedule",
    "Training", "ALL_METHODS", "PlanResult", "manual_plan", "plan_parallelism", "prepare", "score_plan", "SimResult", "StageCost", "simulate",
    "auto_parallelize",
]
