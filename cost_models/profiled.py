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

[Note: the loss's time]
The captured graph ends at the model's outputs; the loss the runtime applies
to them (``F.cross_entropy`` over the logits for a model of token ids, else
``F.mse_loss``) runs on the last stage, forward and backward, every
micro-batch. On the 2-core CPU of development a 50,257-token cross-entropy
costs half as much as the head's GEMMs (74 ms forward and backward for 256
tokens; benchmarks/results/2026-12-05-loss-cost.md), and leaving it out put a
GPT-2 plan's head stage at half its measured time. The profiler times the
loss on the outputs' shape at the capture batch (``ProfileResult.loss``); this
model answers ``loss_time`` with it, scaled by the outputs' bytes asked for
over those measured (linearly: on the CPU it grows faster than the tokens, 22
ms at 128 and 74 ms at 256, which a linear scaling from the capture batch
misses). The evaluator puts it on the model's last block (``BlockCost.loss``).
The analytic model prices it at zero: on a GPU it is a
memory-bound kernel of a few passes over the logits (GPT-3's 2048 x 50,257
bf16 logits: about 0.6 ms per micro-batch at 2 TB/s), a fraction of a
percent of the presets' steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .base import CollectiveKind, CostModel, NodeRef, OpTime

__all__ = ["MeasuredOp", "MeasuredLoss", "MeasuredCostModel"]


@dataclass(frozen=True, slots=True)
class MeasuredLoss:
    """The training loss timed on the model's outputs at the capture batch ([Note: the loss's time])."""

    kind: str  # "cross_entropy" or "mse"
    output_bytes: float  # the outputs it was timed on
    forward_s: float
    backward_s: float


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
    loss: MeasuredLoss | None = None

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

    def loss_time(self, kind: str, output_bytes: float) -> OpTime:
        m = self.loss
        if m is None or m.kind != kind or m.output_bytes <= 0:
            return self.base.loss_time(kind, output_bytes)
        share = output_bytes / m.output_bytes  # [Note: the loss's time]: linear in the outputs
        return OpTime(m.forward_s * share, m.backward_s * share)
