"""``autopart compare``, its library (partitioner/compare/), its pictures and the standing matrix.

The end-to-end cases run ``partitioner.cli.main`` in-process on ``gpt2-tiny`` with a short ILP
limit; one comparison is made per module and inspected by several tests. Measuring needs the
runtime (``autopart run``): that test is skipped only while this autopart has no ``run`` command.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
from pathlib import Path

import pytest
import transformers  # noqa: F401  # imported before any capsys, as in test_cli.py

from benchmarks.run_matrix import MATRIX, headline, load_matrix
from benchmarks.run_matrix import main as matrix_main
from partitioner.cli import main
from partitioner.cluster import load_cluster
from partitioner.compare import (
    Case, CaseResult, CompareError, MeasureSettings, MeasuredEvent, Measurement, check_out_dir, compare,
    parse_methods, run_case, spearman,
)
from partitioner.compare.measuring import _last_step, _read_run_json, _too_large
from partitioner.plan import Plan
from partitioner.planner import score_plan
from partitioner.zoo import load_model

TINY = ["--model", "gpt2-tiny", "--cluster", "dgx-a100-80g", "--global-batch", "16", "--time-limit", "2"]
METHODS = ("ilp", "expert", "uniform", "params", "pipedream", "megatron")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("autopart: ")]
    assert len(lines) == 1 and lines[0].startswith("autopart: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``autopart compare ... --out DIR`` run once: (dir, stdout)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["compare", *TINY, "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


# --- the table -------------------------------------------------------------------------------


def test_table_has_a_row_per_method_with_every_column(report):
    _, out = report
    flat = " ".join(out.split())
    for column in ("method", "mesh", "schedule", "micro-batches", "step time", "samples/s", "TFLOP/s/dev", "MFU",
                   "bubble", "peak mem/dev", "fits", "solver", "origin", "vs expert"):
        assert column in flat
    for method in METHODS:
        assert re.search(rf"│ {method}\b", out), method
    assert re.search(r"│ expert .*│\s+1\.00x │", out)


def test_written_plans_are_the_tabled_ones_and_rescore_the_same(report):
    out, _ = report
    data = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in data["cases"][0]["rows"]}
    assert set(rows) == set(METHODS)
    lm = load_model("gpt2-tiny", dtype="bf16")  # compare's default dtype, as autopart plan's
    cluster = load_cluster("dgx-a100-80g")
    for method, row in rows.items():
        plan = Plan.load(out / "plans" / f"gpt2-tiny_dgx-a100-80g-{method}.json")
        assert plan.solver.method == method
        assert plan.predicted.step_time_s == pytest.approx(row["predicted"]["step_time_s"])
        if method in ("ilp", "megatron"):  # an independent re-pricing agrees with the table
            again = score_plan(plan, lm.model, lm.example_inputs, cluster, name=lm.name)
            assert again.plan.predicted.step_time_s == pytest.approx(plan.predicted.step_time_s)
    expert = rows["expert"]["predicted"]["step_time_s"]
    for row in rows.values():
        assert row["speedup_over_expert"] == pytest.approx(expert / row["predicted"]["step_time_s"])
    # The ILP's plan says where it came from: its own solve, or the seed no solve beat.
    origin = rows["ilp"]["solver"]["origin"]
    assert origin == "ilp" or origin in METHODS
    assert rows["ilp"]["solver"]["seed_step_s"] == pytest.approx(min(
        r["predicted"]["step_time_s"] for m, r in rows.items() if m != "ilp"))
    # The ILP starts from the baselines' plans, so it is never slower than any of them.
    assert rows["ilp"]["predicted"]["step_time_s"] <= min(r["predicted"]["step_time_s"] for r in rows.values()) * (1 + 1e-9)


def test_report_holds_tables_pictures_machine_and_command(report):
    out, _ = report
    md = (out / "report.md").read_text()
    assert "$ autopart compare --model gpt2-tiny --cluster dgx-a100-80g --global-batch 16 --time-limit 2 --out" in md
    assert "torch " in md and "cpu " in md and "Machine:" in md
    assert "| method | mesh |" in md and "| ilp |" in md
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert {"timeline.png", "stages.png"} <= set(pictures)
    for name in pictures:
        w, h = png_size(out / name)
        assert w >= 600 and h >= 300
        svg = (out / name).with_suffix(".svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "</svg>" in svg


def test_out_is_never_overwritten_without_force(report, capsys, tmp_path):
    out, _ = report
    before = (out / "report.md").read_bytes()
    rc, stdout, err = run(capsys, "compare", *TINY, "--out", str(out))
    assert_one_line_error(rc, err, str(out), "--force")
    assert stdout == "" and (out / "report.md").read_bytes() == before
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(CompareError, match="is a file"):
        check_out_dir(a_file, force=True)
    assert check_out_dir(out, force=True) == out


def test_unknown_method_is_one_line_before_any_work(capsys):
    rc, out, err = run(capsys, "compare", *TINY, "--methods", "ilp,unifrom")
    assert_one_line_error(rc, err, "unifrom", "did you mean 'uniform'")
    assert parse_methods("ilp, uniform,ilp") == ("ilp", "uniform")
    with pytest.raises(CompareError, match="empty"):
        parse_methods(",")


def test_a_method_without_a_plan_is_a_row_not_a_crash(capsys):
    # pp=8 on a 4-layer model: uniform needs a layer per stage and megatron's tp=8 leaves one device.
    rc, out, err = run(capsys, "compare", *TINY, "--mesh", "pp=8", "--methods", "ilp,uniform,megatron")
    assert rc == 0, err
    flat = " ".join(out.split())
    assert re.search(r"uniform │ no plan \(see below\)", flat)
    assert "uniform: no plan: the model has 4 layers, fewer than the 8 stages" in flat
    assert "megatron: no plan:" in flat
    assert re.search(r"│ ilp +│ pp=8,tp=1,dp=1", out)


def test_library_keywords_are_the_cli_options():
    import inspect

    from partitioner.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.choices and "compare" in a.choices)
    dests = {a.dest for a in sub.choices["compare"]._actions if a.dest != "help"}
    assert dests <= set(inspect.signature(compare).parameters)


# --- measuring -------------------------------------------------------------------------------


def test_measure_refuses_a_cluster_that_is_not_this_machine(capsys):
    rc, _, err = run(capsys, "compare", *TINY, "--measure")
    assert_one_line_error(rc, err, "--measure", "local-cpu:N")


def test_profile_options_are_checked_before_any_work(capsys, tmp_path):
    rc, _, err = run(capsys, "compare", *TINY, "--cache", str(tmp_path / "p.sqlite"))
    assert_one_line_error(rc, err, "--cache", "go with --profile")
    rc, _, err = run(capsys, "compare", *TINY, "--profile")
    assert_one_line_error(rc, err, "--profile", "local-cpu")
    assert not (tmp_path / "p.sqlite").exists()


@pytest.mark.slow  # profiles, then two torchrun launches
def test_measure_runs_each_plan_and_reports_error_and_spearman(capsys, tmp_path):
    # Two distinct plans (ilp: data parallel; megatron: tp=2 over the node), priced with measured costs.
    out = tmp_path / "m"
    rc, stdout, err = run(
        capsys, "compare", "--model", "gpt2-tiny", "--cluster", "local-cpu:2", "--global-batch", "8",
        "--methods", "ilp,megatron", "--time-limit", "5", "--profile", "--cache", str(tmp_path / "p.sqlite"),
        "--measure", "--steps", "2", "--warmup", "1", "--out", str(out),
    )
    assert rc == 0, err
    data = json.loads((out / "results.json").read_text())
    assert data["cases"][0]["costs"].startswith("profiled on ")
    measured = [r for r in data["cases"][0]["rows"] if r.get("measured", {}).get("status") == "measured"]
    assert len(measured) == 2, data
    for r in measured:
        m = r["measured"]
        assert m["median_s"] > 0 and len(m["step_times_s"]) == 2
        assert m["error"] == pytest.approx((r["predicted"]["step_time_s"] - m["median_s"]) / m["median_s"])
    md = (out / "report.md").read_text()
    assert "Spearman rank correlation" in md and "measured.png" in md and "Costs: profiled on" in md
    assert "| gpt2-tiny on local-cpu:2 | ilp |" in md  # the predicted-vs-measured table, a row per plan
    assert png_size(out / "measured.png")[0] >= 400
    flat = " ".join(stdout.split())
    assert "measured" in flat and "costs: profiled on" in flat


def test_run_json_drops_warmup_steps_and_keeps_the_last_step_events(tmp_path):
    settings = MeasureSettings(steps=3, warmup=2)
    events = [
        {"rank": 0, "stage": 0, "kind": "F", "microbatch": 0, "start_s": 10.0, "end_s": 10.5},  # step 1
        {"rank": 0, "stage": 0, "kind": "F", "microbatch": 0, "start_s": 20.0, "end_s": 20.5},  # step 2 (kept)
        {"rank": 1, "stage": 1, "kind": "B", "microbatch": 0, "start_s": 21.0, "end_s": 22.0},
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"plan": "p.json", "world_size": 2, "step_times_s": [9, 9, 1, 3, 2], "losses": [],
                                "events": events}))
    m = _read_run_json(path, settings, tmp_path / "log")
    assert m.step_times_s == (1.0, 3.0, 2.0) and m.median_s == 2.0
    assert m.events == (MeasuredEvent(0, 0, "F", 0, 0.0, 0.5), MeasuredEvent(1, 1, "B", 0, 1.0, 2.0))
    path.write_text(json.dumps({"step_times_s": [1.5, 2.5, 3.5]}))  # exactly the measured steps
    assert _read_run_json(path, settings, tmp_path / "log").step_times_s == (1.5, 2.5, 3.5)
    path.write_text(json.dumps({"step_times_s": []}))
    with pytest.raises(CompareError, match="step_times_s"):
        _read_run_json(path, settings, tmp_path / "log")
    path.write_text("{")
    with pytest.raises(CompareError, match="not valid JSON"):
        _read_run_json(path, settings, tmp_path / "log")
    assert _last_step([]) == ()


def test_a_failed_run_is_named_by_the_ranks_error_not_torchruns_banner(tmp_path):
    from partitioner.compare.measuring import _last_line

    log = tmp_path / "run.log"
    log.write_text("$ torchrun ...\nautopart: internal error: NotImplementedError: x (set AUTOPART_DEBUG=1 ...)\n"
                   "Traceback (most recent call last):\n  error_file: <N/A>\n" + "=" * 60 + "\n")
    assert _last_line(log).startswith("autopart: internal error: NotImplementedError")
    log.write_text("something broke\n" + "=" * 60 + "\n")
    assert _last_line(log) == "something broke"


def test_too_large_cases_are_skipped_with_the_reason(zoo_capture):
    from partitioner.cluster import Cluster

    tiny = run_case(Case(model="gpt2-tiny", cluster="local-cpu:2", dtype="fp32", global_batch=4),
                    ["uniform"], progress=None)
    plan = tiny.row("uniform").plan
    captured = zoo_capture("gpt2-tiny").captured
    here = Cluster.local(1)
    assert _too_large(plan, captured, MeasureSettings(), here) is None
    m = _too_large(plan, captured, MeasureSettings(max_world_size=1), here)
    assert m.status == "skipped" and "too large to measure here: 2 processes" in m.reason
    m = _too_large(plan, captured, MeasureSettings(memory_fraction=1e-9), here)
    assert m.status == "skipped" and "GiB for 2 processes" in m.reason
    m = _too_large(plan, captured, MeasureSettings(timeout_s=1e-9), here)
    assert m.status == "skipped" and "too slow to measure here" in m.reason


def test_timeline_draws_measured_beside_simulated(report):
    from dataclasses import replace

    from partitioner.plots import scatter_figure, timeline_figure

    out, _ = report
    case = run_case(Case(model="gpt2-tiny", cluster="dgx-a100-80g", global_batch=16, mesh="pp=2"), ["uniform"])
    row = case.row("uniform")
    # Events shaped like the runtime's, taken from the simulation at twice the time.
    events = tuple(
        MeasuredEvent(row.plan.mesh.rank(e.rank), e.action.stage, e.action.kind, e.action.microbatch, 2 * e.start_s, 2 * e.end_s)
        for e in row.sim.events
    )
    measured = Measurement("measured", step_times_s=(2 * row.step_s,), events=events)
    case = replace(case, rows=(replace(row, measured=measured),))
    fig = timeline_figure(case)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert any(t.startswith("uniform: pp=2") for t in titles)
    assert any("measured, median step" in t for t in titles)
    assert len(fig.axes) == 2
    fig = scatter_figure([(case, case.rows[0])], None)
    assert fig.axes[0].get_xlabel().startswith("predicted")


# --- statistics ------------------------------------------------------------------------------


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4) -> 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1], [2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


# --- the standing matrix ---------------------------------------------------------------------


def test_standing_matrix_covers_the_required_models_and_clusters():
    m = load_matrix(MATRIX)
    models = {c.model for c in m.cases}
    assert {"gpt2", "gpt2-xl", "llama2-7b", "llama2-70b", "gpt3-175b", "bert-large", "hetero-lm"} <= models
    clusters = {(c.cluster, c.nodes) for c in m.cases}
    assert {("dgx-a100-80g", 1), ("dgx-a100-80g", 4), ("dgx-h100", 16), ("dgx-a100-80g", 64)} <= clusters
    assert len(m.cases) == len(models) * len(clusters)
    assert all(c.time_limit and c.global_batch for c in m.cases)


def test_the_v100_matrix_takes_the_standing_matrix_s_models():
    """benchmarks/matrix-v100.toml reads its [models] from matrix.toml (models_from): the same models,
    batches per device, time limits and unlike-layer marks, on its own clusters."""
    standing, v100 = load_matrix(MATRIX), load_matrix(MATRIX.parent / "matrix-v100.toml")
    assert {c.cluster for c in v100.cases} == {"p3-v100"}

    def per_model(m):  # each model's settings, with its batch per device (global batch / devices)
        out = {}
        for c in m.cases:
            devices = load_cluster(c.cluster, nodes=c.nodes).world_size
            out.setdefault(c.model, set()).add((c.config, c.seq_len, c.dtype, c.time_limit, c.global_batch // devices))
        return out

    assert per_model(v100) == per_model(standing)
    assert {t.split(" on ")[0] for t in v100.unlike} == {t.split(" on ")[0] for t in standing.unlike}


def test_matrix_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "m.toml"
    cases = [  # (the file, the error it gets)
        ('[clusters]\n"1x" = { cluster = "dgx-a100-80g", node = 1 }\n[models.gpt2]\nbatch_per_device = 8\n',
         r"\[clusters\] '1x' has unknown key\(s\) node"),
        ('timelines = ["nope"]\n[clusters]\n"1x" = { cluster = "dgx-a100-80g" }\n[models.gpt2]\n',
         "timelines names unknown case"),
        ('models_from = "nowhere.toml"\n[clusters]\n"1x" = { cluster = "dgx-a100-80g" }\n',
         r"models_from = 'nowhere.toml': cannot read"),
        ('models_from = "m.toml"\n[clusters]\n"1x" = { cluster = "dgx-a100-80g" }\n[models.gpt2]\n', "not both"),
    ]
    for text, error in cases:
        bad.write_text(text)
        with pytest.raises(CompareError, match=error):
            load_matrix(bad)


@pytest.mark.slow  # ILP solves of several cases
def test_matrix_runs_and_reports_the_headline(tmp_path, capsys):
    toml = tmp_path / "m.toml"
    toml.write_text(
        'methods = ["ilp", "uniform", "megatron"]\ntimelines = ["gpt2-tiny on 1x"]\n'
        '[clusters]\n"1x" = { cluster = "dgx-a100-80g", nodes = 1 }\n"2x" = { cluster = "dgx-h100", nodes = 2 }\n'
        "[models.gpt2-tiny]\nbatch_per_device = 2\ntime_limit = 2\n"
    )
    report = tmp_path / "r" / "2026-01-01-matrix.md"
    report.parent.mkdir()
    assert matrix_main(["--matrix", str(toml), "--report", str(report)]) == 0
    md = report.read_text()
    assert "Geometric-mean speedup of **ilp (own solves)** over expert" in md
    assert "Worst case against the best baseline" in md and "ILP solver time" in md
    assert "(2026-01-01-matrix/speedup.png)" in md and "(2026-01-01-matrix/gpt2-tiny_1x-timeline.png)" in md
    assert "gpt2-tiny_2x-timeline" not in md  # only the cases the TOML names get timelines
    data = json.loads(report.with_suffix(".json").read_text())
    assert [c["title"] for c in data["cases"]] == ["gpt2-tiny on 1x", "gpt2-tiny on 2x"]
    capsys.readouterr()
    assert matrix_main(["--matrix", str(toml), "--report", str(report)]) == 2  # refuses to replace it
    assert "already exists; pass --force" in capsys.readouterr().err


def test_headline_geomean_and_worst_case():
    from partitioner.compare import Row

    class P:  # the fields headline reads
        def __init__(self, step, origin=None, seed=None):
            self.predicted = type("Pr", (), {"step_time_s": step, "fits": True})()
            self.solver = type("S", (), {"wall_s": 1.0, "origin": origin, "seed_step_s": seed})()

    def case(name, ilp, expert, origin):
        rows = (Row("ilp", P(ilp, origin, expert)),
                Row("expert", P(expert)) if expert else Row("expert", error="no plan"))
        return CaseResult(Case(label=name), "c", 1, rows, 0.0, 0.0)

    # a: the solve beat the expert seed 2x; b: the expert seed was kept (no gain); c: no expert plan.
    h = headline([case("a", 1.0, 2.0, "ilp"), case("b", 1.0, 1.0, "expert"), case("c", 1.0, None, "ilp")],
                 ["expert"], frozenset({"a"}))
    assert h["speedup"]["ilp (own solves)"]["geomean"] == pytest.approx(2 ** 0.5)
    assert h["speedup"]["ilp (own solves), unlike-layer models"]["geomean"] == pytest.approx(2.0)
    wins = h["vs_reference"]["all"]["wins"]
    assert wins["wins"] == 2 and wins["cases"] == 3 and wins["gain_geomean"] == pytest.approx(2.0)
    assert h["worst"] == (pytest.approx(1.0), "b") and h["never_worse"] == 2 and h["compared"] == 2
