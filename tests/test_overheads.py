"""Measured software overheads in the time model ([Note: software overheads] in cost_models/overheads.py).

A cluster without the ``[overheads]`` table is priced exactly as before (every
term 0, nothing new in the plan's JSON); with it, each term is what its formula
says: per pipeline action, per step, per tensor-parallel node and DTensor op,
the optimizer step per tensor and byte, and the reduction's overlap. The
calibration's fits recover known figures; the table round-trips through the
cluster file.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from cost_models import MeasuredCostModel, Overheads, SplitShare
from partitioner.calibrate import (CHECKPOINT_BLOCK_NODES, BusyPipelineSample, CheckpointBlock, CheckpointSample,
                                   PipelineSample, checkpoint_fit, checkpoint_passes, optimizer_overheads,
                                   pipeline_overheads, tensor_overhead, transfer_overhead)
from partitioner.cluster import Cluster, load_cluster
from partitioner.errors import ClusterError
from partitioner.evaluate import Evaluator, StageSpec
from partitioner.explain import COMPONENTS, breakdown
from partitioner.plan import Mesh, Plan, Schedule
from partitioner.planner import prepare
from partitioner.simulate import StageCost, simulate

MEASURED = Overheads(action_s=1e-3, step_s=2e-3, tp_node_s=3e-5, tp_node_backward_s=1e-5, dtensor_op_s=4e-4,
                     dtensor_op_backward_s=1e-4, optimizer_tensor_s=5e-5, optimizer_bandwidth=2e9, zero1_tensor_s=2e-4,
                     comm_overlap=0.0)


def test_overheads_round_trip_through_the_cluster_file(tmp_path):
    plain = Cluster.local(2)
    assert not plain.overheads.measured and "overheads" not in plain.to_dict()
    measured = replace(plain, overheads=Overheads.from_file(
        {"action_us": 931.5, "step_us": 12.25, "tp_node_forward_us": 61.0, "optimizer_gbps": 2.5, "comm_overlap": 0.05,
         "all_reduce_factor": 2.7, "reduce_scatter_factor": 10.0}))
    path = tmp_path / "c.toml"
    path.write_text(measured.to_toml())
    assert "[overheads]" in path.read_text()
    again = load_cluster(str(path))
    assert again.overheads == measured.overheads
    assert again.overheads.action_s == pytest.approx(931.5e-6) and again.overheads.optimizer_bandwidth == 2.5e9
    assert again.overheads.collective_factor("all_reduce") == 2.7 and again.overheads.collective_factor("all_gather") == 1.0
    path.write_text(measured.to_toml().replace("action_us", "actions_us"))
    with pytest.raises(ClusterError, match=r"overheads\.actions_us: unknown key"):
        load_cluster(str(path))


@pytest.fixture(scope="module")
def mlp(zoo_capture):
    return zoo_capture("mlp").captured


def _priced(captured, overheads: Overheads, mesh: Mesh, microbatches: int = 4, **training):
    ev = prepare(captured, cluster=replace(Cluster.local(mesh.world_size), overheads=overheads), global_batch=8,
                 dtype="fp32", **training)
    n = len(ev.pgraph.blocks)
    cut = n // 2
    stages = [StageSpec(tuple(range(cut))), StageSpec(tuple(range(cut, n)))] if mesh.pp == 2 else [StageSpec(tuple(range(n)))]
    schedule = Schedule("1f1b", microbatches, 8 // mesh.dp // microbatches)
    costs = ev.stage_costs(stages, mesh, schedule, {})
    plan, sim = ev.make_plan(stages, mesh, schedule, method="manual")
    return ev, stages, costs, plan


def test_an_uncalibrated_cluster_prices_no_overheads(mlp):
    _, _, costs, plan = _priced(mlp, Overheads(), Mesh(2, 1, 2))
    assert all(c.after_s == 0.0 for c in costs)
    for st in plan.stages:
        assert st.predicted.components.optimizer_s == 0.0 and st.predicted.components.overhead_s == 0.0
        assert "optimizer_s" not in json.loads(plan.to_json())["stages"][st.index]["predicted"]["components"]
    assert "overheads" not in plan.cluster


@pytest.mark.parametrize("zero1", [False, True])
def test_each_overhead_is_its_formula(mlp, zero1):
    mesh = Mesh(2, 1, 2)
    ev, stages, base, _ = _priced(mlp, Overheads(), mesh, zero1=zero1)
    # a broadcast is priced with its own measured factor, not the all-gather's (ZeroRedundancyOptimizer broadcasts)
    measured = replace(MEASURED, all_gather_factor=3.0, broadcast_factor=1.5)
    _, _, costs, plan = _priced(mlp, measured, mesh, zero1=zero1)
    table = ev.captured.params
    for s, spec in enumerate(stages):
        assert costs[s].forward_s == pytest.approx(base[s].forward_s + MEASURED.action_s)
        assert costs[s].backward_s == pytest.approx(base[s].backward_s + MEASURED.action_s)
        names = sorted({p for b in spec.blocks for p in ev.pgraph.blocks[b].params if table[p].trainable})
        share = 2 if zero1 else 1  # ZeRO-1: each dp rank updates half the tensors, then broadcasts them
        elements = sum(table[p].numel for p in names)
        t_opt = (len(names) / share * MEASURED.optimizer_tensor_s
                 + elements / share * (4 + 4 + 8) / MEASURED.optimizer_bandwidth)  # fp32 weight, grad, Adam m and v
        if zero1:  # every tensor broadcast from its owner, and ZeroRedundancyOptimizer's own work on each
            t_opt += 1.5 * sum(ev.cost_model.collective_time("all_gather", table[p].bytes / 2, mesh.dp_group(s)) for p in names)
            t_opt += len(names) * MEASURED.zero1_tensor_s
        assert costs[s].after_s == pytest.approx(t_opt + MEASURED.step_s)  # one stage per rank: each is its rank's first
        c = plan.stages[s].predicted.components
        assert c.optimizer_s == pytest.approx(t_opt)
        assert c.overhead_s == pytest.approx(2 * 4 * MEASURED.action_s + MEASURED.step_s)
        assert c.total_s() == pytest.approx(plan.predicted.step_time_s, rel=1e-9)  # still adds up to the step
    parts = breakdown(plan)
    assert sum(parts[k] for k in COMPONENTS) == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    assert Plan.from_dict(json.loads(plan.to_json())).stages[0].predicted.components == plan.stages[0].predicted.components


def test_each_schedule_pays_its_runtime_s_action(zoo_capture):
    # torch runs a schedule of several stages a rank on another runtime (_PipelineScheduleRuntime), whose action
    # costs more; calibrate times it in a loop (interleaved, zb) and in a V (zbv, dualpipev). Unmeasured (0),
    # a_action stands in.
    captured = zoo_capture("gpt2").captured
    measured = Overheads(action_s=1e-3, multi_action_s=3e-3, v_action_s=2e-3)

    def costs(overheads: Overheads, schedule: Schedule) -> list[StageCost]:
        ev = prepare(captured, cluster=replace(Cluster.local(2), overheads=overheads), global_batch=8, dtype="fp32")
        n, k = len(ev.pgraph.blocks), 2 * schedule.virtual_stages
        assert n >= k
        bounds = [round(i * n / k) for i in range(k + 1)]
        stages = [StageSpec(tuple(range(a, b))) for a, b in zip(bounds, bounds[1:])]
        return ev.stage_costs(stages, Mesh(2, 1, 1), schedule, {})

    for schedule, action in ((Schedule("1f1b", 4, 2), 1e-3), (Schedule("gpipe", 4, 2), 1e-3),
                             (Schedule("interleaved", 4, 2, 2), 3e-3), (Schedule("zb", 4, 2, 2), 3e-3),
                             (Schedule("zbv", 4, 2, 2), 2e-3), (Schedule("dualpipev", 4, 2, 2), 2e-3)):
        base = costs(Overheads(), schedule)
        for overheads, extra in ((measured, action), (Overheads(action_s=1e-3), 1e-3)):
            for b, c in zip(base, costs(overheads, schedule), strict=True):
                assert c.forward_s == pytest.approx(b.forward_s + extra), schedule.name
                assert c.backward_s == pytest.approx(b.backward_s + extra), schedule.name


def test_a_split_backward_pays_per_node_and_tensor_after_the_first_stage(mlp):
    # torch's zero-bubble schedules split a stage's backward into I (walking its autograd graph in Python)
    # and W (an autograd.grad per weight group); the first stage's backward runs whole. The small MLP's
    # second half holds layer 1 (a linear and a GELU) and the head's linear: 3 nodes that need a gradient
    # and 4 parameter tensors.
    a, w = 5e-5, 3e-5
    overheads = Overheads(split_backward_node_s=a, split_backward_param_s=w)
    ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=overheads), global_batch=8, dtype="fp32")
    n = len(ev.pgraph.blocks)
    stages = [StageSpec(tuple(range(n // 2))), StageSpec(tuple(range(n // 2, n)))]
    assert ev.grad_nodes(stages[1]) == 3
    mesh = Mesh(2, 1, 1)
    fused = ev.stage_costs(stages, mesh, Schedule("1f1b", 4, 2), {})
    split = ev.stage_costs(stages, mesh, Schedule("zb", 4, 2), {})
    assert split[0].backward_s == fused[0].backward_s
    assert split[1].backward_s == pytest.approx(fused[1].backward_s + 3 * a + 4 * w)
    assert split[1].backward_weight_s == pytest.approx(fused[1].backward_weight_s + 4 * w)  # W's share: per tensor
    assert split[1].forward_s == fused[1].forward_s
    assert split[1].split_input_s == split[1].split_weight_s == 0.0  # every backward split: in the backward


def test_a_block_timed_split_is_priced_by_its_measurement_and_the_rest_by_the_overheads(mlp):
    # [Note: the split backward per block]: the profiler's measured split of a block (its ratio to the whole
    # backward, its weight share) prices that block; the stage's other blocks keep the calibrated per-node and
    # per-tensor figures. The first stage runs its backward whole and pays nothing.
    a, w = 5e-5, 3e-5
    ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=Overheads(split_backward_node_s=a,
                                                                           split_backward_param_s=w)),
                 global_batch=8, dtype="fp32")
    n = len(ev.pgraph.blocks)
    stages = [StageSpec(tuple(range(n // 2))), StageSpec(tuple(range(n // 2, n)))]
    timed, rest = ev.pgraph.blocks[n // 2], [ev.pgraph.blocks[b] for b in range(n // 2 + 1, n)]
    assert timed.params and rest  # layer 1 (a linear and a GELU), then the head
    # the first stage's block measured too: it still pays nothing
    shares = {timed.name: (SplitShare(2, 1.5, 0.4),), ev.pgraph.blocks[0].name: (SplitShare(2, 3.0, 0.5),)}
    measured = Evaluator(ev.pgraph, ev.cluster, MeasuredCostModel(ev.cost_model, {}, split_shares=shares), ev.training)
    mesh, schedule = Mesh(2, 1, 1), Schedule("zb", 4, 2)
    fused = ev.stage_costs(stages, mesh, Schedule("1f1b", 4, 2), {})
    plain, split = ev.stage_costs(stages, mesh, schedule, {}), measured.stage_costs(stages, mesh, schedule, {})
    assert split[0].backward_s == plain[0].backward_s == fused[0].backward_s
    whole = ev.block_cost(timed, 2, 1, {}).time.backward_s
    rest_nodes = sum(1 for b in rest for name in b.nodes if ev.captured.nodes[name].needs_grad)
    rest_params = sum(1 for b in rest for p in b.params if ev.captured.params[p].trainable)
    assert split[1].backward_s == pytest.approx(fused[1].backward_s + 0.5 * whole + a * rest_nodes + w * rest_params)
    # W: the timed block's measured 0.4 of its split backward (1.5 x whole), the rest's half and per-tensor cost
    assert split[1].backward_weight_s == pytest.approx(
        fused[1].backward_weight_s - 0.5 * whole + 0.4 * 1.5 * whole + w * rest_params)
    assert plain[1].backward_s == pytest.approx(fused[1].backward_s + a * ev.grad_nodes(stages[1]) + w * (
        rest_params + sum(1 for p in timed.params if ev.captured.params[p].trainable)))


def test_a_backwards_own_extra_work_is_backward_compute_and_the_components_add_up(mlp):
    # The additions into held gradients and the split's excess run inside the backward actions: the plan's
    # components count them as backward compute (what `autopart run` measures), and one stage a rank, the
    # components add up to the step.
    o = Overheads(accumulate_bandwidth=2e9, split_backward_node_s=2e-4, split_backward_param_s=1e-4)
    ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=o), global_batch=8, dtype="fp32")
    n = len(ev.pgraph.blocks)
    stages = [StageSpec(tuple(range(n // 2))), StageSpec(tuple(range(n // 2, n)))]
    mesh, schedule = Mesh(2, 1, 1), Schedule("zb", 4, 2)
    costs = ev.stage_costs(stages, mesh, schedule, {})
    plan, _ = ev.make_plan(stages, mesh, schedule, method="manual")
    for s, st in enumerate(plan.stages):
        compute = sum(ev.block_cost(ev.pgraph.blocks[b], 2, 1, {}).compute.backward_s for b in stages[s].blocks)
        assert costs[s].backward_s > compute  # the extras are there (stage 0: its additions only)
        assert st.predicted.components.backward_s == pytest.approx(4 * costs[s].backward_s)
        assert st.predicted.components.total_s() == pytest.approx(plan.predicted.step_time_s)


def test_dualpipev_pays_the_split_on_the_backwards_it_splits_only(mlp):
    # DualPipeV runs its steady state's backwards whole and splits a few at the end: the split's costs go on
    # the stage's I and W actions (StageCost.split_input_s / split_weight_s), not its backward, and the
    # simulated step grows by them only where the schedule runs an I or a W.
    a, w = 5e-4, 3e-4
    ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=Overheads(split_backward_node_s=a,
                                                                           split_backward_param_s=w)),
                 global_batch=8, dtype="fp32")
    base = prepare(mlp, cluster=Cluster.local(2), global_batch=8, dtype="fp32")
    n = len(ev.pgraph.blocks)
    stages = [StageSpec(tuple(range(i * n // 4, (i + 1) * n // 4))) for i in range(4)]
    schedule, mesh = Schedule("dualpipev", 4, 2, 2), Mesh(2, 1, 1)
    split, plain = ev.stage_costs(stages, mesh, schedule, {}), base.stage_costs(stages, mesh, schedule, {})
    assert [c.backward_s for c in split] == [c.backward_s for c in plain]
    assert [c.backward_weight_s for c in split] == [c.backward_weight_s for c in plain]
    assert split[0].split_input_s == split[0].split_weight_s == 0.0  # the first stage runs its backward whole
    for s in range(1, 4):
        params = sum(1 for b in stages[s].blocks for p in ev.pgraph.blocks[b].params if ev.captured.params[p].trainable)
        assert split[s].split_input_s == pytest.approx(a * ev.grad_nodes(stages[s]))
        assert split[s].split_weight_s == pytest.approx(w * params)
    runs = {e.action: e.end_s - e.start_s for e in simulate(split, "dualpipev", 4, 2).events}
    plain_runs = {e.action: e.end_s - e.start_s for e in simulate(plain, "dualpipev", 4, 2).events}
    for action, took in runs.items():
        extra = {"I": split[action.stage].split_input_s, "W": split[action.stage].split_weight_s}.get(action.kind, 0.0)
        assert took == pytest.approx(plain_runs[action] + extra), action
    assert any(a.kind in "IW" and a.stage > 0 for a in runs)  # some split backward past the first stage


def test_each_backward_into_held_gradients_pays_their_addition(mlp):
    # Autograd adds a micro-batch's gradient into a .grad the stage already holds: the M - 1 backwards
    # after the first of a step, or all M under DDP (its gradients are bucket views zeroed in place).
    rate = 2e9
    ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=Overheads(accumulate_bandwidth=rate)), global_batch=8,
                 dtype="fp32")
    base = prepare(mlp, cluster=Cluster.local(2), global_batch=8, dtype="fp32")
    n = len(ev.pgraph.blocks)
    stages = [StageSpec(tuple(range(n // 2))), StageSpec(tuple(range(n // 2, n)))]
    for mesh, schedule, share in ((Mesh(2, 1, 1), Schedule("1f1b", 4, 2), 3 / 4), (Mesh(2, 1, 1), Schedule("1f1b", 1, 8), 0.0),
                                  (Mesh(1, 1, 2), Schedule("1f1b", 2, 2), 1.0)):
        specs = stages if mesh.pp == 2 else [StageSpec(tuple(range(n)))]
        held, plain = ev.stage_costs(specs, mesh, schedule, {}), base.stage_costs(specs, mesh, schedule, {})
        for s, spec in enumerate(specs):
            names = {p for b in spec.blocks for p in ev.pgraph.blocks[b].params}
            grad_bytes = sum(ev.captured.params[p].numel for p in names if ev.captured.params[p].trainable) * 4  # fp32
            assert grad_bytes > 0
            extra = share * grad_bytes / rate
            assert held[s].backward_s == pytest.approx(plain[s].backward_s + extra), (mesh, schedule, s)
            assert held[s].backward_weight_s == pytest.approx(plain[s].backward_weight_s + extra)  # W makes the gradients
            assert held[s].forward_s == plain[s].forward_s


def test_compute_slows_down_and_tensor_parallel_nodes_pay_their_overheads(mlp):
    ev0 = prepare(mlp, cluster=Cluster.local(2), global_batch=8, dtype="fp32")
    ev1 = prepare(mlp, cluster=replace(Cluster.local(2), overheads=MEASURED), global_batch=8, dtype="fp32")
    block = ev0.pgraph.blocks[0]
    linear = next(n for n in block.nodes if "addmm" in str(ev0.captured.nodes[n].target) or "linear" in str(ev0.captured.nodes[n].target))
    sharding = {linear: "column"}  # one node on DTensors
    plain, timed = ev0.block_cost(block, 2, 2, sharding), ev1.block_cost(block, 2, 2, sharding)
    n, d = len(block.nodes), sum(sharding.get(x, "replicate") != "replicate" for x in block.nodes)
    assert timed.compute.forward_s == pytest.approx(plain.compute.forward_s + n * 3e-5 + d * 4e-4)
    assert timed.compute.backward_s == pytest.approx(plain.compute.backward_s + n * 1e-5 + d * 1e-4)
    assert ev1.block_cost(block, 2, 1, {}) == ev0.block_cost(block, 2, 1, {})  # no tp: no interpreter
    slow = prepare(mlp, cluster=replace(Cluster.local(2), overheads=Overheads(compute_slowdown=2.0)), global_batch=8,
                   dtype="fp32")
    alone = ev0.block_cost(block, 2, 1, {})
    assert slow.block_cost(block, 2, 1, {}).compute.forward_s == pytest.approx(2 * alone.compute.forward_s)
    assert slow.block_cost(block, 2, 1, {}).compute.backward_s == pytest.approx(2 * alone.compute.backward_s)


def test_core_shares_give_a_rank_the_cores_the_others_leave():
    """[Note: ranks sharing cores]: 4 ranks on 2 cores (o = 2). All four computing at once take what the
    compute slowdown priced (factor 1); rank 0 alone for as long again gets a whole core (factor 1/2), so its
    mean is 3/4; two at once share two cores (1/2 each)."""
    from partitioner.simulate import Action, Event, core_shares

    f = lambda stage, mb: Action(stage, "F", mb)  # noqa: E731
    events = [Event(r, f(r, 0), 0.0, 1.0) for r in range(4)] + [Event(0, f(0, 1), 1.0, 2.0)]
    events += [Event(2, f(2, 1), 3.0, 4.0), Event(3, f(3, 1), 3.0, 4.0)]
    assert core_shares(events, 4, 2.0) == pytest.approx([0.75, 1.0, 0.75, 0.75])
    assert core_shares(events, 4, 1.0) == pytest.approx([1.0] * 4)  # a core per rank: nothing to give back
    # A waiting rank that still uses a quarter of a core leaves the computing ones less: rank 0 alone gets
    # 2 - 3/4 = 1.25 cores (still its whole one: 1/2), ranks 2 and 3 share 2 - 2/4 = 1.5 (3/4 each: 2/3).
    assert core_shares(events, 4, 2.0, 0.25) == pytest.approx([0.75, 1.0, 5 / 6, 5 / 6])
    # Never slower than every rank computing at once: waiting ranks that use a whole core leave the rest 1.
    assert core_shares(events, 4, 2.0, 1.0) == pytest.approx([1.0] * 4)


def test_a_pipeline_on_shared_cores_is_priced_with_the_cores_its_bubble_frees(mlp):
    """With 2 ranks on 1 core (compute slowdown 2, all of it oversubscription), a 2-stage pipeline is priced
    between both ranks computing at once throughout (k = 2) and a core each (k = 1): in its warm-up and
    cool-down one rank computes alone, and gets less of the core where the waiting one still uses some.
    Its components still add up to the step."""
    n = len(prepare(mlp, cluster=Cluster.local(2), global_batch=8, dtype="fp32").pgraph.blocks)
    stages = [StageSpec(tuple(range(n // 2))), StageSpec(tuple(range(n // 2, n)))]
    mesh, schedule = Mesh(2, 1, 1), Schedule("1f1b", 4, 2)
    steps = {}
    for name, o in (("core each", Overheads()), ("all at once", Overheads(compute_slowdown=2.0)),
                    ("shared", Overheads(compute_slowdown=2.0, oversubscribed=2.0)),
                    ("shared, waiting uses", Overheads(compute_slowdown=2.0, oversubscribed=2.0, idle_core_use=0.25))):
        ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=o), global_batch=8, dtype="fp32")
        plan, sim = ev.make_plan(stages, mesh, schedule, method="manual")
        steps[name] = plan.predicted.step_time_s
        for st in plan.stages:  # one stage per rank: its components are its rank's step
            assert st.predicted.components.total_s() == pytest.approx(plan.predicted.step_time_s)
    assert steps["core each"] < steps["shared"] < steps["all at once"]
    # A waiting rank that still uses a quarter of the core gives the computing one less of it back.
    assert steps["shared"] < steps["shared, waiting uses"] < steps["all at once"]
    with pytest.raises(ValueError, match="oversubscribed"):
        Overheads(compute_slowdown=1.5, oversubscribed=2.0)  # a factor of the slowdown, not more
    with pytest.raises(ValueError, match="idle_core_use"):
        Overheads(idle_core_use=1.5)  # a share of one core


def test_the_simulator_exposes_what_does_not_overlap_and_ends_with_after():
    stage = StageCost(forward_s=1.0, backward_s=2.0, dp_reduce_s=1.5)
    hidden = simulate([stage], "1f1b", 2)
    assert hidden.dp_exposed_s == (0.0,)  # all of it behind the last backward
    assert simulate([stage], "1f1b", 2, comm_overlap=1.0).step_time_s == hidden.step_time_s
    none = simulate([stage], "1f1b", 2, comm_overlap=0.0)
    assert none.dp_exposed_s == (1.5,) and none.step_time_s == pytest.approx(hidden.step_time_s + 1.5)
    half = simulate([stage], "1f1b", 2, comm_overlap=0.5)
    assert half.dp_exposed_s[0] == pytest.approx(1.5 - 0.5 * 1.5)
    after = simulate([replace(stage, after_s=0.25)], "1f1b", 2, comm_overlap=0.0)
    assert after.step_time_s == pytest.approx(none.step_time_s + 0.25)


def test_calibration_fits_recover_known_overheads():
    action, step = 800e-6, 300e-6
    samples = [PipelineSample(m, step + action * u + s, u, s) for m, u, s in ((4, 10.0, 0.002), (8, 18.0, 0.003))]
    assert pipeline_overheads(samples, step) == pytest.approx(action)
    a_tensor, bandwidth = 40e-6, 3e9
    sets = [(t, p, t * a_tensor + 16 * p / bandwidth) for t, p in ((4, 1 << 18), (64, 1 << 10), (16, 1 << 16))]
    fitted = optimizer_overheads(sets)
    assert fitted[0] == pytest.approx(a_tensor, rel=1e-6) and fitted[1] == pytest.approx(bandwidth, rel=1e-6)


def test_checkpoint_fit_recovers_a_per_call_and_a_per_node_cost():
    """[Note: measuring overheads]: blocks of 1 and 4 nodes give the call's forward cost and each node's."""
    call, call_b, node = 90e-6, 160e-6, 16e-6
    samples = [CheckpointSample(n, call + n * node, call_b + n * 28e-6) for n in (4, 1)]  # the backward: the 1-node block's
    assert checkpoint_fit(samples) == pytest.approx((call, call_b + 28e-6, node), rel=1e-9)
    never_below = [CheckpointSample(1, 2e-4, 3e-4), CheckpointSample(4, 1e-4, 3e-4)]
    assert checkpoint_fit(never_below) == pytest.approx((2e-4, 3e-4, 0.0))  # never < 0


def test_the_checkpoint_experiment_times_each_size_on_its_own_blocks():
    """Each block size's passes run that size's chain (a pass built in a loop once ran the last size's blocks
    for every size, and the per-node cost came out as noise about 0), forward and backward, plain and
    checkpointed alike."""
    x = torch.randn(4, 16, requires_grad=True)
    held: dict[int, dict[bool, torch.Tensor]] = {size: {} for size in CHECKPOINT_BLOCK_NODES}
    chains = {size: [torch.fx.symbolic_trace(CheckpointBlock(size)) for _ in range(3)] for size in CHECKPOINT_BLOCK_NODES}
    passes = {size: checkpoint_passes(blocks, x, held[size]) for size, blocks in chains.items()}
    assert len(set(CHECKPOINT_BLOCK_NODES)) > 1
    for size, blocks in chains.items():
        want = x
        for block in blocks:
            want = block(want)
        for ckpt, fn in zip((False, True), passes[size][:2]):  # plain, then checkpointed, each held on its own
            fn()
            assert torch.equal(held[size][ckpt], want), size
        assert held[size][False] is not held[size][True]
        for block in blocks:
            block.zero_grad(set_to_none=True)
        passes[size][3]()  # checkpointed forward and backward: the gradients reach this size's blocks
        assert all(p.grad is not None for block in blocks for p in block.parameters()), size


def test_each_checkpoint_call_pays_its_measured_cost(mlp):
    """A recomputed block runs under torch.utils.checkpoint, whose own machinery (RNG state, the replay's
    set-up) costs ``a_ckpt`` in forward and ``a_ckpt_bwd`` in backward per call and micro-batch on top of
    the replayed forward, and whose hook on each tensor a node saves costs ``a_ckpt_node`` in forward per
    node inside it that saves one; the stage pays them for its recomputed blocks only, and the
    components still add up to the step."""
    ckpt = Overheads(checkpoint_s=2e-4, checkpoint_backward_s=7e-4, checkpoint_node_s=3e-5)
    assert Overheads.from_file(ckpt.to_file()) == ckpt
    assert set(ckpt.to_file()) == {"checkpoint_forward_us", "checkpoint_backward_us", "checkpoint_node_forward_us"}
    mesh, schedule = Mesh(2, 1, 1), Schedule("1f1b", 4, 2)
    priced = {}
    for name, overheads in (("plain", Overheads()), ("ckpt", ckpt)):
        ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=overheads), global_batch=8, dtype="fp32")
        n = len(ev.pgraph.blocks)
        stages = [StageSpec(tuple(range(n // 2)), tuple(range(n // 2))), StageSpec(tuple(range(n // 2, n)))]
        priced[name] = (ev.stage_costs(stages, mesh, schedule, {}), ev.make_plan(stages, mesh, schedule, method="manual")[0],
                        stages)
    (base, _, stages), (costs, plan, _) = priced["plain"], priced["ckpt"]
    calls = len(stages[0].recompute)
    nodes = sum(ev.saving_nodes(ev.pgraph.blocks[b]) for b in stages[0].recompute)
    assert calls > 0 and nodes > calls  # an mlp block is a linear and a GELU
    fwd, bwd = calls * 2e-4 + nodes * 3e-5, calls * 7e-4
    assert costs[0].forward_s == pytest.approx(base[0].forward_s + fwd)
    assert costs[0].backward_s == pytest.approx(base[0].backward_s + bwd)
    assert (costs[1].forward_s, costs[1].backward_s) == (base[1].forward_s, base[1].backward_s)  # recomputes nothing
    plain_plan = priced["plain"][1]
    c, c0 = plan.stages[0].predicted.components, plain_plan.stages[0].predicted.components
    assert c.forward_s == pytest.approx(c0.forward_s + 4 * fwd)
    assert c.recompute_s == pytest.approx(c0.recompute_s + 4 * bwd)
    for st in plan.stages:
        assert st.predicted.components.total_s() == pytest.approx(plan.predicted.step_time_s, rel=1e-9)


def test_the_stage_ilp_prices_each_checkpoint_as_the_evaluator_does(mlp):
    """Every block recomputed (pinned) on a cluster whose checkpoints cost per call and per node inside:
    the stage ILP's objective is the simulated step of its own schedule ([Note: software overheads]); a
    block's ``checkpoint_s`` without its saving nodes' share would leave it 0.8 ms a node and micro-batch below."""
    from partitioner.baselines import Pins
    from partitioner.solver import plan_ilp

    ckpt = Overheads(checkpoint_s=2e-4, checkpoint_backward_s=3e-4, checkpoint_node_s=8e-4)
    ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=ckpt), global_batch=8, dtype="fp32")
    result = plan_ilp(ev, Pins(pp=2, tp=1, dp=1, recompute=True, schedule="1f1b"), time_limit_s=20.0)
    solved = [a for a in result.report.attempts if a.plan is not None]
    assert solved and result.plan.stages[0].recompute
    for a in solved:
        assert a.solution.objective_s == pytest.approx(a.own_schedule_s, rel=0.02), a.candidate.describe()


def test_each_transfer_between_pipeline_ranks_pays_its_measured_wait(mlp):
    """``a_p2p`` ([Note: software overheads]): every activation and gradient sent between stages on different
    ranks arrives ``a_p2p`` later than the link alone says; the last stage sends nothing, and the plan's step is
    the simulator's step of exactly those stage costs."""
    wait = Overheads(p2p_transfer_s=3e-3)
    assert Overheads.from_file(wait.to_file()) == wait and wait.to_file() == {"p2p_transfer_us": 3000.0}
    mesh = Mesh(2, 1, 1)
    ev, _, base, plain = _priced(mlp, Overheads(), mesh)
    _, _, costs, plan = _priced(mlp, wait, mesh)
    assert base[0].send_s > 0 and costs[0].send_s == pytest.approx(base[0].send_s + 3e-3)
    assert costs[1].send_s == base[1].send_s == 0.0  # the last stage sends nothing
    assert costs[0].grad_send_s == pytest.approx(base[0].grad_send_s + 3e-3)  # one gradient comes back
    assert [replace(c, send_s=0.0, grad_send_s=0.0) for c in costs] == [replace(c, send_s=0.0, grad_send_s=0.0)
                                                                        for c in base]  # nothing else moves
    for p, c in ((plain, base), (plan, costs)):
        sim = simulate(c, "1f1b", 4, overlap_dp=ev.training.overlap_dp)
        assert p.predicted.step_time_s == pytest.approx(sim.step_time_s, rel=1e-12)
    # The first micro-batch's forward goes to rank 1 and its gradient comes back before rank 0's first backward:
    # at least two transfers are on the critical path.
    assert plan.predicted.step_time_s >= plain.predicted.step_time_s + 2 * 3e-3 - 1e-12


