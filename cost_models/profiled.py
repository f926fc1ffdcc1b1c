"""The measured cost model: op times the profiler measured on the device, for the nodes it measured.

``partitioner/profile.py`` times every compute node of a model (and the
tensor-parallel shards of its matmuls, embeddings and attention) at the
capture batch. This model answers ``node_time`` for those nodes with their
measurements, so the planner's per-strategy costs are measured, not guessed;
everything else (unmeasured nodes, communication) goes to ``base``, normally
the calibrated model.

[Note: scaling a measurement]
A measurement is taken at one size: the capture batch, one shard. The planner
also asks for other micro-batch sizes (and shards it did not measure). Then
the measurement is scaled by the base model's ratio between the size asked for
and the size measured,

    t(asked) = t_measured * base(asked) / base(measured),

which is exact at the measured size and lets the fitted per-call overhead
keep small ops from scaling linearly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .base import CollectiveKind, CostModel, NodeRef, OpTime

__all__ = ["MeasuredOp", "MeasuredCostModel"]


@dataclass(frozen=True, slots=True)
class MeasuredOp:
    """One node measured in one variant, with the FLOPs and bytes of what was measured."""

    forward_s: float
    backward_s: float
    forward_flops: float
    backward_flops: float
    bytes_moved: float
    param_bytes: float = 0.0


@dataclass(frozen=True)
class MeasuredCostModel:
    """Measured node times where there are some; ``base`` for the rest and for communication."""

    base: CostModel
    measured: Mapping[NodeRef, MeasuredOp]

    def node_time(
        self, op: str, forward_flops: float, backward_flops: float, bytes_moved: float, dtype: str,
        node: NodeRef | None = None, param_bytes: float = 0.0,
    ) -> OpTime:
        asked = self.base.node_time(op, forward_flops, backward_flops, bytes_moved, dtype, node, param_bytes)
        if node is None:
            return asked
        m = self.measured.get(node)
        if m is None and node.tp > 1:
            m = self.measured.get(NodeRef(node.name))  # an unmeasured shard: scale the whole op
        if m is None:
            return asked
        at = self.base.node_time(op, m.forward_flops, m.backward_flops, m.bytes_moved, dtype, node, m.param_bytes)

        def scaled(t: float, base_asked: float, base_at: float) -> float:
            return t * base_asked / base_at if base_at > 0 else t

        return OpTime(
            scaled(m.forward_s, asked.forward_s, at.forward_s),
            scaled(m.backward_s, asked.backward_s, at.backward_s),
        )

    def collective_time(self, kind: CollectiveKind, nbytes: float, ranks: Sequence[int]) -> float:
        return self.base.collective_time(kind, nbytes, ranks)

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        return self.base.p2p_time(nbytes, src, dst)
