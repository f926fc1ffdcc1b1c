"""Explaining plans: the step-time breakdown, ``autopart plan --explain`` and ``autopart diff``.

The components a plan stores per stage must account for the whole simulated
step on every rank (they add up to it, none negative) and put time where it
belongs: tensor-parallel communication on a Megatron plan, a bubble on a
pipeline, transfers on a cut between nodes, an exposed reduction without
overlap. The CLI cases run
``partitioner.cli.main`` in-process on the small GPT-2.
"""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest
import transformers  # noqa: F401  # imported here so its log handler binds before any capsys

from partitioner.baselines import Pins, plan_baseline
from partitioner.cli import main
from partitioner.cluster import Cluster
from partitioner.explain import COMPONENTS, breakdown
from partitioner.planner import plan_parallelism, prepare
from partitioner.plan import Plan

PLAN = ["plan", "--model", "gpt2-tiny", "--cluster", "dgx-a100-80g", "--global-batch", "16"]


@pytest.fixture(scope="module")
def ev(zoo_capture):
    return prepare(zoo_capture("gpt2-tiny").captured, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=16)


def _plans(ev):
    ilp = plan_parallelism(ev.captured, cluster=ev.cluster, global_batch=16, method="ilp", pp=2, time_limit_s=5.0)
    return {
        "ilp": (ilp.plan, ilp.evaluator),
        "megatron": (plan_baseline("megatron", ev)[0], ev),
        "pipeline": (plan_baseline("pipedream", ev, Pins(pp=2))[0], ev),
    }


@pytest.fixture(scope="module")
def plans(ev):
    return _plans(ev)


@pytest.mark.parametrize("kind", ["ilp", "megatron", "pipeline"])
def test_breakdown_adds_up_to_the_step_time(plans, kind):
    plan, _ = plans[kind]
    parts = breakdown(plan)
    assert set(COMPONENTS) <= set(parts)
    assert all(parts[k] >= 0 for k in COMPONENTS), parts
    assert sum(parts[k] for k in COMPONENTS) == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    assert 0 <= parts["bottleneck_rank"] < plan.mesh.pp
    assert parts["forward"] > 0 and parts["backward"] > 0
    if kind == "megatron":
        assert plan.mesh.tp > 1
        assert parts["tp_comm"] > 0
    if kind in ("pipeline", "ilp"):
        assert plan.mesh.pp == 2
        assert parts["bubble"] > 0


# Plans over the schedules and the set-ups that exercise each component: a pipeline with
# a bubble, recomputation, tensor parallelism, interleaving, a cut across nodes (p2p), and
# an exposed data-parallel reduction.
CASES = {
    "1f1b": (1, dict(pp=2)),
    "gpipe": (1, dict(pp=4, schedule="gpipe")),
    "interleaved": (1, dict(pp=2, schedule="interleaved", virtual_stages=2)),
    "recompute": (1, dict(pp=4, recompute=True)),
    "tp": (1, dict(pp=2, tp=2)),
    "two-nodes": (2, dict(pp=2, tp=8, microbatches=4)),
    "dp-no-overlap": (1, dict(pp=2)),
}


@pytest.fixture(scope="module")
def case_plans(zoo_capture):
    captured = zoo_capture("gpt2-tiny").captured
    out = {}
    for name, (nodes, pins) in CASES.items():
        ev = prepare(captured, cluster=Cluster.preset("dgx-a100-80g", nodes), global_batch=16,
                     overlap_dp=name != "dp-no-overlap")
        out[name] = plan_baseline("pipedream", ev, Pins(**pins))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_stored_components_add_up_to_the_simulated_step_on_every_rank(case_plans, name):
    plan, sim = case_plans[name]
    pp = plan.mesh.pp
    for r in range(pp):
        mine = [st.predicted.components for st in plan.stages if st.index % pp == r]
        assert all(getattr(c, f"{k}_s") >= 0 for c in mine for k in COMPONENTS), mine
        # Against the simulator's own figures: the step, the rank's busy time and its exposed reduction.
        assert sum(c.total_s() for c in mine) == pytest.approx(sim.step_time_s, rel=1e-9)
        work = sum(c.forward_s + c.backward_s + c.recompute_s + c.tp_comm_s for c in mine)
        assert work == pytest.approx(sim.busy_s[r], rel=1e-9)
        assert sum(c.dp_reduce_s for c in mine) == pytest.approx(sim.dp_exposed_s[r], abs=1e-15)
    comps = [st.predicted.components for st in plan.stages]
    total = {k: sum(getattr(c, f"{k}_s") for c in comps) for k in COMPONENTS}
    assert (total["recompute"] > 0) == (name == "recompute")
    assert (total["tp_comm"] > 0) == (plan.mesh.tp > 1)
    if name == "recompute":  # without tp, recomputation replays exactly the forward compute
        assert plan.mesh.tp == 1 and all(c.recompute_s == pytest.approx(c.forward_s, rel=1e-12) for c in comps)
    if name == "two-nodes":  # stage 0 on node 0, stage 1 on node 1: its inputs cross InfiniBand
        assert plan.mesh.pp == 2 and comps[1].p2p_s > 0
    if name == "dp-no-overlap":
        assert plan.mesh.dp > 1 and total["dp_reduce"] > 0
    assert total["bubble"] > 0  # every case is a pipeline
    assert Plan.from_json(plan.to_json()) == plan  # stored and read back as they are


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two plan files: the ILP's (with --explain) and a pipedream pp=2 baseline's; and the ILP run's output."""
    d = tmp_path_factory.mktemp("explain")
    a, b = d / "ilp.json", d / "pipedream.json"
    rc, out, err = _run(*PLAN, "--time-limit", "5", "--explain", "--json", str(a))
    assert rc == 0, err
    rc2, _, err2 = _run(*PLAN, "--method", "pipedream", "--mesh", "pp=2", "--json", str(b))
    assert rc2 == 0, err2
    return a, b, out