def test_each_further_tensor_a_cut_carries_pays_its_wait(zoo_capture):
    """torch's stage sends each tensor of a stage boundary as its own point-to-point operation, and a gradient
    only for those that need one: GPT-2's cut after its embedding carries the attention mask (bool) and the
    hidden state forward and the hidden state's gradient back, so it waits ``a_p2p + a_p2p_tensor`` forward
    and ``a_p2p`` back; the simulator delays each direction by its own time."""
    gpt2 = zoo_capture("gpt2-tiny")
    wait = Overheads(p2p_transfer_s=3e-3, p2p_tensor_s=0.5e-3)
    assert Overheads.from_file(wait.to_file()) == wait and wait.to_file()["p2p_tensor_us"] == 500.0
    assert (wait.transfer_wait(0), wait.transfer_wait(1), wait.transfer_wait(4)) == pytest.approx((0, 3e-3, 4.5e-3))
    ev = prepare(gpt2.captured, cluster=replace(Cluster.local(2), overheads=wait), global_batch=8, dtype="fp32")
    bare = prepare(gpt2.captured, cluster=Cluster.local(2), global_batch=8, dtype="fp32")
    n = len(ev.pgraph.blocks)
    stage_of = [0] * 3 + [1] * (n - 3)  # the embeddings and the first layer, then the rest
    (cut,) = ev.pgraph.crossings(stage_of)
    assert (cut.forward, cut.backward) == (2, 1)
    stages = [StageSpec(tuple(range(3))), StageSpec(tuple(range(3, n)))]
    schedule, mesh = Schedule("1f1b", 4, 2), Mesh(2, 1, 1)
    (c, _), (b, _) = ev.stage_costs(stages, mesh, schedule, {}), bare.stage_costs(stages, mesh, schedule, {})
    assert c.send_s == pytest.approx(b.send_s + 3.5e-3) and c.grad_send_s == pytest.approx(b.send_s + 3e-3)
    # The simulator times the gradient by its own send: 5 ms more on it is 5 ms more of a one-micro-batch step.
    fast, slow_back = StageCost(1e-3, 1e-3, send_s=0.0), StageCost(1e-3, 1e-3, send_s=0.0, grad_send_s=5e-3)
    last = StageCost(1e-3, 1e-3)
    assert simulate([slow_back, last], "gpipe", 1).step_time_s == pytest.approx(
        simulate([fast, last], "gpipe", 1).step_time_s + 5e-3)


