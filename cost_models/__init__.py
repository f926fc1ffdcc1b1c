"""Ways of pricing a node or a collective, behind one small interface (``CostModel``).

``AnalyticCostModel`` is the roofline + alpha-beta model;
``CalibratedCostModel`` fits its constants to measured kernels; and
``MeasuredCostModel`` answers with the profiler's measurements of the nodes
themselves. All three implement the same protocol. ``Overheads`` holds the
measured software costs (per pipeline action, per tensor-parallel node, the
optimizer step) that the evaluator adds on top of any of them.
"""

from .analytic import AnalyticCostModel
from .base import COLLECTIVES, CostModel, NodeRef, OpTime, SplitShare, op_class
from .calibrated import Calibration, CalibratedCostModel, OpFit, Sample, fit_calibration
from .profiled import MeasuredCostModel, MeasuredLoss, MeasuredOp
from .memory import (
    LOSSES,
    MASTER_GRAD_CHUNK,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    LossMemory,
    OptimizerSpec,
    RecordedMargin,
    loss_memory,
    optimizer_impl,
    optimizer_spec,
    optimizer_workspace_bytes,
    recorded_margin,
    static_bytes,
)
from .overheads import Overheads
from .step_error import RecordedStepError, recorded_step_error

__all__ = [
    "AnalyticCostModel",
    "CalibratedCostModel",
    "Calibration",
    "MeasuredCostModel",
    "MeasuredOp",
    "MeasuredLoss",
    "SplitShare",
    "NodeRef",
    "Overheads",
    "OpFit",
    "Sample",
    "fit_calibration",
    "COLLECTIVES",
    "CostModel",
    "OpTime",
    "op_class",
    "OPTIMIZERS",
    "optimizer_spec",
    "OptimizerSpec",
    "static_bytes",
    "LOSSES",
    "LossMemory",
    "loss_memory",
    "optimizer_workspace_bytes",
    "OPTIMIZER_IMPLS",
    "MASTER_GRAD_CHUNK",
    "optimizer_impl",
    "RecordedMargin",
    "recorded_margin",
    "RecordedStepError",
    "recorded_step_error",
]
