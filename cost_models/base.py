"""The interface every cost model implements, and the small value types it speaks.

autopart prices a plan through one narrow interface so that the analytic
roofline model (this package), a profiler's measurements and a calibrated
model are interchangeable: planners and the simulator only ever call
``node_time``, ``collective_time`` and ``p2p_time``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, TypeVar, runtime_checkable

__all__ = ["OpTime", "NodeRef", "CollectiveKind", "COLLECTIVES", "CostModel", "SplitShare", "op_class", "load_record"]

CollectiveKind = str  # one of COLLECTIVES
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


@dataclass(frozen=True, slots=True)
class OpTime:
    """Time of one node (or a sum of nodes) for one micro-batch."""

    forward_s: float
    backward_s: float

    def __add__(self, other: "OpTime") -> "OpTime":
        return OpTime(self.forward_s + other.forward_s, self.backward_s + other.backward_s)


@dataclass(frozen=True, slots=True)
class NodeRef:
    """Which graph node a ``node_time`` call prices, and in which tensor-parallel variant.

    Analytic models ignore it; a measured model looks its measurements up by it
    (see cost_models/profiled.py).
    """

    name: str  # FX node name
    strategy: str = "replicate"  # the node's sharding strategy (sharding.STRATEGIES)
    tp: int = 1  # tensor-parallel degree the strategy divides by


_MATMUL = ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "conv", "einsum", "_convolution")
# Attention kernels (scaled_dot_product_*, _flash_attention_*, _efficient_attention_*, ...): the one
# classification that pricing and tensor parallelism (partitioner/tp_strategies.py) both read.
_ATTENTION = ("scaled_dot_product", "attention")


def op_class(target: str) -> str:
    """'matmul', 'attention' or 'elementwise': which efficiency factor prices an op."""
    base = target.removeprefix("aten.").split(".")[0].lower()
    if any(base.startswith(a) or a in base for a in _ATTENTION):
        return "attention"
    if any(base == m or base.startswith(m) for m in _MATMUL):
        return "matmul"
    return "elementwise"


@runtime_checkable
class CostModel(Protocol):
    """Prices compute and communication on a cluster.

    ``node_time`` receives the node's FLOPs and bytes already scaled to the
    micro-batch (see [Note: costs are per capture batch] in capture.py).
    """

    def node_time(
        self, op: str, forward_flops: float, backward_flops: float, bytes_moved: float, dtype: str,
        node: NodeRef | None = None, param_bytes: float = 0.0,
    ) -> OpTime:
        """Forward and backward seconds of one op on one device.

        ``node`` says which node, if known; ``param_bytes`` is the part of
        ``bytes_moved`` that is the op's parameters (an embedding's backward
        writes a gradient as large as its whole table, however few rows it read).
        """
        ...

    def collective_time(self, kind: CollectiveKind, nbytes: float, ranks: Sequence[int]) -> float:
        """Seconds for a collective of ``nbytes`` per rank over the group ``ranks``."""
        ...

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        """Seconds to send ``nbytes`` from rank ``src`` to rank ``dst``."""
        ...

    def loss_time(self, kind: str, output_bytes: float) -> OpTime:
        """Forward and backward seconds of the training loss ``kind`` (``cross_entropy``, ``mse``) on the
        model's outputs of ``output_bytes`` (one micro-batch), on the last stage ([Note: the loss's time]
        in profiled.py); zero where nothing measured it."""
        ...

    def split_share(self, block: str, micro_batch: int) -> "SplitShare | None":
        """How ``block``'s backward of a micro-batch of ``micro_batch`` samples runs when torch's zero-bubble
        schedules split it ([Note: the split backward per block] in partitioner/profile/__init__.py); None
        where nothing measured it (the evaluator then prices the split by the calibrated overheads)."""
        ...


@dataclass(frozen=True, slots=True)
class SplitShare:
    """A block's backward split as torch's zero-bubble schedules run it (``stage_backward_input``, I, then
    ``stage_backward_weight``, W), against the same backward run whole, measured at ``micro_batch`` samples:
    ``ratio = (I + W) / whole`` and ``weight = W / (I + W)``."""

    micro_batch: int
    ratio: float
    weight: float

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or not self.ratio > 0 or not 0 <= self.weight <= 1:
            raise ValueError(f"bad split share {self!r}")


R = TypeVar("R")


def load_record(cls: type[R], path: Path, what: str, fix: str) -> R:
    """``cls(**json)`` of the measured record at ``path`` (the memory margin, the step-time error). Raises
    ValueError naming the file and what it should hold when it is missing or malformed, with ``fix``."""
    try:
        data: Any = json.loads(path.read_text())
        return cls(**data)
    except FileNotFoundError:
        raise ValueError(f"{path}: no {what} recorded; {fix}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a {what} record ({exc}); {fix}") from None
