"""The analytic cost model: a roofline for ops and an alpha-beta model for communication.

The default ``CostModel`` of autopart. An op takes
``max(flops / (peak * eff[class]), bytes / (bandwidth * eff.elementwise))``
plus a fixed launch overhead; a collective takes the ring algorithm's volume
over the link it crosses, ``latency * steps + bytes_on_wire / (bandwidth * eff.comm)``
(times a measured ``overheads.<kind>_factor`` on a calibrated cluster),
and a group spanning nodes runs hierarchically (reduce-scatter inside each
node, all-reduce across nodes on the shard, all-gather inside each node), as
NCCL does. Datasheet figures come from the ``Cluster``; the efficiency
factors are the cluster's ``Efficiency`` assumptions.

[Note: mesh rank order]
Mesh ranks are laid out as Megatron-LM does: tensor-parallel rank fastest, then
data-parallel, then pipeline stage: ``rank = (stage * dp + d) * tp + t``. So a
tensor-parallel group of up to ``devices_per_node`` ranks stays inside a node,
and pipeline neighbours are ``tp * dp`` ranks apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from .base import COLLECTIVES, CollectiveKind, NodeRef, OpTime, op_class

if TYPE_CHECKING:  # cost_models is imported by partitioner; keep the import one-way at run time
    from partitioner.cluster import Cluster

__all__ = ["AnalyticCostModel"]


@dataclass(frozen=True)
class AnalyticCostModel:
    """Roofline + alpha-beta costs on ``cluster``.

    ``kernel_overhead_s`` is the fixed cost of launching one op (an
    assumption: a few microseconds of CUDA launch and framework overhead per
    kernel, larger on CPU where the dispatcher dominates small ops).
    """

    cluster: "Cluster"
    kernel_overhead_s: float | None = None  # None: 4 us on accelerators, 10 us on CPU
    # Nodes a group of ranks spans, by group: the search prices the same groups many times over.
    _spans: dict[tuple[int, ...], int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def overhead(self) -> float:
        if self.kernel_overhead_s is not None:
            return self.kernel_overhead_s
        return 10e-6 if self.cluster.name.startswith("local-cpu") else 4e-6

    # --- compute ----------------------------------------------------------------------

    def node_time(
        self, op: str, forward_flops: float, backward_flops: float, bytes_moved: float, dtype: str,
        node: NodeRef | None = None, param_bytes: float = 0.0,
    ) -> OpTime:
        if forward_flops == 0 and backward_flops == 0 and bytes_moved == 0:
            return OpTime(0.0, 0.0)  # views and metadata ops launch no kernel
        dev = self.cluster.device
        eff = self.cluster.efficiency
        cls = op_class(op)
        factor = eff.matmul if cls == "matmul" else eff.attention if cls == "attention" else eff.elementwise
        peak = dev.flops(dtype) * factor
        bw = dev.memory_bandwidth * eff.elementwise
        fwd = max(forward_flops / peak, bytes_moved / bw) + self.overhead
        # Backward reads the saved inputs and the incoming gradient and writes
        # the input gradients: about twice the forward traffic.
        bwd = max(backward_flops / peak, 2 * bytes_moved / bw) + self.overhead
        return OpTime(fwd, bwd)

    # --- communication ----------------------------------------------------------------

    def loss_time(self, kind: str, output_bytes: float) -> OpTime:
        """Not priced without a measurement ([Note: the loss's time] in profiled.py)."""
        return OpTime(0.0, 0.0)

    def split_share(self, block: str, micro_batch: int) -> None:
        """Not known without a measurement: the evaluator prices the split by the calibrated overheads."""
        return None

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        if nbytes <= 0 or src == dst:
            return 0.0
        link = self.cluster.intra_node if self.cluster.node_of(src) == self.cluster.node_of(dst) else self.cluster.inter_node
        return link.latency + nbytes / (link.bandwidth * self.cluster.efficiency.comm)

    def collective_time(self, kind: CollectiveKind, nbytes: float, ranks: Sequence[int]) -> float:
        """Ring collectives; hierarchical when the group spans nodes.

        For a group of ``k`` ranks on ``n`` nodes with ``g = k / n`` per node
        (all-reduce; all-gather and reduce-scatter are each one half of it):

        * one node: ``2 (k-1)/k * S / B_intra + 2 (k-1) * a_intra``;
        * one rank per node: the same ring over the inter-node link;
        * otherwise: reduce-scatter over g inside the node, all-reduce of the
          ``S/g`` shard across n nodes (each rank on its own NIC), all-gather
          over g inside the node.
        """
        if kind not in COLLECTIVES:
            raise ValueError(f"unknown collective {kind!r}; expected one of {COLLECTIVES}")
        k = len(ranks)
        if k <= 1 or nbytes <= 0:
            return 0.0
        # all-gather / reduce-scatter move half an all-reduce's volume; a broadcast is priced as an all-gather
        # (ZeRO-1 prices each tensor's broadcast from its owner as an all-gather of its 1/dp share)
        half = kind != "all_reduce"
        group = tuple(ranks)
        n = self._spans.get(group)
        if n is None:
            n = self._spans[group] = len({self.cluster.node_of(r) for r in group})
        g = max(1, k // n)
        intra, inter = self.cluster.intra_node, self.cluster.inter_node
        eff = self.cluster.efficiency.comm

        def ring(size: float, members: int, link) -> float:  # an all-reduce
            if members <= 1:
                return 0.0
            return 2 * (members - 1) / members * size / (link.bandwidth * eff) + 2 * (members - 1) * link.latency

        if n == 1:
            t = ring(nbytes, k, intra)
        elif g == 1:
            t = ring(nbytes, k, inter)
        else:
            t = ring(nbytes, g, intra) + ring(nbytes / g, n, inter)
        # gloo's collectives take longer than the ring on the link they were fitted to ([Note: software
        # overheads] in overheads.py); 1 on every GPU preset
        return (t / 2 if half else t) * self.cluster.overheads.collective_factor(kind)
