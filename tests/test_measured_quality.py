"""benchmarks/measured_quality.py: its argument errors and zero_bubble_measured.py's (before any slow work), and the
ratios its table prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.measured_quality import Outcome, main
from benchmarks.zero_bubble_measured import main as zb_main


# Both measured benchmarks share their arguments and checks (measured_quality.run_main, report_path).
BENCHMARKS = {"measured_quality": main, "zero_bubble_measured": zb_main}


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        ("measured_quality", ["--rounds", "0"], "--rounds 0 must be >= 1"),
        ("measured_quality", ["--only", "no such model"], "matches no case; the cases are gpt2 4x128, vocab 50257, free mesh"),
        ("measured_quality", ["--report", "out.txt"], "must end in .md"),
        ("zero_bubble_measured", ["--rounds", "0"], "--rounds 0 must be >= 1"),
        ("zero_bubble_measured", ["--only", "no such model", "--only", "nor this"],
         "--only no such model nor this matches no case"),
        ("zero_bubble_measured", ["--report", "out.txt"], "must end in .md"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys, name: str, args: list[str], says: str) -> None:
    if "--report" not in args:
        args = [*args, "--report", str(tmp_path / "r.md")]
    assert BENCHMARKS[name](args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: error: ") and says in err and err.count("\n") == 1


@pytest.mark.parametrize("name", BENCHMARKS)
def test_an_existing_report_is_kept_without_force(tmp_path: Path, capsys, name: str) -> None:
    report = tmp_path / "r.md"
    report.write_text("earlier")
    assert BENCHMARKS[name](["--report", str(report)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert report.read_text() == "earlier"


def outcome(**kw) -> Outcome:
    base = dict(title="t", model="m", config=(), mesh="pp=2", costs="analytic", expert=None, ilp=None,
                same_plan=False, predicted_ratio=1.2)
    return Outcome(**{**base, **kw})


def test_measured_ratio_is_of_the_medians_over_every_round_and_the_error_is_against_it() -> None:
    o = outcome(expert_steps_s=((1.0, 1.4, 1.2), (1.1, 9.0, 1.3)), ilp_steps_s=((1.0, 1.0, 0.9), (1.1, 0.8, 1.0)))
    assert o.expert_median_s == pytest.approx(1.25) and o.ilp_median_s == pytest.approx(1.0)
    assert o.measured_ratio == pytest.approx(1.25)
    assert o.round_ratios == pytest.approx((1.2, 1.3))
    assert o.error == pytest.approx(1.2 / 1.25 - 1)


def test_the_same_plan_measures_one_by_construction_and_a_failed_run_measures_nothing() -> None:
    assert outcome(same_plan=True, predicted_ratio=1.0).measured_ratio == 1.0
    failed = outcome(expert_steps_s=((1.0,),), note="ilp run 1 failed")
    assert failed.measured_ratio is None and failed.error is None
