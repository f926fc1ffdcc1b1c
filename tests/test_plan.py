"""The Plan artifact and the evaluator that scores it.

Covers the JSON form (round trip, required keys, refusal of malformed or
mismatched plans), the evaluator's memory and time figures (static bytes,
ZeRO-1, recomputation, interleaving), its checks on stage lists, and
hand-written plans (``manual_plan`` / ``split_at``). Models are captured once
per module on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cost_models import AnalyticCostModel
from partitioner.baselines import Pins, plan_baseline
from partitioner.capture import capture
from partitioner.cluster import Cluster
from partitioner.errors import AutopartError, CaptureError, PlanError
from partitioner.evaluate import Evaluator, StageSpec
from partitioner.plan import PLAN_VERSION, Mesh, Plan, Schedule, Training
from partitioner.planner import manual_plan, plan_parallelism, prepare
from partitioner.zoo import load_model

GLOBAL_BATCH = 16


def _capture(spec: str):
    lm = load_model(spec, dtype="bf16")
    return capture(lm.model, lm.example_inputs, name=lm.name, batch_size=lm.batch_size)


@pytest.fixture(scope="module")
def gpt2():
    return _capture("gpt2-tiny")


@pytest.fixture(scope="module")
def llama():
    return _capture("llama-tiny")


@pytest.fixture(scope="module")
def one_node():
    return Cluster.preset("dgx-a100-80g", 1)


@pytest.fixture(scope="module")
def ev(gpt2, one_node):
    return prepare(gpt2, cluster=one_node, global_batch=GLOBAL_BATCH)


@pytest.fixture(scope="module")
def tp_plan(ev):
    """A megatron plan on one 8-GPU node: tp=8, with a sharding table."""
    plan, _ = plan_baseline("megatron", ev)
    assert plan.mesh.tp == 8 and plan.sharding  # the round trip below must carry tp and sharding
    return plan


def _two_stages(ev, split: int, recompute: bool = False):
    n = len(ev.pgraph.blocks)
    return [StageSpec.whole(range(split), recompute), StageSpec.whole(range(split, n), recompute)]


# --- JSON ----------------------------------------------------------------------------------


def test_json_round_trip_equals_original(tp_plan):
    again = Plan.from_json(tp_plan.to_json())
    assert again == tp_plan
    assert again.mesh == Mesh(1, 8, 1)
    assert again.sharding == tp_plan.sharding
    assert again.predicted == tp_plan.predicted
    assert [s.predicted for s in again.stages] == [s.predicted for s in tp_plan.stages]


def test_save_then_load_equals_original(tp_plan, tmp_path):
    path = tmp_path / "plan.json"
    tp_plan.save(path)
    assert Plan.load(path) == tp_plan
    assert not (tmp_path / "plan.json.tmp").exists()  # the atomic write leaves no temp file behind


def test_json_has_the_documented_keys(tp_plan):
    d = json.loads(tp_plan.to_json())
    assert d["version"] == PLAN_VERSION
    assert {"name", "params", "fingerprint"} <= set(d["model"])
    assert d["model"]["name"] == "gpt2-tiny"
    assert d["model"]["params"] == tp_plan.model.params > 0
    assert d["cluster"]["name"] == "dgx-a100-80g" and d["cluster"]["devices_per_node"] == 8
    assert d["mesh"] == {"pp": 1, "tp": 8, "dp": 1}
    assert set(d["schedule"]) == {"name", "microbatches", "micro_batch_size", "virtual_stages"}
    assert d["schedule"]["microbatches"] * d["schedule"]["micro_batch_size"] * d["mesh"]["dp"] == GLOBAL_BATCH
    assert len(d["stages"]) == 1
    for st in d["stages"]:
        assert {"index", "modules", "nodes", "params", "predicted"} <= set(st)
        assert st["modules"][0] == "transformer.wte" and st["modules"][-1] == "lm_head"
        assert st["nodes"] and st["params"] > 0 and st["predicted"]["forward_s"] > 0
    pred = d["predicted"]
    for key in ("step_time_s", "samples_per_s", "tflops_per_device", "mfu", "bubble_fraction", "peak_memory_bytes"):
        assert key in pred
    assert pred["step_time_s"] > 0 and 0 < pred["mfu"] < 1 and 0 <= pred["bubble_fraction"] < 1
    assert pred["samples_per_s"] == pytest.approx(GLOBAL_BATCH / pred["step_time_s"])
    assert set(d["solver"]) >= {"method", "status", "objective", "bound", "wall_s"}
    assert d["solver"]["method"] == "megatron"
    assert set(d["sharding"]["nodes"].values()) <= {"column", "row", "vocab", "sharded"}


def _edit(plan: Plan, fn) -> str:
    d = json.loads(plan.to_json())
    fn(d)
    return json.dumps(d)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.pop("mesh"), ["missing", "'mesh'"]),
        (lambda d: d["schedule"].pop("micro_batch_size"), ["schedule", "micro_batch_size"]),
        (lambda d: d["stages"][0].pop("modules"), ["stages[0]", "modules"]),
        (lambda d: d.update(extra=1), ["unknown", "extra"]),
        (lambda d: d["mesh"].update(ep=2), ["mesh", "unknown", "ep"]),
        (lambda d: d["solver"].update(sovler_time=1.0), ["solver", "sovler_time"]),
        (lambda d: d["sharding"].update(nodez={}), ["sharding", "nodez"]),
        (lambda d: d.update(version=99), ["version", "99"]),
        (lambda d: d.pop("version"), ["version"]),
        (lambda d: d["mesh"].update(tp="8"), ["mesh.tp"]),
        (lambda d: d["schedule"].update(name="zigzag"), ["schedule.name", "zigzag"]),
        (lambda d: d["sharding"]["nodes"].update(addmm="diagonal"), ["addmm", "diagonal"]),
        (lambda d: d.update(stages={}), ["stages", "list"]),
        (lambda d: d["training"].update(global_batch=17), ["global_batch", "17"]),
    ],
)
def test_malformed_plan_json_names_the_field(tp_plan, edit, words):
    with pytest.raises(PlanError) as info:
        Plan.from_json(_edit(tp_plan, edit))
    for w in words:
        assert w in str(info.value)


def test_invalid_json_text_is_a_plan_error(tp_plan, tmp_path):
    with pytest.raises(PlanError, match="not valid JSON.*line"):
        Plan.from_json(tp_plan.to_json()[:-10])
    with pytest.raises(PlanError, match="must be an object"):
        Plan.from_json("[1, 2]")
    with pytest.raises(PlanError, match="cannot read plan file"):
        Plan.load(tmp_path / "absent.json")


def test_plan_for_another_model_is_refused_naming_it(tp_plan, llama):
    tp_plan.check_matches(tp_plan.model.fingerprint)  # its own model: accepted
    with pytest.raises(PlanError) as info:
        tp_plan.check_matches(llama.fingerprint)
    assert "gpt2-tiny" in str(info.value) and llama.fingerprint in str(info.value)
    # Scoring it against the other model's evaluator refuses it the same way.
    ev_llama = prepare(llama, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=GLOBAL_BATCH)
    with pytest.raises(PlanError, match="gpt2-tiny"):
        ev_llama.score(tp_plan)


def test_plan_for_another_cluster_names_the_differing_fields(tp_plan):
    tp_plan.check_matches(tp_plan.model.fingerprint, Cluster.preset("dgx-a100-80g", 1).to_dict())
    with pytest.raises(PlanError) as info:
        tp_plan.check_matches(tp_plan.model.fingerprint, Cluster.preset("dgx-a100-80g", 2).to_dict())
    msg = str(info.value)
    assert "nodes" in msg and "device" not in msg and "dgx-a100-80g" in msg
    with pytest.raises(PlanError) as info:
        tp_plan.check_matches(tp_plan.model.fingerprint, Cluster.preset("dgx-a100-40g", 1).to_dict())
    msg = str(info.value)
    assert "device.memory_gib" in msg and "device.memory_bandwidth_gbps" in msg and "dgx-a100-40g" in msg
    assert "nodes" not in msg


def test_plan_constructor_checks_consistency(tp_plan):
    with pytest.raises(PlanError, match="global_batch"):
        replace(tp_plan, training=replace(tp_plan.training, global_batch=GLOBAL_BATCH * 2))
    with pytest.raises(PlanError, match="2 stages"):
        replace(tp_plan, stages=tp_plan.stages * 2)
    with pytest.raises(PlanError, match="owns no modules"):
        replace(tp_plan, stages=(replace(tp_plan.stages[0], modules=()),))
    with pytest.raises(PlanError, match="virtual_stages=2 does not suit schedule '1f1b'.*use schedule 'interleaved'"):
        Schedule("1f1b", 4, 1, 2)
    with pytest.raises(PlanError, match="virtual_stages=1 does not suit schedule 'zbv'.*use virtual_stages 2"):
        Schedule("zbv", 4, 1, 1)
    with pytest.raises(PlanError, match="mesh.pp"):
        Mesh(pp=0)


def test_mesh_parse():
    assert Mesh.parse("pp=2, tp=4") == {"pp": 2, "tp": 4}
    assert Mesh(2, 4, 1).world_size == 8 and str(Mesh(2, 4, 1)) == "pp=2,tp=4,dp=1"
    for bad, word in (("pp=x", "'x'"), ("foo=2", "foo=2"), ("pp", "pp"), ("tp=0", "tp")):
        with pytest.raises(PlanError, match="--mesh") as info:
            Mesh.parse(bad)
        assert word in str(info.value)


def test_rescoring_a_loaded_plan_reproduces_it(ev, tp_plan, tmp_path):
    tp_plan.save(tmp_path / "p.json")
    again, _ = ev.score(Plan.load(tmp_path / "p.json"))
    assert again.predicted == tp_plan.predicted
    assert again.stages == tp_plan.stages and again.sharding == tp_plan.sharding


# --- the evaluator ------------------------------------------------------------------------


def test_stage_params_and_static_memory(ev, gpt2):
    split = ev.pgraph.block_index("transformer.h.2")
    plan, _ = ev.make_plan(_two_stages(ev, split), Mesh(2, 1, 4), Schedule("1f1b", 4, 1), method="manual")
    first, last = plan.stages
    assert first.modules[:2] == ("transformer.wte", "transformer.wpe") and first.modules[-1] == "transformer.h.1"
    assert last.modules[0] == "transformer.h.2" and last.modules[-1] == "lm_head"
    # The tied embedding/head weight is held by both stages; the model counts it once.
    wte = gpt2.params["transformer.wte.weight"].numel
    assert first.params + last.params == gpt2.param_count + wte
    # adam-mixed with bf16 weights: 2 (weight) + 2 (grad) + 12 (fp32 master, m, v) bytes per parameter.
    for st in plan.stages:
        assert st.predicted.static_bytes == 16 * st.params
        assert st.predicted.activation_bytes > 0
        # DDP keeps its gradients, so the whole static bytes are live at the peak (docs/solver.md, "Memory").
        sp = st.predicted
        assert sp.memory_bytes == sp.static_bytes + sp.activation_bytes + sp.workspace_bytes
        assert sp.workspace_bytes > 0  # the backward's workspace (and on the last stage, the loss's)
        assert st.ranks == Mesh(2, 1, 4).stage_ranks(st.index)
    assert plan.predicted.peak_memory_bytes == max(s.predicted.memory_bytes for s in plan.stages)
    assert plan.predicted.fits and plan.predicted.memory_limit_bytes == int(80 * 2**30 * 0.9)
    assert first.predicted.send_s > 0 and last.predicted.send_s == 0


def test_zero1_shards_optimizer_state_over_dp(ev, gpt2, one_node):
    ev_z = prepare(gpt2, cluster=one_node, global_batch=GLOBAL_BATCH, zero1=True)
    specs = _two_stages(ev, ev.pgraph.block_index("transformer.h.2"))
    plain, _ = ev.make_plan(specs, Mesh(2, 1, 4), Schedule("1f1b", 4, 1), method="manual")
    zero, _ = ev_z.make_plan(specs, Mesh(2, 1, 4), Schedule("1f1b", 4, 1), method="manual")
    for a, b in zip(plain.stages, zero.stages):
        # bf16 weights and grads (4 B) and the fp32 masters (4 B) on every replica; Adam's m and v (8 B) over dp=4
        assert b.predicted.static_bytes == 8 * a.params + -(-8 * a.params // 4)
        assert b.predicted.static_bytes < a.predicted.static_bytes
    # Without data parallelism there is nothing to shard over.
    one = [StageSpec(tuple(range(len(ev.pgraph.blocks))))]
    a, _ = ev.make_plan(one, Mesh(1, 8, 1), Schedule("1f1b", 16, 1), method="manual")
    b, _ = ev_z.make_plan(one, Mesh(1, 8, 1), Schedule("1f1b", 16, 1), method="manual")
    assert a.stages[0].predicted.static_bytes == b.stages[0].predicted.static_bytes


def test_recompute_trades_activation_memory_for_backward_time(ev):
    split = ev.pgraph.block_index("transformer.h.2")
    mesh, sched = Mesh(2, 1, 4), Schedule("1f1b", 4, 1)
    keep, _ = ev.make_plan(_two_stages(ev, split, False), mesh, sched, method="manual")
    redo, _ = ev.make_plan(_two_stages(ev, split, True), mesh, sched, method="manual")
    for a, b in zip(keep.stages, redo.stages):
        assert b.recompute and not a.recompute
        assert b.predicted.activation_bytes < a.predicted.activation_bytes
        assert b.predicted.backward_s == pytest.approx(a.predicted.backward_s + a.predicted.forward_s)
        assert b.predicted.forward_s == a.predicted.forward_s
    assert redo.predicted.step_time_s > keep.predicted.step_time_s


def test_interleaved_schedule_with_virtual_stages(ev):
    plan, sim = plan_baseline("pipedream", ev, Pins(pp=2, schedule="interleaved", virtual_stages=2))
    assert plan.schedule.name == "interleaved" and plan.schedule.virtual_stages == 2
    assert plan.mesh == Mesh(2, 1, 4) and len(plan.stages) == 4
    assert [st.ranks[0] for st in plan.stages] == [0, 4, 0, 4]  # virtual stage s runs on pipeline rank s % pp
    owned = [m for st in plan.stages for m in st.modules]
    assert owned == [b.name for b in ev.pgraph.blocks]
    assert plan.predicted.step_time_s > 0
    assert Plan.from_json(plan.to_json()) == plan
    again, _ = ev.score(plan)
    assert again.predicted == plan.predicted


@pytest.mark.parametrize(
    "stages, words",
    [
        (lambda n: [StageSpec(tuple(range(n - 1))), StageSpec((0,))], ["missing", "lm_head", "duplicated"]),
        (lambda n: [StageSpec(tuple(range(n))), StageSpec(())], ["stage 1 owns no blocks"]),
        (lambda n: [StageSpec(tuple(range(4, n))), StageSpec(tuple(range(4)))], ["later stage"]),
        (lambda n: [StageSpec((1, 0, 2, 3)), StageSpec(tuple(range(4, n)))], ["stage 0", "model order"]),
        (lambda n: [StageSpec(tuple(range(n)))], ["1 stages given", "pp=2"]),
    ],
)
def test_wrong_stage_lists_are_refused(ev, stages, words):
    with pytest.raises(PlanError) as info:
        ev.make_plan(stages(len(ev.pgraph.blocks)), Mesh(2, 1, 4), Schedule("1f1b", 4, 1), method="manual")
    for w in words:
        assert w in str(info.value)


def test_mesh_world_size_must_match_cluster(ev):
    with pytest.raises(PlanError, match=r"uses 4 devices.*has 8"):
        ev.make_plan(_two_stages(ev, 4), Mesh(2, 1, 2), Schedule("1f1b", 8, 1), method="manual")


def test_unsupported_dtype_and_optimizer_fail_early(ev, gpt2):
    v100 = Cluster.preset("p3-v100", 1)
    with pytest.raises(AutopartError, match="no bf16 peak.*fp16"):
        Evaluator(ev.pgraph, v100, AnalyticCostModel(v100), Training(GLOBAL_BATCH))
    with pytest.raises(PlanError, match="optimizer"):
        Evaluator(ev.pgraph, v100, AnalyticCostModel(v100), Training(GLOBAL_BATCH, dtype="fp16", optimizer="lamb"))


# --- hand-written plans -------------------------------------------------------------------


def test_manual_plan_splits_at_the_named_modules(ev):
    plan, _ = manual_plan(ev, ["transformer.h.1", "transformer.h.2", "transformer.h.3"])
    assert plan.solver.method == "manual" and plan.solver.status == "MANUAL"
    assert plan.mesh == Mesh(4, 1, 2)
    assert [st.modules for st in plan.stages] == [
        ("transformer.wte", "transformer.wpe", "transformer.h.0"),
        ("transformer.h.1",),
        ("transformer.h.2",),
        ("transformer.h.3", "transformer.ln_f", "lm_head"),
    ]
    assert plan.predicted.step_time_s > 0
    with pytest.raises(PlanError, match="pp=3 x tp=1 does not divide"):
        manual_plan(ev, ["transformer.h.1", "transformer.h.3"])


def test_manual_plan_two_stages_fill_the_cluster(ev):
    plan, _ = manual_plan(ev, ["transformer.h.2"])
    assert plan.mesh == Mesh(2, 1, 4)
    assert plan.stages[0].modules == ("transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1")
    assert plan.stages[1].modules == ("transformer.h.2", "transformer.h.3", "transformer.ln_f", "lm_head")
    assert plan.schedule.microbatches * plan.schedule.micro_batch_size * 4 == GLOBAL_BATCH


def test_split_at_through_plan_parallelism(gpt2, one_node):
    result = plan_parallelism(gpt2, cluster=one_node, global_batch=GLOBAL_BATCH, split_at=["transformer.h.2"], tp=2)
    assert result.plan.mesh == Mesh(2, 2, 2)
    # A stage begins there (with virtual stages, not necessarily the second: the expert's zero-bubble
    # seed with two stages per rank honours the pin too).
    assert "transformer.h.2" in {st.modules[0] for st in result.plan.stages[1:]}, result.plan.schedule
    assert result.plan.sharding  # tp > 1 gets Megatron's layout


def test_split_at_unknown_module_suggests_close_names(ev):
    with pytest.raises(CaptureError) as info:
        manual_plan(ev, ["transformer.h2"])
    assert "transformer.h2" in str(info.value) and "did you mean" in str(info.value)
    assert "transformer.h.2" in str(info.value)


def test_split_at_out_of_order_or_at_the_first_block(ev):
    with pytest.raises(PlanError, match="in model order"):
        manual_plan(ev, ["transformer.h.3", "transformer.h.1"])
    with pytest.raises(PlanError, match="after the first block"):
        manual_plan(ev, ["transformer.wte"])
    with pytest.raises(PlanError, match="contradicts"):
        manual_plan(ev, ["transformer.h.2"], Pins(pp=4))


def test_plan_torch_cannot_run_is_refused_in_one_line_at_load(ev):
    # A 1F1B plan with fewer micro-batches than pipeline ranks: torch's Schedule1F1B refuses it,
    # so loading it does too, with the registry's rule (the one the planner and runtime use).
    plan, _ = ev.make_plan(_two_stages(ev, 4), Mesh(2, 1, 4), Schedule("1f1b", 4, 1), method="manual")
    text = _edit(plan, lambda d: d["schedule"].update(microbatches=1, micro_batch_size=4))
    with pytest.raises(PlanError) as info:
        Plan.from_json(text)
    msg = str(info.value)
    assert "\n" not in msg and "Schedule1F1B" in msg and "use 2 or more" in msg, msg


def test_zero2_and_zero3_shard_everything_at_rest_and_price_their_gathers(ev, gpt2, one_node):
    """ZeRO-2/3 hold 1/dp of weights, gradients and state at rest, plus gathered weights while they
    compute (ZeRO-2: the stage's; ZeRO-3: two blocks and the root), and pay exposed collectives."""
    specs = _two_stages(ev, ev.pgraph.block_index("transformer.h.2"))
    mesh, sched = Mesh(2, 1, 4), Schedule("1f1b", 4, 1)
    plans = {}
    for level in ("none", "zero1", "zero2", "zero3"):
        e = prepare(gpt2, cluster=one_node, global_batch=GLOBAL_BATCH, dp_sharding=level)
        plans[level], _ = e.make_plan(specs, mesh, sched, method="manual")
        names = {p for b in specs[0].blocks for p in ev.pgraph.blocks[b].params}
        at_rest, _ = e.resident_bytes(names, 1, 4, set())
        if level in ("zero2", "zero3"):  # 16 bytes per parameter, each tensor cut in 4 dim-0 chunks
            assert at_rest <= -(-16 * plans[level].stages[0].params // 4) + 16 * 4 * 1024
    static = {k: p.stages[0].predicted.static_bytes for k, p in plans.items()}
    assert static["zero3"] < static["zero2"] < static["zero1"] < static["none"], static
    for level in ("zero2", "zero3"):
        comps = [st.predicted.components for st in plans[level].stages]
        assert all(c.dp_gather_s > 0 and c.dp_reduce_s == 0 for c in comps), comps
        assert plans[level].predicted.step_time_s > plans["none"].predicted.step_time_s
    gathers = [sum(st.predicted.components.dp_gather_s for st in plans[k].stages) for k in ("zero2", "zero3")]
    assert gathers[1] > gathers[0]  # ZeRO-3 gathers the weights again in backward


def test_dp_sharding_loads_from_older_plans_and_is_refused_where_the_runtime_cannot_run_it(tp_plan):
    data = json.loads(tp_plan.to_json())
    old = dict(data, version=3, training={**{k: v for k, v in data["training"].items() if k != "dp_sharding"},
                                          "zero1": True})
    assert Plan.from_dict(old).training.dp_sharding == "zero1"
    with pytest.raises(PlanError, match="unknown key.*zero1"):  # version 4 has no zero1
        Plan.from_dict(dict(old, version=4))
    with pytest.raises(PlanError, match="training.dp_sharding 'zero4' is not one of none, zero1, zero2, zero3, hsdp"):
        Plan.from_dict(dict(data, training=dict(data["training"], dp_sharding="zero4")))
    zb = dict(data, mesh=dict(pp=2, tp=1, dp=4), schedule=dict(data["schedule"], name="zb"),
              training=dict(data["training"], dp_sharding="zero3"),
              stages=[dict(s, ranks=[]) for s in data["stages"]])
    with pytest.raises(PlanError, match="FSDP.*schedule 'zb'.*use gpipe, 1f1b or interleaved"):
        Plan.from_dict(zb)