def test_calibration_fit_recovers_a_known_transfer_wait():
    """The busy pipeline experiment's fit: the transfer wait that makes the simulated 1F1B step of each sample
    its measured step is recovered, and a pipeline no slower than the model prices none."""
    action, step, extra = 250e-6, 400e-6, 1.7e-3
    samples = []
    for m, f, b in ((4, (2e-3, 2.2e-3), (3e-3, 3.6e-3)), (8, (1.5e-3, 1.7e-3), (4e-3, 4.5e-3))):
        stages = [StageCost(fr + action, br + action, send_s=300e-6 + extra) for fr, br in zip(f, b)]
        seconds = simulate(stages, "1f1b", m).step_time_s + step
        samples.append(BusyPipelineSample(m, seconds, f, b, 300e-6))
    assert transfer_overhead(samples, action, step) == pytest.approx(extra, rel=1e-6)
    fast = [replace(x, seconds=x.seconds / 2) for x in samples]
    assert transfer_overhead(fast, action, step) == 0.0
    # The same pipeline with 3 tensors more beside each activation (no gradient back for them): each further
    # tensor's wait is recovered on top of the first's, and a pipeline no slower than that prices none.
    each = 0.4e-3
    more = []
    for x in samples:
        stages = [StageCost(fr + action, br + action, send_s=300e-6 + extra + 3 * each, grad_send_s=300e-6 + extra)
                  for fr, br in zip(x.forward_s, x.backward_s)]
        more.append(replace(x, seconds=simulate(stages, "1f1b", x.microbatches).step_time_s + step))
    assert tensor_overhead(more, action, step, extra, 3) == pytest.approx(each, rel=1e-6)
    assert tensor_overhead(samples, action, step, extra, 3) == 0.0


