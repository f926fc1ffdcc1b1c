"""The step-time model's recorded error ([Note: the recorded step-time error] in cost_models/step_error.py):
what the fidelity benchmark writes, what the repository holds, and what `autopart explain` says with it."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from benchmarks import fidelity
from cost_models import RecordedStepError, recorded_step_error
from partitioner.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _record(**changes) -> RecordedStepError:
    base = dict(median_error=0.07, worst_error=0.25, most_under=-0.25, most_over=0.14, layouts=16, runs=48,
                device="AMD EPYC", backend="gloo", command="python -m benchmarks.fidelity ...", date="2026-12-07",
                source="benchmarks/results/x.md")
    return RecordedStepError(**(base | changes))


def test_the_repository_s_record_is_what_its_report_says() -> None:
    rec = recorded_step_error()
    report = ROOT / rec.source
    assert report.exists() and rec.command.startswith("python -m benchmarks.fidelity")
    [summary] = [l for l in report.read_text().splitlines() if l.startswith("**Summary:**")]
    found = re.search(r"step time over (\d+) layouts, each the mean of (\d+) rounds: median \|error\| ([\d.]+)%, "
                      r"worst ([\d.]+)%", summary)
    assert found, summary
    layouts, rounds, median, worst = int(found[1]), int(found[2]), float(found[3]), float(found[4])
    assert (rec.layouts, rec.runs) == (layouts, layouts * rounds)
    assert abs(rec.median_error * 100 - median) <= 0.051 and abs(rec.worst_error * 100 - worst) <= 0.051
    assert -rec.worst_error <= rec.most_under <= rec.most_over <= rec.worst_error
    assert max(-rec.most_under, rec.most_over) == pytest.approx(rec.worst_error)


def test_a_plan_is_told_the_error_on_its_own_device_or_that_its_device_was_not_measured() -> None:
    rec = _record()
    same = rec.describe("AMD EPYC")
    assert same.startswith("step time: measured against runs on AMD EPYC (gloo): median |error| 7.0%, worst 25.0%")
    assert "from -25.0% to +14.0% over 16 layouts (48 runs; benchmarks/results/x.md, 2026-12-07)" in same
    uncalibrated = rec.describe("AMD EPYC", calibrated=False)
    assert uncalibrated.startswith("step time: this plan's cluster was not calibrated") and "worst 25.0%" in uncalibrated
    other = rec.describe("NVIDIA H100 80GB HBM3")
    assert other.startswith("step time: not measured on NVIDIA H100 80GB HBM3 yet; on AMD EPYC (gloo)")
    assert "worst 25.0%" in other


def test_a_bad_record_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="median .* and worst"):
        _record(median_error=0.3)
    with pytest.raises(ValueError, match="most_under"):
        _record(most_under=0.2)
    bad = tmp_path / "step_error.json"
    bad.write_text(json.dumps({"median_error": 0.1}))
    with pytest.raises(ValueError, match="not a step-time error record.*--record-step-error"):
        recorded_step_error(bad)
    with pytest.raises(ValueError, match="no step-time error recorded"):
        recorded_step_error(tmp_path / "absent.json")


def test_the_fidelity_benchmark_writes_the_record_explain_reads(tmp_path: Path, monkeypatch) -> None:
    def outcome(layout: str, predicted: float, measured: float) -> fidelity.Outcome:
        return fidelity.Outcome(layout, predicted, measured, 0.1, ((0, 10, 10),), "", 0.1, round_errors=(0.0, 0.0))

    outcomes = [outcome("a", 0.9, 1.0), outcome("b", 1.2, 1.0), outcome("c", 1.0, 1.0)]
    monkeypatch.setattr(fidelity, "STEP_ERROR_FILE", tmp_path / "step_error.json")
    report = tmp_path / "report.md"
    written = fidelity.record_step_error(outcomes, 6, "AMD EPYC", "python -m benchmarks.fidelity --rounds 2", report)
    rec = recorded_step_error(written)
    assert rec.median_error == pytest.approx(0.1) and rec.worst_error == pytest.approx(0.2)
    assert (rec.most_under, rec.most_over) == (pytest.approx(-0.1), pytest.approx(0.2))
    assert (rec.layouts, rec.runs, rec.device, rec.backend) == (3, 6, "AMD EPYC", "gloo")
    assert rec.source == str(report)


@pytest.mark.parametrize("flags", [["--report", "r.md", "--rounds", "1"], ["--report", "r.md", "--rounds", "2", "--only", "mlp"],
                                   ["--rounds", "2"]])
def test_the_benchmark_refuses_to_record_from_less_than_every_layout_over_rounds(tmp_path: Path, monkeypatch, flags) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--record-step-error needs"):
        fidelity.main(["--record-step-error", "--calibrate-each", *flags])
    assert list(tmp_path.iterdir()) == []


def test_explain_states_the_record_under_the_step_time(tmp_path: Path, capsys, monkeypatch) -> None:
    rec = recorded_step_error()
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "mlp", "--cluster", "dgx-a100-80g", "--mesh", "pp=2", "--global-batch", "8",
                 "--method", "params", "--quiet", "--json", str(out)]) == 0
    device = json.loads(out.read_text())["cluster"]["device"]["name"]
    monkeypatch.setenv("COLUMNS", "400")
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    [line] = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step time: ")]
    assert line == rec.describe(device)
    assert line.startswith(f"step time: not measured on {device} yet; on {rec.device}")
    assert dataclasses.replace(rec, device=device).describe(device).startswith(f"step time: measured against runs on {device}")