def test_plan_explain_prints_breakdown_bottleneck_memory_and_runner_up(written):
    path, _, out = written
    text = _flat(out)
    assert "where the step time goes" in text
    for label in ("forward compute", "backward compute", "tensor-parallel communication", "pipeline bubble",
                  "pipeline transfers", "data-parallel reduction"):
        assert label in text, label
    assert re.search(r"bottleneck: pipeline rank \d+", text)
    assert "memory per device" in text and "headroom" in text
    assert "runner-up mesh:" in text
    assert re.search(r"search: \d+ candidates", text)
    # The table's step time is the plan's.
    plan = Plan.load(path)
    assert json.loads(path.read_text())["predicted"]["step_time_s"] == plan.predicted.step_time_s


def test_diff_prints_both_meshes_and_which_is_faster(written):
    a, b, _ = written
    rc, out, err = _run("diff", str(a), str(b))
    assert rc == 0, err
    text = _flat(out)
    pa, pb = Plan.load(a), Plan.load(b)
    assert str(pa.mesh) in text and str(pb.mesh) in text
    m = re.search(r"(\S+) is ([\d.]+)x faster per step", text)
    assert m, text
    faster = str(a) if pa.predicted.step_time_s <= pb.predicted.step_time_s else str(b)
    assert m[1] == faster
    assert float(m[2]) >= 1.0


def test_diff_of_a_missing_file_is_a_one_line_error(written, tmp_path):
    a, _, _ = written
    missing = tmp_path / "nope.json"
    rc, out, err = _run("diff", str(a), str(missing))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autopart: error: "), err
    assert "nope.json" in lines[0] and "Traceback" not in err


def test_a_weight_on_two_pipeline_ranks_has_its_gradient_sum_priced(ev):
    """GPT-2's embedding and head share ``transformer.wte.weight``. Split over two pipeline ranks,
    each owner all-reduces its gradient after the backward, as the runtime does; the plan prices that
    sum on the links between the owners, and `explain` shows it. Under zbv the V puts the first and
    last stage on rank 0, one copy: nothing is summed."""
    from partitioner.simulate import TiedSum

    split = plan_parallelism(ev.captured, cluster=ev.cluster, global_batch=16, method="pipedream", pp=2, schedule="1f1b")
    plan = split.plan
    costs = ev.stage_costs([ev.spec_of(st) for st in plan.stages], plan.mesh, plan.schedule, {})
    grad = ev.captured.params["transformer.wte.weight"].numel * ev.optimizer.grad_bytes
    seconds = ev.cost_model.collective_time("all_reduce", float(grad), [plan.mesh.rank(0), plan.mesh.rank(1)])
    assert [c.tied_sums for c in costs] == [(TiedSum("transformer.wte.weight", seconds),)] * 2
    assert seconds > 0
    summed = [st.predicted.components.tied_sum_s for st in plan.stages]
    assert min(summed) == pytest.approx(seconds)  # the later owner waits for no one
    assert plan.predicted.step_time_s == pytest.approx(max(st.predicted.components.total_s() for st in plan.stages))
    assert breakdown(plan)["tied_sum"] in summed

    v = plan_parallelism(ev.captured, cluster=ev.cluster, global_batch=16, method="pipedream", pp=2, schedule="zbv").plan
    assert all(st.predicted.components.tied_sum_s == 0.0 for st in v.stages)