def test_calibration_fit_prices_the_busy_pipeline_as_the_evaluator_prices_a_plan():
    """4 ranks on 2 cores (o = 2): the samples' stage times are each rank's own (CPU) time, which the fit puts
    on the evaluator's basis (every rank at once: o times it) and scales to the cores the waiting ranks leave,
    less what they still use ([Note: ranks sharing cores]). A wait made that way is recovered; fitted plainly,
    the same samples read another."""
    from partitioner.simulate import simulate_sharing

    action, step, extra, o, idle = 250e-6, 400e-6, 1.2e-3, 2.0, 0.2
    samples = []
    for m, f, b in ((4, (2e-3, 2.2e-3, 1.9e-3, 2.1e-3), (3e-3, 3.6e-3, 3.1e-3, 3.3e-3)),
                    (8, (1.5e-3, 1.7e-3, 1.6e-3, 1.4e-3), (4e-3, 4.5e-3, 4.1e-3, 4.2e-3))):
        stages = [StageCost(o * fr + action, o * br + action, send_s=300e-6 + extra) for fr, br in zip(f, b)]
        sim, _, shares = simulate_sharing(stages, "1f1b", m, oversubscribed=o, idle_use=idle)
        assert all(x < 1 for x in shares)  # the bubble leaves each rank some cores
        samples.append(BusyPipelineSample(m, sim.step_time_s + step, f, b, 300e-6))
    assert transfer_overhead(samples, action, step, o, idle) == pytest.approx(extra, rel=1e-3)
    assert transfer_overhead(samples, action, step) != pytest.approx(extra, rel=0.1)



def test_the_stage_ilp_prices_the_transfer_wait_as_the_simulator_does(mlp):
    """The stage ILP's sends carry ``a_p2p`` (search.py adds it to ``send_alpha``) as the evaluator's do: each
    solved candidate's objective is the simulated step of its own schedule; without it the ILP would sit
    ``a_p2p`` for each transfer on the critical path (at least two) below the simulator."""
    from partitioner.baselines import Pins
    from partitioner.solver import plan_ilp

    wait = Overheads(p2p_transfer_s=2e-3)
    ev = prepare(mlp, cluster=replace(Cluster.local(2), overheads=wait), global_batch=8, dtype="fp32")
    result = plan_ilp(ev, Pins(pp=2, tp=1, dp=1, schedule="1f1b"), time_limit_s=20.0)
    solved = [a for a in result.report.attempts if a.plan is not None]
    assert solved
    for a in solved:
        assert a.solution.objective_s == pytest.approx(a.own_schedule_s, rel=0.02), a.candidate.describe()
        assert a.own_schedule_s >= 2 * 2e-3  # a micro-batch's activation out and its gradient back
