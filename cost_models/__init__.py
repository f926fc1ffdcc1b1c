"""Ways of pricing a node or a collective, behind one small interface (``CostModel``).

``AnalyticCostModel`` is the roofline + alpha-beta model; measured and
calibrated models (profiler) implement the same protocol.
"""

from .analytic import AnalyticCostModel
from .base import COLLECTIVES, CostModel, OpTime, op_class
from .memory import OPTIMIZERS, OptimizerSpec, static_bytes

__all__ = [
    "AnalyticCostModel",
    "COLLECTIVES",
    "CostModel",
    "OpTime",
    "op_class",
    "OPTIMIZERS",
    "OptimizerSpec",
    "static_bytes",
]
