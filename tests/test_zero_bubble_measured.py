"""benchmarks/zero_bubble_measured.py: the ratios its table prints (its argument errors: tests/test_measured_quality.py)."""

from __future__ import annotations

import pytest

from benchmarks.measured_quality import PlanSummary
from benchmarks.zero_bubble_measured import SPLIT_BACKWARD, WHOLE_BACKWARD, ZBOutcome


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
