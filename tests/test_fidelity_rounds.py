"""benchmarks/fidelity.py over rounds: each layout's error with its standard error, and the layouts whose
error the rounds' scatter does not explain ([Note: the rounds' standard error])."""

from __future__ import annotations

import math
import statistics

import pytest

from benchmarks import fidelity
from benchmarks.fidelity import Outcome, combine, summarize, table


def _round(layout: str, predicted_ms: float, measured_ms: float) -> Outcome:
    return Outcome(layout=layout, predicted_step_s=predicted_ms / 1e3, measured_step_s=measured_ms / 1e3, step_spread=0.1,
                   memory=((0, 100, 100), (1, 110, 100)), largest_residual="", reserve=0.1, steps=10)


def test_a_layout_s_error_carries_the_standard_error_of_its_rounds() -> None:
    # three rounds under-predicted by 20, 22 and 18%: far beyond their scatter
    under = combine([_round("a", 80, 100), _round("a", 78, 100), _round("a", 82, 100)])
    assert under.step_error == pytest.approx(0.80 / 1.00 - 1)
    assert under.round_error_se == pytest.approx(statistics.stdev([-0.20, -0.22, -0.18]) / math.sqrt(3))
    assert under.biased
    # rounds of -20, +25 and -5%: a mean error of 0 within a wide scatter
    noisy = combine([_round("b", 80, 100), _round("b", 125, 100), _round("b", 95, 100)])
    assert noisy.step_error == pytest.approx(0.0) and not noisy.biased
    assert noisy.round_error_se == pytest.approx(statistics.stdev([-0.20, 0.25, -0.05]) / math.sqrt(3))
    # one round has no scatter to judge by
    assert _round("c", 80, 100).round_error_se is None and not _round("c", 80, 100).biased


def test_the_table_and_the_summary_name_the_layouts_beyond_twice_their_standard_error() -> None:
    under = combine([_round("under", 80, 100), _round("under", 78, 100), _round("under", 82, 100)])
    noisy = combine([_round("noisy", 80, 100), _round("noisy", 125, 100), _round("noisy", 95, 100)])
    s = summarize([under, noisy])
    assert s["biased"] == ["under"]
    assert s["se_median"] == pytest.approx(statistics.median([under.round_error_se, noisy.round_error_se]))
    assert s["se_worst"] == pytest.approx(noisy.round_error_se)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table([under, noisy])[2:]}
    assert f"-20.0% ± {under.round_error_se:.1%} (beyond 2 se) (rounds -20%, -22%, -18%)" in rows["under"]
    assert "beyond 2 se" not in rows["noisy"] and f"± {noisy.round_error_se:.1%} (rounds" in rows["noisy"]
    # single runs: no standard error, no such figures
    assert "se_median" not in summarize([_round("one", 80, 100)])


@pytest.mark.parametrize("flags", [["--rounds", "2", "--no-calibrate"], ["--rounds", "2", "--memory-only"]])
def test_rounds_are_refused_without_a_calibration_a_round(tmp_path, monkeypatch, capsys, flags) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        fidelity.main(flags)
    assert refused.value.code == 2 and "--rounds N calibrates every round" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_re_pricing_finds_the_calibration_each_plan_was_made_on(tmp_path) -> None:
    # benchmarks/fidelity_reprice.py: a layout's own calibration (--calibrate-each), else its round's for the
    # plan's world size; neither is a one-line refusal naming both
    from benchmarks.fidelity_reprice import calibration_of

    plan = {"mesh": {"pp": 2, "tp": 1, "dp": 2}}
    (tmp_path / "calibrated-4-r2.toml").write_text("")
    assert calibration_of(tmp_path, "gpt2-tiny-pp2-dp2-zero1-r2", plan) == tmp_path / "calibrated-4-r2.toml"
    (tmp_path / "calibrated-gpt2-tiny-pp2-dp2-zero1-r2.toml").write_text("")
    assert calibration_of(tmp_path, "gpt2-tiny-pp2-dp2-zero1-r2", plan) == tmp_path / "calibrated-gpt2-tiny-pp2-dp2-zero1-r2.toml"
    with pytest.raises(SystemExit, match="neither calibrated-mlp-dp2-r3.toml nor calibrated-4-r3.toml"):
        calibration_of(tmp_path, "mlp-dp2-r3", plan)
