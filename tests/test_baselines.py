"""The baseline planners: uniform, params, pipedream, megatron.

The partition routines are checked against exhaustive search on synthetic
weights (no model involved); the planners on small captured models, one of
them deliberately unbalanced (a big vocabulary makes the embedding and the
head unlike the layers).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import replace

import pytest

from cost_models import Overheads
from partitioner.baselines import METHODS, Pins, linear_partition, plan_baseline, uniform_partition
from partitioner.capture import capture
from partitioner.cluster import Cluster
from partitioner.errors import InfeasibleError, PlanError
from partitioner.evaluate import StageSpec
from partitioner.plan import Mesh
from partitioner.planner import prepare
from partitioner.zoo import load_model

BIGVOCAB = dict(n_layer=8, n_embd=128, n_head=4, vocab_size=128000)


def _capture(spec: str, **kw):
    lm = load_model(spec, dtype="bf16", **kw)
    return capture(lm.model, lm.example_inputs, name=lm.name, batch_size=lm.batch_size)


@pytest.fixture(scope="module")
def gpt2():
    return _capture("gpt2-tiny", config={"n_head": 8})  # 8 heads, so tp=8 can split attention by heads


@pytest.fixture(scope="module")
def bigvocab():
    return _capture("gpt-bigvocab", config=BIGVOCAB, seq_len=512)


@pytest.fixture(scope="module")
def ev_two_nodes(gpt2):
    return prepare(gpt2, cluster=Cluster.preset("dgx-a100-80g", 2), global_batch=32)


@pytest.fixture(scope="module")
def ev_big(bigvocab):
    return prepare(bigvocab, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=32)


@pytest.fixture(scope="module")
def big_plans(ev_big):
    """Each pipeline-only method's plan for the unbalanced model with pp pinned to 4."""
    return {m: plan_baseline(m, ev_big, Pins(pp=4, schedule="1f1b"))[0] for m in ("uniform", "params", "pipedream")}


# --- exhaustive checks on synthetic weights ------------------------------------------------


def _cost(parts, weights, cuts):
    """The objective linear_partition minimizes: the largest part, each non-last part paying its cut."""
    n = len(weights)
    return max(sum(weights[i] for i in p) + (cuts[p[-1] + 1] if p[-1] + 1 < n else 0.0) for p in parts)


def _brute_force(weights, k, cuts):
    n = len(weights)
    best = float("inf")
    for inner in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *inner, n)
        parts = [list(range(bounds[i], bounds[i + 1])) for i in range(k)]
        best = min(best, _cost(parts, weights, cuts))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_linear_partition_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(15):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        weights = [rng.choice([rng.random(), rng.random() * 10, 0.0]) for _ in range(n)]
        cuts = [rng.random() * (2 if seed % 2 else 0) for _ in range(n + 1)]
        parts = linear_partition(weights, k, lambda j: cuts[j])
        assert len(parts) == k and all(parts)
        assert [b for p in parts for b in p] == list(range(n))  # contiguous, in order, each block once
        assert _cost(parts, weights, cuts) == pytest.approx(_brute_force(weights, k, cuts), rel=1e-12, abs=1e-12)


def test_linear_partition_too_many_parts():
    with pytest.raises(PlanError, match="3 blocks into 4"):
        linear_partition([1.0, 2.0, 3.0], 4, lambda j: 0.0)


def test_uniform_partition_places_embedding_first_and_head_last():
    # embedding, position embedding, 10 layers, final norm, head
    is_layer = [False, False] + [True] * 10 + [False, False]
    parts = uniform_partition(is_layer, 4)
    assert parts == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13]]
    assert [sum(is_layer[i] for i in p) for p in parts] == [3, 3, 2, 2]  # earlier stages take the remainder
    with pytest.raises(PlanError, match="10 layers, fewer than the 11 stages"):
        uniform_partition(is_layer, 11)


# --- every method on a real model -----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_a_scored_plan(ev_two_nodes, method):
    plan, sim = plan_baseline(method, ev_two_nodes)
    assert plan.solver.method == method
    assert plan.mesh.world_size == 16
    assert len(plan.stages) == plan.mesh.pp * plan.schedule.virtual_stages
    assert plan.predicted is not None and plan.predicted.fits
    assert plan.predicted.step_time_s == sim.step_time_s > 0
    assert all(st.predicted is not None and st.predicted.forward_s > 0 for st in plan.stages)
    assert [m for st in plan.stages for m in st.modules] == [b.name for b in ev_two_nodes.pgraph.blocks]
    assert plan.schedule.microbatches * plan.schedule.micro_batch_size * plan.mesh.dp == 32
    # Scoring the plan again (as `autopart plan --plan` does) gives the same figures.
    again, _ = ev_two_nodes.score(plan)
    assert again.predicted == plan.predicted


