"""benchmarks/zero_bubble_measured.py: its argument errors (before any slow work) and the ratios its table prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.measured_quality import PlanSummary
from benchmarks.zero_bubble_measured import SPLIT_BACKWARD, WHOLE_BACKWARD, ZBOutcome, main


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--rounds", "0"], "--rounds 0 must be >= 1"),
        (["--only", "no such model", "--only", "nor this"], "--only no such model nor this matches no case"),
        (["--report", "out.txt"], "must end in .md"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys, args: list[str], says: str) -> None:
    if "--report" not in args:
        args = [*args, "--report", str(tmp_path / "r.md")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("zero_bubble_measured: error: ") and says in err and err.count("\n") == 1


def test_an_existing_report_is_kept_without_force(tmp_path: Path, capsys) -> None:
    report = tmp_path / "r.md"
    report.write_text("earlier")
    assert main(["--report", str(report)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert report.read_text() == "earlier"


def test_without_means_every_schedule_that_keeps_the_backward_whole() -> None:
    assert set(SPLIT_BACKWARD) == {"zb", "zbv", "dualpipev"}
    assert set(WHOLE_BACKWARD) == {"gpipe", "1f1b", "interleaved"}


def summary(predicted_s: float) -> PlanSummary:
    return PlanSummary(mesh="pp=2", schedule="zb", microbatches="4 x 2", stages=("a", "b"), recompute=0,
                       dp_sharding="none", origin="ilp", predicted_s=predicted_s)


def test_ratios_are_without_over_with_of_the_medians_over_every_round() -> None:
    o = ZBOutcome("t", "analytic", summary(1.0), "zero-bubble (zb)", summary(1.2), ("1f1b: 1200 ms",),
                  without_steps_s=((1.0, 1.4, 1.2), (1.1, 9.0, 1.3)), with_steps_s=((1.0, 1.0, 0.9), (1.1, 0.8, 1.0)))
    assert o.predicted_ratio == pytest.approx(1.2)
    assert o.measured_ratio == pytest.approx(1.25)
    assert o.round_ratios == pytest.approx((1.2, 1.3))
    neither = ZBOutcome("t", "analytic", summary(1.0), "", note="not run")
    assert neither.predicted_ratio is None and neither.measured_ratio is None
