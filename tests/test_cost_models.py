"""The analytic cost model (roofline + alpha-beta) and the memory formulas.

Figures are checked against their closed forms on the dgx-a100-80g preset
(NVLink 300 GB/s and 3 us per hop inside a node, IB 25 GB/s and 8 us per hop
between nodes, efficiencies 0.8 matmul / 0.6 attention / 0.7 elementwise /
0.8 comm).
"""

from __future__ import annotations

import pytest

from cost_models import OPTIMIZERS, AnalyticCostModel, CostModel, OpTime, op_class, optimizer_spec, static_bytes
from partitioner.cluster import Cluster

S = 256 * 2**20  # bytes in a collective


@pytest.fixture(scope="module")
def cluster():
    return Cluster.preset("dgx-a100-80g", 2)


@pytest.fixture(scope="module")
def cm(cluster):
    return AnalyticCostModel(cluster)


def _ring(k, size, bandwidth, latency, eff=0.8):
    return 2 * (k - 1) / k * size / (bandwidth * eff) + 2 * (k - 1) * latency


def test_is_a_cost_model(cm):
    assert isinstance(cm, CostModel)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_intra_node_all_reduce_matches_the_ring_closed_form(cm, k):
    assert cm.collective_time("all_reduce", S, range(k)) == pytest.approx(_ring(k, S, 300e9, 3e-6), rel=1e-12)


def test_all_gather_and_reduce_scatter_are_half_an_all_reduce(cm):
    for ranks in (range(8), range(4, 12), (0, 8)):
        full = cm.collective_time("all_reduce", S, ranks)
        assert cm.collective_time("all_gather", S, ranks) == pytest.approx(full / 2)
        assert cm.collective_time("reduce_scatter", S, ranks) == pytest.approx(full / 2)


def test_a_group_spanning_two_nodes_is_slower(cm):
    within = cm.collective_time("all_reduce", S, range(8))  # node 0
    across = cm.collective_time("all_reduce", S, range(4, 12))  # 4 on node 0, 4 on node 1
    assert across > within
    # Hierarchical: ring over the 4 local ranks, then a ring of the 1/4 shard over the 2 nodes.
    expected = _ring(4, S, 300e9, 3e-6) + _ring(2, S / 4, 25e9, 8e-6)
    assert across == pytest.approx(expected, rel=1e-12)
    # One rank per node: a plain ring over the network.
    assert cm.collective_time("all_reduce", S, (0, 8)) == pytest.approx(_ring(2, S, 25e9, 8e-6), rel=1e-12)


def test_degenerate_collectives_cost_nothing(cm):
    assert cm.collective_time("all_reduce", S, (3,)) == 0.0
    assert cm.collective_time("all_reduce", 0, range(8)) == 0.0
    with pytest.raises(ValueError, match="all_to_all"):
        cm.collective_time("all_to_all", S, range(8))
    # a broadcast is priced as an all-gather (ZeRO-1's, of each tensor's share), with its own measured factor
    assert cm.collective_time("broadcast", S, range(8)) == cm.collective_time("all_gather", S, range(8))


def test_p2p_inter_node_is_slower_than_intra(cm):
    intra = cm.p2p_time(S, 0, 1)
    inter = cm.p2p_time(S, 0, 8)
    assert intra == pytest.approx(3e-6 + S / (300e9 * 0.8))
    assert inter == pytest.approx(8e-6 + S / (25e9 * 0.8))
    assert inter > intra
    assert cm.p2p_time(S, 5, 5) == 0.0 and cm.p2p_time(0, 0, 8) == 0.0


def test_big_matmul_is_compute_bound(cm):
    n = 8192
    flops, moved = 2 * n**3, 3 * n * n * 2  # bf16 A, B and C
    t = cm.node_time("aten.mm.default", flops, 2 * flops, moved, "bf16")
    assert t.forward_s == pytest.approx(flops / (312e12 * 0.8) + cm.overhead, rel=1e-12)
    assert t.backward_s == pytest.approx(2 * flops / (312e12 * 0.8) + cm.overhead, rel=1e-12)
    # The memory traffic alone would take far less.
    assert moved / (2039e9 * 0.7) < t.forward_s / 10


def test_elementwise_op_is_bandwidth_bound(cm):
    n = 2**28
    flops, moved = n, 3 * n * 2  # bf16 add: read two, write one
    t = cm.node_time("aten.add.Tensor", flops, flops, moved, "bf16")
    assert t.forward_s == pytest.approx(moved / (2039e9 * 0.7) + cm.overhead, rel=1e-12)
    assert t.backward_s == pytest.approx(2 * moved / (2039e9 * 0.7) + cm.overhead, rel=1e-12)
    assert flops / (312e12 * 0.7) < t.forward_s / 100