@pytest.mark.parametrize("method", ("uniform", "params", "pipedream"))
def test_pipeline_methods_honour_a_pinned_mesh(ev_two_nodes, method):
    plan, _ = plan_baseline(method, ev_two_nodes, Pins(pp=4, microbatches=4))
    assert plan.mesh == Mesh(4, 1, 4) and len(plan.stages) == 4 * plan.schedule.virtual_stages
    assert plan.schedule.microbatches == 4 and plan.schedule.micro_batch_size == 2
    assert not plan.sharding


def test_megatron_uses_a_node_for_tensor_parallelism(ev_two_nodes, gpt2):
    plan, _ = plan_baseline("megatron", ev_two_nodes)
    assert plan.mesh.tp == 8  # the devices of one node
    for st in plan.stages:  # each tensor-parallel group stays inside one node
        for tp_start in st.ranks[:: plan.mesh.tp]:
            assert len({r // 8 for r in range(tp_start, tp_start + 8)}) == 1
    linears = {}
    for name, node in gpt2.nodes.items():
        if node.target.startswith(("aten.addmm", "aten.linear")):
            linears[node.module] = plan.sharding.get(node.key, "replicate")
    for layer in range(4):
        h = f"transformer.h.{layer}"
        assert linears[f"{h}.attn.c_attn"] == "column"
        assert linears[f"{h}.attn.c_proj"] == "row"
        assert linears[f"{h}.mlp.c_fc"] == "column"
        assert linears[f"{h}.mlp.c_proj"] == "row"
    assert linears["lm_head"] == "column"
    embedding = next(node.key for node in gpt2.nodes.values() if node.module == "transformer.wte" and "embedding" in node.target)
    assert plan.sharding[embedding] == "vocab"
    # Sharding the weights shrinks each device's share: static bytes well under a tp=1 stage's.
    tp1, _ = plan_baseline("uniform", ev_two_nodes, Pins(pp=plan.mesh.pp))
    assert plan.stages[0].predicted.static_bytes < tp1.stages[0].predicted.static_bytes / 4


def test_megatron_falls_back_to_replicate_when_heads_do_not_split():
    four_heads = _capture("gpt2-tiny")  # 4 heads cannot be split 8 ways
    ev = prepare(four_heads, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=8)
    plan, _ = plan_baseline("megatron", ev)
    attention = [node.key for node in four_heads.nodes.values() if "scaled_dot_product" in node.target]
    assert attention and all(n not in plan.sharding for n in attention)
    c_proj = next(node.key for node in four_heads.nodes.values() if node.module == "transformer.h.0.attn.c_proj" and "addmm" in node.target)
    assert plan.sharding[c_proj] == "column"  # it reads the gathered (whole) attention output


def test_megatron_with_tp_not_dividing_is_refused(ev_two_nodes):
    with pytest.raises(PlanError, match="tp=3 does not divide"):
        plan_baseline("megatron", ev_two_nodes, Pins(tp=3))


def test_pinned_microbatches_pick_a_mesh_they_divide(gpt2):
    # 16 samples on 8 devices: dp=8 leaves 2 per replica, so 4 micro-batches need dp <= 4.
    ev = prepare(gpt2, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=16)
    plan, _ = plan_baseline("uniform", ev, Pins(microbatches=4))
    assert plan.schedule.microbatches == 4 and plan.mesh.dp <= 4
    with pytest.raises(PlanError, match="--microbatches 3 does not divide"):
        plan_baseline("uniform", ev, Pins(microbatches=3))
    with pytest.raises(PlanError, match="--microbatches 4 does not divide"):
        plan_baseline("uniform", ev, Pins(dp=8, microbatches=4))


def test_unknown_method(ev_two_nodes):
    with pytest.raises(PlanError, match="pipedram.*pipedream"):
        plan_baseline("pipedram", ev_two_nodes)


# --- the unbalanced model ------------------------------------------------------------------


def _stage_time(st):
    return st.predicted.forward_s + st.predicted.backward_s


def test_bigvocab_is_really_unbalanced(ev_big, big_plans):
    blocks = {b.name: b for b in ev_big.pgraph.blocks}
    layer = blocks["transformer.h.0"].param_count
    assert blocks["transformer.wte"].param_count > 30 * layer
    assert blocks["lm_head"].param_count > 30 * layer
    times = [_stage_time(st) for st in big_plans["uniform"].stages]
    assert max(times) > 1.2 * (sum(times) / len(times))  # equal layer counts are not equal work


def test_pipedream_beats_uniform_on_the_unbalanced_model(big_plans):
    assert big_plans["pipedream"].predicted.step_time_s < big_plans["uniform"].predicted.step_time_s
    for plan in big_plans.values():
        assert plan.mesh == Mesh(4, 1, 2)


def _objective(stages):
    """pipedream's objective: the slowest stage, counting its send and the gradient coming back."""
    return max(s.forward_s + s.backward_s + 2 * s.send_s for s in stages)


def test_pipedream_bottleneck_is_the_smallest_of_all_contiguous_splits(ev_big, big_plans):
    pd = big_plans["pipedream"]
    best = _objective([st.predicted for st in pd.stages])
    for method, plan in big_plans.items():
        assert best <= _objective([st.predicted for st in plan.stages]) * (1 + 1e-9), method
        assert max(map(_stage_time, pd.stages)) <= max(map(_stage_time, plan.stages)) * (1 + 1e-9), method
    # Exhaustively: no split of the blocks into 4 contiguous stages has a smaller bottleneck.
    n = len(ev_big.pgraph.blocks)
    brute = float("inf")
    for inner in itertools.combinations(range(1, n), 3):
        bounds = (0, *inner, n)
        specs = [StageSpec(tuple(range(bounds[i], bounds[i + 1]))) for i in range(4)]
        brute = min(brute, _objective(ev_big.stage_costs(specs, pd.mesh, pd.schedule, {})))
    assert best == pytest.approx(brute, rel=1e-9)


def test_params_balances_parameter_counts(big_plans):
    def heaviest(plan):
        return max(st.params for st in plan.stages)

    assert heaviest(big_plans["params"]) <= heaviest(big_plans["uniform"])
    assert heaviest(big_plans["params"]) <= heaviest(big_plans["pipedream"])
    # The embedding and the head each weigh more than all the layers together: each gets its own stage.
    assert big_plans["params"].stages[0].modules == ("transformer.wte",)
    assert big_plans["params"].stages[-1].modules == ("lm_head",)


def test_uniform_plan_keeps_embedding_first_and_head_last(big_plans):
    stages = big_plans["uniform"].stages
    assert stages[0].modules[0] == "transformer.wte" and "transformer.wpe" in stages[0].modules
    assert stages[-1].modules[-2:] == ("transformer.ln_f", "lm_head")
    layers = [sum(m.startswith("transformer.h.") for m in st.modules) for st in stages]
    assert layers == [2, 2, 2, 2]


# --- infeasible -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ev_tiny_memory(gpt2):
    # An A100 node whose devices hold 200 KiB: no split of a 272K-parameter model fits.
    tiny = Cluster.from_dict({"preset": "dgx-a100-80g", "device": {"memory_bytes": 200 * 1024}})
    return prepare(gpt2, cluster=tiny, global_batch=8)


@pytest.mark.parametrize("method", METHODS)
def test_infeasible_says_how_much_memory_the_smallest_plan_needs(ev_tiny_memory, method):
    with pytest.raises(InfeasibleError) as info:
        plan_baseline(method, ev_tiny_memory)
    msg = str(info.value)
    m = re.search(r"needs ([\d.]+) (MiB|GiB) per device.*allows ([\d.]+) (MiB|GiB)", msg)
    assert m, msg
    scale = {"MiB": 2**20, "GiB": 2**30}
    need, limit = float(m[1]) * scale[m[2]], float(m[3]) * scale[m[4]]
    assert limit == pytest.approx(200 * 1024 * 0.9, abs=0.005 * scale[m[4]])  # printed to 2 decimals
    assert need > limit
    # A lower bound for any plan: some device holds the largest block's (tp-sharded) static state.
    tp = int(re.search(r"tp=(\d+)", msg)[1])
    largest = max(b.param_count for b in ev_tiny_memory.pgraph.blocks)
    assert need >= 16 * largest / tp * 0.99
    # The smallest footprint recomputes, or (the expert, which also tries ZeRO-3) shards everything over dp.
    assert method in msg and ("recompute=True" in msg or "dp_sharding=zero" in msg)


def test_infeasible_for_a_bigger_model_reports_gib():
    # gpt2-xl's width with 4 layers (~200M parameters, 3 GiB of weights and Adam state) on one 2 GiB V100.
    lm = load_model("gpt2-xl", dtype="fp16", seq_len=16, config=dict(n_layer=4))
    cap = capture(lm.model, lm.example_inputs, name=lm.name, batch_size=lm.batch_size)
    small = Cluster.from_dict({"preset": "p3-v100", "devices_per_node": 1, "device": {"memory_gib": 2}})
    ev = prepare(cap, cluster=small, global_batch=8, dtype="fp16")
    with pytest.raises(InfeasibleError) as info:
        plan_baseline("pipedream", ev)
    m = re.search(r"needs ([\d.]+) GiB per device.*allows 1.80 GiB", str(info.value))
    assert m, str(info.value)
    assert float(m[1]) >= 16 * cap.param_count / 2**30 * 0.99  # one device holds everything


# --- the tuned grid and the expert ------------------------------------------------------------


@pytest.fixture(scope="module")
def ev_one_node(gpt2):
    return prepare(gpt2, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=16)


def _grid_optimum(method, ev):
    """Every point of the method's grid simulated, no pruning: the fastest plan that fits."""
    from partitioner.baselines import _SPLITS, _dp_shardings, _tps, grid_points, with_dp_sharding
    from partitioner.sharding import megatron_sharding

    best = None
    for pt in grid_points(method, ev, Pins(), _tps(method, ev, Pins()), _dp_shardings(method, ev)):
        e = with_dp_sharding(ev, pt.dp_sharding)
        sharding = megatron_sharding(ev.captured, pt.mesh.tp, pt.sequence_parallel) if pt.mesh.tp > 1 else {}
        blocks = _SPLITS[method](e, pt.mesh, pt.schedule, sharding)
        plan, _ = e.make_plan([StageSpec.whole(b, pt.recompute) for b in blocks], pt.mesh, pt.schedule,
                              sharding=sharding, method=method)
        if plan.predicted.fits and (best is None or plan.predicted.step_time_s < best):
            best = plan.predicted.step_time_s
    return best


@pytest.mark.parametrize("method", ("expert", "pipedream"))
def test_tuning_finds_the_grid_optimum(ev_one_node, method):
    # The lower-bound pruning never skips a faster point: the tuned plan is the exhaustive optimum.
    plan, _ = plan_baseline(method, ev_one_node)
    assert plan.predicted.step_time_s == pytest.approx(_grid_optimum(method, ev_one_node), rel=1e-12)


@pytest.fixture(scope="module")
def ev_big_small_batch(bigvocab):
    return prepare(bigvocab, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=16)


def _tuned_with_and_without_pruning(method: str, ev) -> dict:
    """``{prune: (the tuned plan's JSON without timings, its TuneReport)}`` for prune True and False."""
    from partitioner.baselines import _SPLITS, _dp_shardings, _tps, tune
    from tests.golden.cases import strip_timing

    runs = {}
    for prune in (True, False):
        plan, _, rep = tune(method, ev, _SPLITS[method], Pins(), tps=_tps(method, ev, Pins()),
                            dp_shardings=_dp_shardings(method, ev), prune=prune)
        runs[prune] = (json.dumps(strip_timing(plan.to_dict()), sort_keys=True), rep)
    return runs


@pytest.mark.parametrize("ev_name,method,by_split", [
    ("ev_one_node", "expert", False), ("ev_one_node", "pipedream", False), ("ev_two_nodes", "megatron", False),
    ("ev_big_small_batch", "uniform", True), ("ev_big_small_batch", "pipedream", True),
])
def test_tuning_without_pruning_gives_the_same_plan(request, ev_name, method, by_split):
    # Pruning by the grid's bound and by a split's busiest rank ([Note: pruning by the busiest rank])
    # skips only points that could neither win nor tie and win: visiting every point in the same
    # order gives the same plan, byte for byte. On the big vocabulary the split's bound prunes too.
    runs = _tuned_with_and_without_pruning(method, request.getfixturevalue(ev_name))
    assert runs[True][0] == runs[False][0]
    pruned, full = runs[True][1], runs[False][1]
    assert full.pruned_bound == full.pruned_split == 0 and pruned.points == full.points
    assert pruned.evaluated < full.evaluated
    assert (pruned.pruned_split > 0) == by_split


@pytest.mark.parametrize("method", ["uniform", "expert"])
def test_pruning_holds_where_ranks_share_cores(bigvocab, method):
    # On 4 ranks sharing 2 cores a rank alone computes twice as fast as priced ([Note: ranks sharing
    # cores] in evaluate.py): the bounds are divided by that, and pruning still gives the unpruned plan.
    shared = replace(Cluster.local(4), overheads=Overheads(compute_slowdown=2.0, oversubscribed=2.0))
    runs = _tuned_with_and_without_pruning(method, prepare(bigvocab, cluster=shared, global_batch=16, dtype="fp32"))
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].evaluated <= runs[False][1].evaluated


def test_split_work_bounds_the_busiest_rank(ev_big_small_batch, ev_two_nodes):
    # split_work_s, from the blocks' compute alone, never exceeds the priced stages' busiest rank,
    # which never exceeds the simulated step (tests/test_simulate.py).
    from partitioner.baselines import split_work_s
    from partitioner.plan import Schedule
    from partitioner.sharding import megatron_sharding
    from partitioner.simulate import busiest_rank_s

    rng = random.Random(0)
    for ev, tp in ((ev_big_small_batch, 1), (ev_two_nodes, 2)):
        sharding = megatron_sharding(ev.captured, tp, False) if tp > 1 else {}
        n = len(ev.pgraph.blocks)
        for _ in range(30):
            name = rng.choice(("1f1b", "gpipe", "interleaved", "zb", "zbv"))
            v = 2 if name in ("interleaved", "zbv") else 1
            pp = rng.choice((2, 3)) if n >= 6 * v else 1
            mbs, m = rng.choice((1, 2)), rng.choice((2, 4, 6))
            schedule = Schedule(name, m, mbs, v)
            cuts = sorted(rng.sample(range(1, n), pp * v - 1))
            blocks = [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, n])]
            recompute = rng.random() < 0.5 and name not in ("zb", "zbv")
            costs = [ev.block_cost(b, mbs, tp, sharding).time for b in ev.pgraph.blocks]
            mesh = Mesh(pp, tp, ev.cluster.world_size // (pp * tp))
            priced = ev.stage_costs([StageSpec.whole(b, recompute) for b in blocks], mesh, schedule, sharding)
            bound = split_work_s(blocks, [c.forward_s + c.backward_s for c in costs],
                                 [c.forward_s for c in costs] if recompute else None, schedule, pp)
            busiest = busiest_rank_s(priced, name, m, pp)
            assert 0.5 * busiest < bound <= busiest * (1 + 1e-12), (name, pp, m, cuts, recompute)


def test_grid_tries_sequence_parallelism_and_zero_bubble_unless_pinned(ev_one_node):
    # The ILP chooses sequence parallelism and re-times its plans under the zero-bubble schedules:
    # the grid holds both, and a pin keeps only what it names.
    from partitioner.baselines import _dp_shardings, _tps, grid_points

    def grid(pins):
        return list(grid_points("expert", ev_one_node, pins, _tps("expert", ev_one_node, pins), _dp_shardings("expert", ev_one_node)))

    free = grid(Pins())
    assert {(p.mesh.tp > 1, p.sequence_parallel) for p in free} == {(False, False), (True, False), (True, True)}
    assert {"zb", "zbv", "dualpipev"} <= {p.schedule.name for p in free}
    assert not any(p.recompute and p.schedule.name in ("zb", "zbv", "dualpipev") for p in free)
    assert all(p.sequence_parallel for p in grid(Pins(sequence_parallel=True)) if p.mesh.tp > 1)
    assert not any(p.sequence_parallel for p in grid(Pins(sequence_parallel=False)))


def test_expert_is_the_best_of_its_pinned_layouts_and_schedules(ev_one_node):
    expert, _ = plan_baseline("expert", ev_one_node)
    for pins in (Pins(sequence_parallel=True), Pins(sequence_parallel=False), Pins(schedule="zb"),
                 Pins(schedule="1f1b"), Pins(tp=2, sequence_parallel=True)):
        pinned, _ = plan_baseline("expert", ev_one_node, pins)
        assert expert.predicted.step_time_s <= pinned.predicted.step_time_s * (1 + 1e-12), pins
    # The plan records the layout it ran (here without row_seq: gpt2-tiny's flattened (64, 64)
    # Conv1D outputs have no unambiguous token dim at seq = width = 64).
    for on in (True, False):
        plan = plan_baseline("expert", ev_one_node, Pins(tp=2, sequence_parallel=on))[0]
        assert ("seq" in set(plan.sharding.values())) == on


def test_baselines_tune_micro_batching_not_only_size_one(ev_one_node):
    # A baseline is not held to micro-batch size 1: every method picks its best micro-batching.
    for method in ("uniform", "params", "pipedream"):
        plan, _ = plan_baseline(method, ev_one_node)
        for mbs in (1, 2):  # anything the grid had is no faster
            pinned, _ = plan_baseline(method, ev_one_node, Pins(microbatches=16 // plan.mesh.dp // mbs)) \
                if (16 // plan.mesh.dp) % mbs == 0 else (plan, None)
            assert plan.predicted.step_time_s <= pinned.predicted.step_time_s * (1 + 1e-12)


def test_expert_is_at_least_as_fast_as_uniform_and_megatron(ev_two_nodes):
    # Its grid holds theirs (tp=1 and tp=node are powers of two inside a node; ZeRO-1 off is tried).
    expert, _ = plan_baseline("expert", ev_two_nodes)
    for method in ("uniform", "megatron"):
        other, _ = plan_baseline(method, ev_two_nodes)
        assert expert.predicted.step_time_s <= other.predicted.step_time_s * (1 + 1e-12), method
    assert expert.mesh.tp in (1, 2, 4, 8)


def test_expert_turns_on_zero1_when_only_that_fits(bigvocab):
    # 0.8 GiB devices: the big vocabulary's Adam state fits only when sharded over dp. (0.25 GiB before the
    # loss's logits-sized tensors joined the memory model: docs/solver.md, "Memory".)
    small = Cluster.from_dict({"preset": "dgx-a100-80g", "devices_per_node": 4, "device": {"memory_gib": 0.8}})
    ev = prepare(bigvocab, cluster=small, global_batch=16, memory_margin=0.0)  # the margin: tests/test_memory_model.py
    with pytest.raises(InfeasibleError):
        plan_baseline("uniform", ev)
    plan, _ = plan_baseline("expert", ev)
    assert plan.training.dp_sharding != "none" and plan.mesh.dp > 1 and plan.predicted.fits


# --- golden plans and determinism ---------------------------------------------------------------


from tests.golden.cases import CASES, HERE as GOLDEN, run_case  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_plans(case):
    """A plan that changes fails here; if the change is meant: PYTHONPATH=$PWD python -m tests.golden.cases."""
    suffix, text = run_case(case)
    path = GOLDEN / f"{case.name}.{suffix}"
    assert path.exists(), f"{case.name} now gives a .{suffix}; regenerate with python -m tests.golden.cases"
    assert text == path.read_text(), f"the plan of {case.name} changed; review, then python -m tests.golden.cases"


def test_same_plan_on_a_loaded_machine():
    # The search is budgeted by deterministic work: a busy CPU changes no byte of the plan.
    import subprocess
    import sys

    case = next(c for c in CASES if c.name == "tied-gpt2-tiny")
    quiet = run_case(case)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = run_case(case)
    finally:
        hog.kill()
        hog.wait()
    assert loaded == quiet
    assert quiet[0] == "json" and json.loads(quiet[1])["solver"]["origin"] in ("ilp", *METHODS)


@pytest.mark.parametrize("pp,v", [(2, 2), (3, 2), (4, 3), (2, 5)])
def test_inflight_horizon_keeps_the_patterns(pp, v):
    # The memory pre-check replays a short interleaved order: it must pass through the same in-flight vectors.
    from partitioner.baselines import inflight_horizon
    from partitioner.solver.pipeline_ilp import inflight_patterns
    from partitioner.simulate import schedule_order

    for m in range(pp, 12 * pp + 1, pp):
        short = inflight_horizon("interleaved", pp, m, v)
        full = inflight_patterns(schedule_order("interleaved", pp, m, v), pp, v)
        assert inflight_patterns(schedule_order("interleaved", pp, short, v), pp, v) == full, m
