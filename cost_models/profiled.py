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
misses; [Note: measured at several micro-batch sizes] removes that where it
was measured at the size asked). The evaluator puts it on the model's last
block (``BlockCost.loss``).
The analytic model prices it at zero: on a GPU it is a
memory-bound kernel of a few passes over the logits (GPT-3's 2048 x 50,257
bf16 logits: about 0.6 ms per micro-batch at 2 TB/s), a fraction of a
percent of the presets' steps.

[Note: measured at several micro-batch sizes]
A time is not linear in the micro-batch. On the development CPU GPT-2's
50,257-row head takes 49 ms forward and backward for 128 tokens and 129 ms
for 256 (2.6x for twice the tokens: its logits leave the cache), and the
cross-entropy over them 22 and 74 ms; on a GPU a small GEMM gains efficiency
as it grows. Scaling one measurement by the base model's ratio misses both:
a plan of micro-batches of 4 x 64 tokens, priced from the capture batch of
64, came out 43% under its measured step. So the planner also profiles the
model re-captured at other micro-batch sizes its search may choose
(``profile.micro_batches_to_profile``; nodes matched by stable key,
``profile.matched_nodes``), and a node's measurements at every
size are its points. A size asked for is placed among them by its work, the
FLOPs plus bytes of that direction (each affine in the micro-batch): at a
measured work it is priced exactly as measured, between two points linearly
in work, and beyond the points as [Note: scaling a measurement] says from the
nearest one (a size above the largest; a shard whose work lies below the
capture batch's; an unmeasured shard at a larger size may fall between two
of its whole op's points and be interpolated).
Points of one work (a view, a node whose work does not grow with the batch)
keep the first, the capture batch's. The work, not the base model's time, is
the axis: a calibrated fit clamped at its floor gives two sizes of a small
op one base time, and the size asked for was then priced at the other
size's measurement (CI, stop 27: an attention backward at 2 samples priced
at 1 sample's 34.8 us instead of its own 29.4 us). The loss is interpolated
in the same way, in its outputs' bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .base import CollectiveKind, CostModel, NodeRef, OpTime, SplitShare

__all__ = ["MeasuredOp", "MeasuredLoss", "MeasuredCostModel", "Point", "interpolate"]


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


@dataclass(frozen=True, slots=True)
class Point:
    """One measurement as ``interpolate`` places it: its work (the axis), the base model's time for that
    work (for scaling beyond the points; for the loss, its outputs' bytes again: the loss scales in
    proportion) and the time measured."""

    work: float
    base_s: float
    measured_s: float


def interpolate(points: Sequence[Point], work: float, base_s: float) -> float:
    """The time at ``work`` (whose base model time is ``base_s``) from measured ``points`` ([Note: measured
    at several micro-batch sizes]): as measured at a point's work, linear in work between the two around it,
    scaled by the base model from the nearest beyond them; of points of one work, the first."""
    pts: dict[float, Point] = {}
    for p in points:
        pts.setdefault(p.work, p)
    ordered = sorted(pts.values(), key=lambda p: p.work)
    lo, hi = ordered[0], ordered[-1]
    if work in pts:
        return pts[work].measured_s
    if work < lo.work or work > hi.work or len(ordered) == 1:
        near = lo if work < lo.work else hi
        return near.measured_s * base_s / near.base_s if near.base_s > 0 else near.measured_s
    for a, b in zip(ordered, ordered[1:]):
        if a.work < work < b.work:
            return a.measured_s + (b.measured_s - a.measured_s) * (work - a.work) / (b.work - a.work)
    raise AssertionError("unreachable: the work lies between the first point's and the last's")


@dataclass(frozen=True)
class MeasuredCostModel:
    """Measured node times where there are some; ``base`` for the rest and for communication.

    ``measured`` and ``loss`` are at the capture batch; ``other_sizes`` and ``other_losses`` the same
    nodes and loss measured at other micro-batch sizes ([Note: measured at several micro-batch sizes]).
    """

    base: CostModel
    measured: Mapping[NodeRef, MeasuredOp]
    loss: MeasuredLoss | None = None
    other_sizes: Mapping[NodeRef, tuple[MeasuredOp, ...]] = field(default_factory=dict)
    other_losses: tuple[MeasuredLoss, ...] = ()
    # block name -> its split backward at each micro-batch size measured ([Note: the split backward per
    # block] in partitioner/profile/__init__.py)
    split_shares: Mapping[str, tuple[SplitShare, ...]] = field(default_factory=dict)

    def node_time(
        self, op: str, forward_flops: float, backward_flops: float, bytes_moved: float, dtype: str,
        node: NodeRef | None = None, param_bytes: float = 0.0,
    ) -> OpTime:
        asked = self.base.node_time(op, forward_flops, backward_flops, bytes_moved, dtype, node, param_bytes)
        if node is None:
            return asked
        ref = node
        if ref not in self.measured and node.tp > 1:
            ref = NodeRef(node.name)  # an unmeasured shard: scale the whole op
        m = self.measured.get(ref)
        if m is None:
            return asked
        points = (m, *self.other_sizes.get(ref, ()))
        at = [self.base.node_time(op, p.forward_flops, p.backward_flops, p.bytes_moved, dtype, node, p.param_bytes)
              for p in points]
        return OpTime(
            interpolate([Point(p.forward_flops + p.bytes_moved, a.forward_s, p.forward_s) for a, p in zip(at, points)],
                        forward_flops + bytes_moved, asked.forward_s),
            interpolate([Point(p.backward_flops + p.bytes_moved, a.backward_s, p.backward_s)
                         for a, p in zip(at, points)], backward_flops + bytes_moved, asked.backward_s),
        )

    def collective_time(self, kind: CollectiveKind, nbytes: float, ranks: Sequence[int]) -> float:
        return self.base.collective_time(kind, nbytes, ranks)

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        return self.base.p2p_time(nbytes, src, dst)

    def split_share(self, block: str, micro_batch: int) -> SplitShare | None:
        """The block's split measured at the micro-batch size nearest ``micro_batch`` (by ratio; of two as
        near, the smaller); None where it was not measured (no model prices a split without measuring one)."""
        shares = self.split_shares.get(block)
        if not shares:
            return None
        return min(shares, key=lambda m: (abs(math.log(m.micro_batch / micro_batch)), m.micro_batch))

    def loss_time(self, kind: str, output_bytes: float) -> OpTime:
        m = self.loss
        if m is None or m.kind != kind or m.output_bytes <= 0:
            return self.base.loss_time(kind, output_bytes)
        points = [m, *(o for o in self.other_losses if o.kind == kind and o.output_bytes > 0)]
        return OpTime(interpolate([Point(p.output_bytes, p.output_bytes, p.forward_s) for p in points],
                                  output_bytes, output_bytes),
                      interpolate([Point(p.output_bytes, p.output_bytes, p.backward_s) for p in points],
                                  output_bytes, output_bytes))