def test_attention_uses_its_own_efficiency(cm):
    flops = 1e12
    t = cm.node_time("aten._scaled_dot_product_flash_attention.default", flops, 2 * flops, 1e6, "bf16")
    assert t.forward_s == pytest.approx(flops / (312e12 * 0.6) + cm.overhead, rel=1e-12)


def test_dtype_sets_the_peak(cm):
    flops = 1e12
    fp32 = cm.node_time("aten.mm.default", flops, 0, 1, "fp32").forward_s
    bf16 = cm.node_time("aten.mm.default", flops, 0, 1, "bf16").forward_s
    assert fp32 - cm.overhead == pytest.approx((bf16 - cm.overhead) * 312 / 19.5)


def test_views_are_free_and_launches_are_not(cm):
    assert cm.node_time("aten.view.default", 0, 0, 0, "bf16") == OpTime(0.0, 0.0)
    tiny = cm.node_time("aten.add.Tensor", 1, 1, 8, "bf16")
    assert tiny.forward_s == pytest.approx(4e-6, rel=1e-3)  # the launch overhead dominates
    assert AnalyticCostModel(Cluster.preset("dgx-a100-80g"), kernel_overhead_s=0.0).overhead == 0.0
    assert AnalyticCostModel(Cluster.local(1)).overhead == 10e-6


@pytest.mark.parametrize(
    "target, cls",
    [
        ("aten.mm.default", "matmul"),
        ("aten.addmm.default", "matmul"),
        ("aten.bmm.default", "matmul"),
        ("aten.baddbmm.default", "matmul"),
        ("aten.linear.default", "matmul"),
        ("aten.matmul.default", "matmul"),
        ("aten.convolution.default", "matmul"),
        ("aten._convolution.default", "matmul"),
        ("aten.einsum.default", "matmul"),
        ("aten.scaled_dot_product_attention.default", "attention"),
        ("aten._scaled_dot_product_flash_attention.default", "attention"),
        ("aten._scaled_dot_product_efficient_attention.default", "attention"),
        ("aten.add.Tensor", "elementwise"),
        ("aten.mul.Tensor", "elementwise"),
        ("aten.addcmul.default", "elementwise"),
        ("aten.native_layer_norm.default", "elementwise"),
        ("aten.softmax.int", "elementwise"),
        ("aten.embedding.default", "elementwise"),
        ("aten.mean.dim", "elementwise"),
        ("aten.masked_fill.Scalar", "elementwise"),
        ("aten.gelu.default", "elementwise"),
        ("getitem", "elementwise"),
    ],
)
def test_op_class(target, cls):
    assert op_class(target) == cls


def test_optime_adds():
    assert OpTime(1.0, 2.0) + OpTime(0.5, 0.25) == OpTime(1.5, 2.25)


def test_static_bytes_follow_zero():
    adam = OPTIMIZERS["adam-mixed"]
    # ZeRO Sec. 3.1: 2 + 2 + 12 bytes per parameter with half-precision weights.
    assert static_bytes(1000, 2000, adam) == 16_000
    # ZeRO-1 shards Adam's m and v (8 bytes/param) over dp; the runtime keeps the fp32 masters
    # (4 bytes/param) whole on every replica (partitioner/precision.py), and so does the model.
    assert static_bytes(1000, 2000, adam, dp=4, zero1=True) == 2000 + 2000 + 4000 + 2000
    assert static_bytes(1000, 2000, adam, dp=4, zero1=False) == 16_000
    assert static_bytes(1000, 4000, OPTIMIZERS["adam"]) == 16_000  # fp32 weights, grads, m, v


def test_adam_mixed_in_fp32_keeps_no_master_copy():
    """fp32 weights are their own master: 4 + 4 + 8 bytes per parameter, not 4 + 2 + 12."""
    for dtype in ("fp32", "tf32"):
        spec = optimizer_spec("adam-mixed", dtype)
        assert (spec.grad_bytes, spec.state_bytes) == (4, 8)
        assert static_bytes(1000, 4000, spec) == 16_000
        assert static_bytes(1000, 4000, spec, dp=4, zero1=True) == 4000 + 4000 + 2000
    for dtype in ("bf16", "fp16"):
        assert optimizer_spec("adam-mixed", dtype) == OPTIMIZERS["adam-mixed"]
    assert optimizer_spec("sgd", "fp32") == OPTIMIZERS["sgd"]

