"""FSDP's costs on a calibrated cluster ([Note: FSDP prefetch overlap] in partitioner/evaluate.py).

ZeRO-2/3 run one all-gather and one reduce-scatter per FSDP unit, so the link's
latency is paid once per unit; each unit also pays FSDP2's software cost per
pass, and the optimizer steps every tensor as a DTensor ([Note: software
overheads] in cost_models/overheads.py). Checked: the calibration's fit
recovers known figures and the cluster file keeps them; a plan priced with and
without them differs by exactly the formula; and on a cluster file with the
figures this CPU measured, ``--zero1`` no longer picks FSDP (issue 12: the
planner chose ZeRO-2, priced as fast as DDP, measured 4x slower).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cost_models import Overheads
from partitioner.calibrate import FsdpSample, LinkFit, fsdp_overheads, ring_coefficients
from partitioner.cluster import Cluster, load_cluster
from partitioner.evaluate import StageSpec
from partitioner.explain import MEASURED_AGAINST
from partitioner.plan import Mesh, Schedule
from partitioner.planner import plan_parallelism, prepare

# What `autopart calibrate` measured on this 2-core CPU (benchmarks/results/2026-12-05-fidelity-quiet,
# calibrated-llama-tiny-dp2-zero1.toml, and the FSDP experiment, 2 ranks): seconds.
CPU = Overheads(action_s=310.5e-6, step_s=342.3e-6, tp_node_s=86.31e-6, tp_node_backward_s=4.384e-6,
                dtensor_op_s=155.1e-6, dtensor_op_backward_s=76.21e-6, optimizer_tensor_s=47.23e-6,
                optimizer_bandwidth=5.251e9, comm_overlap=0.0, compute_slowdown=1.114)
FSDP = dict(fsdp_unit_s=1389e-6, fsdp_unit_backward_s=1991e-6, optimizer_dtensor_s=305.3e-6)


def _cpu_cluster(overheads: Overheads) -> Cluster:
    """``local-cpu:2`` with the links and rates that calibration measured, and ``overheads``."""
    base = Cluster.local(2)
    link = replace(base.intra_node, bandwidth=3.354e9, latency=181.6e-6)
    eff = replace(base.efficiency, matmul=1.0, elementwise=1.0, comm=1.0)
    device = replace(base.device, peak_flops={"fp32": 0.0928e12}, memory_bandwidth=23.2e9)
    return replace(base, device=device, intra_node=link, inter_node=link, efficiency=eff, overheads=overheads)


def test_the_fsdp_figures_round_trip_through_the_cluster_file(tmp_path):
    cluster = _cpu_cluster(replace(CPU, **FSDP))
    path = tmp_path / "c.toml"
    path.write_text(cluster.to_toml())
    text = path.read_text()
    assert "fsdp_unit_forward_us = 1389" in text and "fsdp_unit_backward_us = 1991" in text
    assert "optimizer_dtensor_us = 305.3" in text
    assert load_cluster(str(path)).overheads == cluster.overheads
    assert not Cluster.local(2).overheads.measured  # the presets price none of it


def test_calibration_fit_recovers_known_fsdp_overheads():
    link = LinkFit(latency=200e-6, bandwidth=2e9, points=1, mape=0.0)
    n, k, unit = 8, 2, 4096
    steps_g, factor_g = ring_coefficients("all_gather", k)
    steps_r, factor_r = ring_coefficients("reduce_scatter", k)
    gather = steps_g * link.latency + factor_g * unit / link.bandwidth
    scatter = steps_r * link.latency + factor_r * unit / link.bandwidth
    a_f, a_b, a_opt = 1.2e-3, 1.9e-3, 300e-6
    sample = FsdpSample(units=n, ranks=k, unit_bytes=unit, tensors=16,
                        plain_forward_s=3e-4, plain_backward_s=7e-4,
                        fsdp_forward_s=3e-4 + n * (a_f + gather), fsdp_backward_s=7e-4 + n * (a_b + scatter),
                        plain_optimizer_s=1e-3, fsdp_optimizer_s=1e-3 + 16 * a_opt)
    assert fsdp_overheads(sample, link) == pytest.approx((a_f, a_b, a_opt), rel=1e-9)
    # Without a link nothing is subtracted; a difference below the collective is clipped to 0, not negative.
    assert fsdp_overheads(sample, None)[0] == pytest.approx(a_f + gather)
    assert fsdp_overheads(replace(sample, fsdp_forward_s=3e-4), link)[0] == 0.0


@pytest.fixture(scope="module")
def llama(zoo_capture):
    return zoo_capture("llama-tiny").captured


def _priced(captured, overheads: Overheads, level: str):
    ev = prepare(captured, cluster=_cpu_cluster(overheads), global_batch=8, dtype="fp32", dp_sharding=level)
    stages = [StageSpec(tuple(range(len(ev.pgraph.blocks))))]
    mesh, schedule = Mesh(1, 1, 2), Schedule("1f1b", 4, 1)
    plan = ev.make_plan(stages, mesh, schedule, method="manual")[0]
    return ev, stages, mesh, ev.stage_costs(stages, mesh, schedule, {}), plan


@pytest.mark.parametrize("level", ["zero2", "zero3"])
def test_a_plan_pays_each_fsdp_unit_and_dtensor_as_the_formula_says(llama, level):
    ev, stages, mesh, base, base_plan = _priced(llama, CPU, level)
    _, _, _, costs, plan = _priced(llama, replace(CPU, **FSDP), level)
    root, units = ev.fsdp_units(stages[0].blocks, 1)
    n = len(units) + (1 if root else 0)
    assert n >= 3  # the blocks and the root: several units, several collectives
    regathers = 2 if level == "zero3" else 1
    a_f, a_b, a_opt = FSDP["fsdp_unit_s"], FSDP["fsdp_unit_backward_s"], FSDP["optimizer_dtensor_s"]
    assert costs[0].forward_s == pytest.approx(base[0].forward_s + n * a_f, rel=1e-12)
    assert costs[0].backward_s == pytest.approx(base[0].backward_s + n * (a_b + (regathers - 1) * a_f), rel=1e-12)
    table = ev.captured.params
    tensors = [p for b in stages[0].blocks for p in ev.pgraph.blocks[b].params
               if table[p].trainable and not table[p].is_buffer]
    assert costs[0].after_s == pytest.approx(base[0].after_s + len(set(tensors)) * a_opt, rel=1e-12)
    # Every rank steps every tensor's shard: T a_tensor, not T / dp, plus P / dp elements' bytes.
    elements = sum(table[p].numel for p in set(tensors))
    assert base[0].after_s == pytest.approx(len(set(tensors)) * CPU.optimizer_tensor_s
                                            + elements / 2 * 16 / CPU.optimizer_bandwidth + CPU.step_s, rel=1e-12)
    # The whole difference shows in the plan: 4 micro-batches of it in dp_gather_s, the rest in optimizer_s.
    c, c0 = plan.stages[0].predicted.components, base_plan.stages[0].predicted.components
    assert c.dp_gather_s - c0.dp_gather_s == pytest.approx(4 * n * (a_f + a_b + (regathers - 1) * a_f), rel=1e-9)
    # explain --measured sets the forward's share against the measured forward, where the runtime times it
    assert c.dp_gather_forward_s - c0.dp_gather_forward_s == pytest.approx(4 * n * a_f, rel=1e-9)
    assert 0 < c.dp_gather_forward_s < c.dp_gather_s
    # ... and every predicted component stands against exactly one measured row
    for st in plan.stages:
        comps = st.predicted.components
        rows = sum(getattr(comps, f"{k}_s") for against in MEASURED_AGAINST.values() for k in against)
        assert rows == pytest.approx(comps.total_s(), rel=1e-12)
    assert c.optimizer_s - c0.optimizer_s == pytest.approx(len(set(tensors)) * a_opt, rel=1e-9)


def test_each_fsdp_unit_pays_its_own_collective(llama):
    ev, stages, mesh, _, _ = _priced(llama, CPU, "zero2")
    root, units = ev.fsdp_units(stages[0].blocks, 1)
    n = len(units) + (1 if root else 0)
    table = ev.captured.params
    weights = sum(table[p].bytes for u in [root, *units] for p in u)
    grads = sum(table[p].numel * ev.optimizer.grad_bytes for u in [root, *units] for p in u if table[p].trainable)
    one_gather, one_scatter = ev.fsdp_collectives(weights, grads, mesh.dp_group(0))
    *_, total = ev.fsdp_costs(stages[0].blocks, mesh, 0, set(), 1.0, 1.0)
    latency = ev.cluster.intra_node.latency  # (k - 1) = 1 step per all-gather or reduce-scatter over 2 ranks
    assert total == pytest.approx(one_gather + one_scatter + 2 * (n - 1) * latency, rel=1e-9)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 1.0])
def test_fsdp_collectives_hide_behind_compute_on_a_gpu_and_never_on_this_cpu(llama, overlap):
    """FSDP2 overlaps its collectives through streams; on the CPU it has none, and each all-gather and
    reduce-scatter blocks the rank: whatever ``comm_overlap`` calibration measured (on an async
    all-reduce, as DDP issues them), a local-cpu cluster exposes all of them."""
    cpu = _cpu_cluster(replace(CPU, **FSDP, comm_overlap=overlap))
    gpu = replace(cpu, name="gpu-node")  # the same figures on devices with streams
    mesh = Mesh(1, 1, 2)
    compute = 50e-3  # a long pass: all collectives but one unit's could hide behind it
    for cluster, c in ((cpu, 0.0), (gpu, overlap)):
        ev = prepare(llama, cluster=cluster, global_batch=8, dtype="fp32", dp_sharding="zero3")
        assert ev.fsdp_overlap == c
        blocks = tuple(range(len(ev.pgraph.blocks)))
        root, units = ev.fsdp_units(blocks, 1)
        n = len(units) + (1 if root else 0)
        _, f0, b0, total = ev.fsdp_costs(blocks, mesh, 0, set(), 0.0, 0.0)  # no compute: nothing hides
        _, f, b, _ = ev.fsdp_costs(blocks, mesh, 0, set(), compute, compute)
        x_f = f0 - n * FSDP["fsdp_unit_s"]  # the forward's all-gathers, whole
        x_b = b0 - n * (FSDP["fsdp_unit_backward_s"] + FSDP["fsdp_unit_s"])  # the regathers and reduce-scatters
        assert x_f > 0 and x_b > 0 and x_f + x_b == pytest.approx(total, rel=1e-9)
        # a pass exposes X / n + max(0, X (n - 1) / n - c C): on the CPU, c = 0 and all of X
        assert f == pytest.approx(f0 - min(c * compute, x_f * (n - 1) / n), rel=1e-9)
        assert b == pytest.approx(b0 - min(c * compute, x_b * (n - 1) / n), rel=1e-9)
        assert (f < f0) == (c > 0)


def test_zero1_is_no_longer_priced_into_fsdp_on_a_calibrated_cpu(llama):
    """``--zero1`` lets the search shard more; with FSDP's measured costs it keeps ZeRO-1, and the
    ZeRO-2 plan it turned down is the slower one by at least FSDP's software cost."""
    cluster = _cpu_cluster(replace(CPU, **FSDP))
    kw = dict(cluster=cluster, global_batch=8, pp=1, tp=1, dp=2, microbatches=4, dtype="fp32", time_limit_s=10)
    chosen = plan_parallelism(llama, zero1=True, **kw).plan
    assert chosen.training.dp_sharding == "zero1"
    fsdp = plan_parallelism(llama, dp_sharding="zero2", **kw).plan
    assert fsdp.training.dp_sharding in ("zero2", "zero3")
    software = 4 * 3 * (FSDP["fsdp_unit_s"] + FSDP["fsdp_unit_backward_s"])  # 4 micro-batches, at least 3 units
    assert fsdp.predicted.step_time_s > chosen.predicted.step_time_s + software


def test_fidelity_keeps_a_layout_that_pins_fsdp():
    """FSDP stays covered by the fidelity benchmark: one layout asks for it with ``--dp-sharding``, and a plan
    of that level is not reported as sharded beyond what the layout asked."""
    from benchmarks.fidelity import LAYOUTS, more_sharded

    pinned = [l for l in LAYOUTS if "--dp-sharding" in l.flags]
    assert pinned and all(l.flags[l.flags.index("--dp-sharding") + 1] in ("zero2", "zero3") for l in pinned)
    level = pinned[0].flags[pinned[0].flags.index("--dp-sharding") + 1]
    assert more_sharded(pinned[0], dict(training=dict(dp_sharding=level), mesh=dict(pp=1, tp=1, dp=2))) == ""
