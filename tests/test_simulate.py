"""Tests for the pipeline schedule simulator (partitioner/simulate.py).

Closed forms come from the GPipe / PipeDream-Flush analysis and Narayanan et
al. 2021 (interleaved 1F1B); the hand cases are worked out in comments.
"""

from __future__ import annotations

import gc
import math
import random
from dataclasses import replace

import pytest

from partitioner.errors import PlanError
from partitioner.simulate import (
    SCHEDULES,
    Action,
    SimResult,
    StageCost,
    TiedSum,
    schedule_order,
    simulate,
    simulate_orders,
)


def uniform(ranks: int, f: float, b: float, chunks: int = 1, **extra: float) -> list[StageCost]:
    """``ranks * chunks`` equal stages; each chunk carries 1/chunks of a rank's work."""
    return [StageCost(f / chunks, b / chunks, **extra) for _ in range(ranks * chunks)]


def actions(text: str) -> list[Action]:
    return [Action.parse(word) for word in text.split()]


def assert_valid_timeline(stages: list[StageCost], result: SimResult) -> None:
    """Every event obeys the timing model and starts as early as it can."""
    ranks = result.ranks
    last = len(stages) - 1
    done = {(e.action.stage, e.action.kind, e.action.microbatch): e for e in result.events}
    free = [0.0] * ranks
    for e in result.events:  # rank-major, each rank in execution order
        a = e.action
        cost = stages[a.stage]
        if a.kind == "F":
            assert e.end_s - e.start_s == pytest.approx(cost.forward_s)
            ready = 0.0
            if a.stage > 0:
                ready = done[(a.stage - 1, "F", a.microbatch)].end_s + stages[a.stage - 1].send_s
        else:
            assert e.end_s - e.start_s == pytest.approx(cost.backward_s)
            ready = done[(a.stage, "F", a.microbatch)].end_s
            if a.stage < last:
                ready = max(ready, done[(a.stage + 1, "B", a.microbatch)].end_s + cost.send_s)
        assert e.rank == a.stage % ranks
        assert e.start_s == pytest.approx(max(free[e.rank], ready))
        free[e.rank] = e.end_s


# --------------------------------------------------------------------------
# Action


@pytest.mark.parametrize("text", ["2F0", "0B3", "17F123"])
def test_action_round_trips(text: str) -> None:
    action = Action.parse(text)
    assert str(action) == text
    assert repr(action) == text
    assert Action.parse(str(action)) == action


def test_action_fields() -> None:
    assert Action.parse("2B3") == Action(stage=2, kind="B", microbatch=3)
    assert Action.parse(" 4 F 1 ") == Action(4, "F", 1)


@pytest.mark.parametrize("text", ["", "2X0", "F0", "2F", "-1F0", "2f0"])
def test_action_parse_rejects(text: str) -> None:
    with pytest.raises(PlanError, match="expected <stage><F|B><microbatch>"):
        Action.parse(text)


# --------------------------------------------------------------------------
# Schedule orders


def test_gpipe_order() -> None:
    orders = schedule_order("gpipe", 2, 3)
    assert orders[1] == actions("1F0 1F1 1F2 1B0 1B1 1B2")


def test_1f1b_order() -> None:
    orders = schedule_order("1f1b", 3, 4)
    assert orders == [
        actions("0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3"),
        actions("1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3"),
        actions("2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3"),
    ]


def test_1f1b_refuses_fewer_microbatches_than_ranks() -> None:
    # torch's Schedule1F1B refuses them, so the registry (and with it every order) does too.
    with pytest.raises(PlanError, match=r"^schedule '1f1b' needs at least 4 micro-batches .* use 4 or more$"):
        schedule_order("1f1b", 4, 2)


def test_interleaved_with_one_chunk_is_1f1b() -> None:
    assert schedule_order("interleaved", 4, 6, 1) == schedule_order("1f1b", 4, 6)


@pytest.mark.parametrize(("ranks", "microbatches", "chunks"), [(4, 8, 2), (2, 4, 3), (4, 4, 2), (3, 6, 4)])
def test_interleaved_order_follows_megatron(ranks: int, microbatches: int, chunks: int) -> None:
    """Chunk ids from Megatron-LM's get_model_chunk_id, warm-up from its formula."""
    group = ranks * chunks
    total = microbatches * chunks
    for rank, order in enumerate(schedule_order("interleaved", ranks, microbatches, chunks)):
        forwards = [a for a in order if a.kind == "F"]
        backwards = [a for a in order if a.kind == "B"]
        for k, (fwd, bwd) in enumerate(zip(forwards, backwards, strict=True)):
            chunk = (k % group) // ranks
            microbatch = (k // group) * ranks + k % ranks
            assert fwd == Action(chunk * ranks + rank, "F", microbatch)
            assert bwd == Action((chunks - 1 - chunk) * ranks + rank, "B", microbatch)
        warmup = min((ranks - rank - 1) * 2 + (chunks - 1) * ranks, total)
        leading = next((i for i, a in enumerate(order) if a.kind == "B"), len(order))
        assert leading == min(warmup + 1, total)
        # Steady state alternates strictly after the warm-up.
        steady = order[warmup : warmup + 2 * (total - warmup)]
        assert [a.kind for a in steady] == ["F", "B"] * (total - warmup)


# --------------------------------------------------------------------------
# Closed forms (equal stages, no communication)


@pytest.mark.parametrize(
    ("schedule", "ranks", "microbatches", "f", "b"),
    [
        (schedule, *case)
        for schedule in ("gpipe", "1f1b")
        for case in [(4, 8, 1.0, 1.0), (4, 8, 1.0, 2.0), (2, 1, 1.0, 1.0), (8, 3, 0.5, 1.5), (3, 16, 2.0, 1.0)]
        if schedule == "gpipe" or case[1] >= case[0]  # torch's 1F1B needs a micro-batch per rank
    ],
)
def test_gpipe_1f1b_closed_form(schedule: str, ranks: int, microbatches: int, f: float, b: float) -> None:
    stages = uniform(ranks, f, b)
    result = simulate(stages, schedule, microbatches)
    expected = (microbatches + ranks - 1) * (f + b)
    assert result.pipeline_time_s == pytest.approx(expected)
    assert result.step_time_s == pytest.approx(expected)
    assert result.bubble_fraction == pytest.approx((ranks - 1) / (microbatches + ranks - 1))
    assert result.busy_s == pytest.approx([microbatches * (f + b)] * ranks)
    assert result.idle_s == pytest.approx([(ranks - 1) * (f + b)] * ranks)
    assert_valid_timeline(stages, result)


@pytest.mark.parametrize(
    ("ranks", "microbatches", "chunks", "f", "b"),
    [
        (4, 8, 2, 1.0, 1.0),
        (4, 8, 2, 1.0, 2.0),
        (4, 8, 4, 1.0, 1.0),
        (4, 4, 2, 1.0, 1.0),
        (2, 6, 2, 1.0, 3.0),
        (8, 16, 2, 1.0, 2.0),
        (4, 12, 3, 1.0, 2.0),
        (1, 3, 2, 1.0, 1.0),
    ],
)
def test_interleaved_closed_form(ranks: int, microbatches: int, chunks: int, f: float, b: float) -> None:
    stages = uniform(ranks, f, b, chunks)
    result = simulate(stages, "interleaved", microbatches, virtual_stages=chunks)
    bubble_units = (ranks - 1) / chunks
    assert result.pipeline_time_s == pytest.approx(microbatches * (f + b) + bubble_units * (f + b))
    assert result.bubble_fraction == pytest.approx(bubble_units / (microbatches + bubble_units))
    assert_valid_timeline(stages, result)


def test_interleaved_beats_1f1b() -> None:
    plain = simulate(uniform(4, 1.0, 2.0), "1f1b", 8)
    interleaved = simulate(uniform(4, 1.0, 2.0, 2), "interleaved", 8, virtual_stages=2)
    assert interleaved.pipeline_time_s < plain.pipeline_time_s
    assert interleaved.bubble_fraction < plain.bubble_fraction


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("microbatches", [1, 5])
def test_single_rank_has_no_bubble(schedule: str, microbatches: int) -> None:
    chunks = 2 if schedule in ("interleaved", "zbv", "dualpipev") else 1
    microbatches = max(microbatches, 2) if schedule == "dualpipev" else microbatches  # torch's minimum
    result = simulate(uniform(1, 1.5, 2.5, chunks), schedule, microbatches, virtual_stages=chunks)
    assert result.pipeline_time_s == pytest.approx(microbatches * 4.0)
    assert result.bubble_fraction == pytest.approx(0.0)


# --------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize(("ranks", "microbatches"), [(4, 8), (4, 5), (6, 6)])
def test_1f1b_peak_inflight_and_memory(ranks: int, microbatches: int) -> None:
    stages = [
        StageCost(1.0, 2.0, activation_bytes=100 * (s + 1), static_bytes=7_000 + s) for s in range(ranks)
    ]
    result = simulate(stages, "1f1b", microbatches)
    inflight = [min(ranks - r, microbatches) for r in range(ranks)]
    assert result.peak_inflight == tuple(inflight)
    assert result.peak_activation_bytes == tuple(100 * (r + 1) * inflight[r] for r in range(ranks))
    assert result.peak_memory_bytes == tuple(
        7_000 + r + 100 * (r + 1) * inflight[r] for r in range(ranks)
    )


def test_gpipe_holds_every_microbatch() -> None:
    result = simulate(uniform(4, 1.0, 1.0, activation_bytes=10), "gpipe", 8)
    assert result.peak_inflight == (8, 8, 8, 8)
    assert result.peak_activation_bytes == (80, 80, 80, 80)


def test_interleaved_memory_sums_chunks() -> None:
    ranks, microbatches, chunks = 4, 8, 2
    stages = [StageCost(0.5, 0.5, activation_bytes=1 if s < ranks else 1000) for s in range(ranks * chunks)]
    result = simulate(stages, "interleaved", microbatches, virtual_stages=chunks)
    # Megatron warm-up (ranks-r-1)*2 + (chunks-1)*ranks forwards, plus one steady-state forward.
    assert result.peak_inflight == (11, 9, 7, 5)
    # Rank 0 runs chunk 0 for micro-batches 0..3, then chunk 1 for 0..3, then 4..6 on chunk 0
    # before its first backward (of 0 on chunk 1): 7 chunk-0 and 4 chunk-1 micro-batches.
    assert result.peak_activation_bytes[0] == 7 * 1 + 4 * 1000


# --------------------------------------------------------------------------
# Communication


def test_send_adds_to_critical_path() -> None:
    # 1F1B, 2 ranks, 2 micro-batches, f=1, b=2, stage 0 sends in 0.5 s.
    # rank 0: 0F0 [0,1] 0F1 [1,2] 0B0 [5,7] 0B1 [8,10]
    # rank 1: 1F0 [1.5,2.5] 1B0 [2.5,4.5] 1F1 [4.5,5.5] 1B1 [5.5,7.5]
    # 0B0 waits for 1B0's gradient: 4.5 + 0.5; 0B1 for 1B1's: 7.5 + 0.5.
    # The last stage's send_s has no next stage and must be ignored.
    stages = [StageCost(1.0, 2.0, send_s=0.5), StageCost(1.0, 2.0, send_s=99.0)]
    result = simulate(stages, "1f1b", 2)
    spans = {str(e.action): (e.start_s, e.end_s) for e in result.events}
    assert spans == {
        "0F0": (0.0, 1.0),
        "0F1": (1.0, 2.0),
        "0B0": (5.0, 7.0),
        "0B1": (8.0, 10.0),
        "1F0": (1.5, 2.5),
        "1B0": (2.5, 4.5),
        "1F1": (4.5, 5.5),
        "1B1": (5.5, 7.5),
    }
    assert result.pipeline_time_s == 10.0  # 9 without communication, + 2 crossings of 0.5
    assert result.busy_s == (6.0, 6.0)
    assert result.bubble_fraction == pytest.approx(0.4)
    assert simulate([StageCost(1.0, 2.0)] * 2, "1f1b", 2).pipeline_time_s == 9.0


def test_overlapped_forward_is_sent_after_its_pair() -> None:
    """DualPipeV runs a forward and the other chunk's backward as one action and torch sends the
    forward's output only after both ([Note: overlapped pairs] in schedules.py): the receiving
    rank's forward waits for the pair's backward, which the orders alone would not make it do."""
    from partitioner.schedules import overlapped_pairs

    stages = [StageCost(1.0, 2.0, send_s=0.1, backward_weight_s=1.0)] * 4
    orders = schedule_order("dualpipev", 2, 4, 2)
    pairs = overlapped_pairs("dualpipev", 2, 4, 2)
    assert [(str(f), str(b)) for f, b in pairs[1]] == [("2F2", "1B0"), ("1F3", "2B1"), ("2F3", "1B1")]
    paired = simulate_orders(stages, orders, 4, layout="v", overlapped=pairs)
    alone = simulate_orders(stages, orders, 4, layout="v")
    spans = {str(e.action): (e.start_s, e.end_s) for e in paired.events}
    # 2F2's output (stage 2 on rank 1 -> stage 3 on rank 0) leaves when 1B0 ends
    assert spans["3F2"][0] == pytest.approx(max(spans["1B0"][1] + 0.1, spans["3B1"][1]))
    assert spans["3F2"][0] > {str(e.action): e.start_s for e in alone.events}["3F2"]
    assert spans["3F3"][0] == pytest.approx(spans["1B1"][1] + 0.1)
    assert simulate(stages, "dualpipev", 4, virtual_stages=2).step_time_s == pytest.approx(paired.step_time_s)
    assert paired.step_time_s > alone.step_time_s


def test_random_costs_follow_timing_model() -> None:
    rng = random.Random(0)
    cases = [("gpipe", 3, 5, 1), ("1f1b", 5, 7, 1), ("interleaved", 3, 6, 3)]
    for schedule, ranks, microbatches, chunks in cases:
        stages = [
            StageCost(rng.uniform(0.1, 2), rng.uniform(0.1, 3), send_s=rng.uniform(0, 0.5))
            for _ in range(ranks * chunks)
        ]
        result = simulate(stages, schedule, microbatches, virtual_stages=chunks)
        assert_valid_timeline(stages, result)
        assert sum(result.busy_s) == pytest.approx(
            microbatches * sum(c.forward_s + c.backward_s for c in stages)
        )


# --------------------------------------------------------------------------
# Data-parallel reduction


def dp_stages(reduce_last: float) -> list[StageCost]:
    return [StageCost(1.0, 1.0, dp_reduce_s=3.0), StageCost(1.0, 1.0, dp_reduce_s=reduce_last)]


def test_dp_reduction_hand_case() -> None:
    # 1F1B, 2 ranks, 2 micro-batches, f=b=1. rank 1 ends with 1B1 [4,5]; rank 0's 0B1 needs its gradient.
    # Without overlap: rank 1 reduces 1 s after 1B1, and only then sends 1B1's gradient ([Note: a stage's
    # reduction before its last gradient send]): 0B1 [6,7], rank 0 ends 7 + 3 = 10, rank 1 5 + 1 = 6.
    # With overlap: rank 1's reduction starts with 1B1 at 4 and ends with it at 5: 0B1 [5,6]; rank 0's
    # starts with 0B1 at 5, ends 8 (2 s exposed); rank 1's is hidden.
    plain = simulate(dp_stages(1.0), "1f1b", 2, overlap_dp=False)
    assert plain.pipeline_time_s == 7.0
    assert plain.dp_exposed_s == (3.0, 1.0)
    assert plain.step_time_s == 10.0 == plain.pipeline_time_s + 3.0
    overlapped = simulate(dp_stages(1.0), "1f1b", 2, overlap_dp=True)
    assert overlapped.pipeline_time_s == 6.0
    assert overlapped.dp_exposed_s == (2.0, 0.0)
    assert overlapped.step_time_s == 8.0
    assert sum(overlapped.dp_exposed_s) < sum(plain.dp_exposed_s)


def test_a_stages_last_gradient_leaves_after_its_reduction() -> None:
    # Rank 1's reduction (5 s) starts with its last backward 1B1 at 4: 1B1's gradient leaves at 9, not 5,
    # so 0B1 runs [9,10] and rank 0's reduction (3 s, from 9) ends the step at 12. Not held: the earlier
    # backwards (no reduction yet), and a stage without a reduction.
    held = simulate(dp_stages(5.0), "1f1b", 2, overlap_dp=True)
    by_action = {str(e.action): e for e in held.events}
    assert (by_action["1B1"].end_s, by_action["0B1"].start_s) == (5.0, 9.0)
    assert by_action["0B0"].start_s == 3.0
    assert held.step_time_s == 12.0
    free = simulate([StageCost(1.0, 1.0, dp_reduce_s=3.0), StageCost(1.0, 1.0)], "1f1b", 2, overlap_dp=True)
    assert {str(e.action): e.start_s for e in free.events}["0B1"] == 5.0
    # without overlap the reduction follows the backward: the gradient leaves at 5 + 5
    assert {str(e.action): e.start_s for e in simulate(dp_stages(5.0), "1f1b", 2, overlap_dp=False).events}["0B1"] == 10.0
    # a schedule that splits backwards runs no DDP (its replicas average in the optimizer step): nothing held,
    # dualpipev's full backwards included
    for schedule in ("zb", "dualpipev"):
        split = [StageCost(1.0, 1.0, backward_weight_s=0.5, dp_reduce_s=5.0) for _ in range(4)]
        starts = [[e.start_s for e in simulate(costs, schedule, 4, virtual_stages=2).events]
                  for costs in (split, [replace(c, dp_reduce_s=0.0) for c in split])]
        assert starts[0] == starts[1], schedule


def test_dp_reduction_step_time_is_latest_rank() -> None:
    # Rank 1 finishes its backwards first (at 5) and reduces for 5 s; rank 0's last backward waits for that
    # reduction ([10, 11]) and reduces for 3 s after it: the step ends at 14.
    result = simulate(dp_stages(5.0), "1f1b", 2, overlap_dp=False)
    assert result.step_time_s == 14.0
    assert result.pipeline_time_s == 11.0


def test_dp_reduction_sums_a_ranks_chunks() -> None:
    stages = [StageCost(0.5, 0.5, dp_reduce_s=1.0 + s) for s in range(4)]  # 2 ranks x 2 chunks
    result = simulate(stages, "interleaved", 2, virtual_stages=2, overlap_dp=False)
    assert result.dp_exposed_s == (1.0 + 3.0, 2.0 + 4.0)


# --------------------------------------------------------------------------
# Timeline printing


def test_grid_is_exact_when_columns_match_time_units() -> None:
    result = simulate(dp_stages(1.0), "1f1b", 2, overlap_dp=False)
    lines = result.grid(width=10).splitlines()
    assert lines[1] == "rank 0 |FF.B..BRRR|"
    assert lines[2] == "rank 1 |.FBFBR....|"
    assert lines[3].startswith("legend:")
    assert lines[4] == "rank 0: 0F0 0F1 0B0 0B1"
    assert lines[5] == "rank 1: 1F0 1B0 1F1 1B1"


def test_grid_width() -> None:
    result = simulate(uniform(4, 1.0, 1.0, 2), "interleaved", 8, virtual_stages=2)
    rows = [line for line in result.grid(width=40).splitlines() if "|" in line]
    assert len(rows) == 4
    assert all(len(row.split("|")[1]) == 40 for row in rows)
    with pytest.raises(ValueError, match="width"):
        result.grid(width=0)


def test_bottleneck_rank() -> None:
    stages = [StageCost(1.0, 1.0), StageCost(1.0, 3.0), StageCost(1.0, 1.0)]
    assert simulate(stages, "1f1b", 4).bottleneck_rank == 1


# --------------------------------------------------------------------------
# Errors and deadlocks


def test_deadlock_is_reported_with_what_ran() -> None:
    # rank 0 waits in 0B0 for 1B0; rank 1 first wants 1F1, which needs 0F1, queued after 0B0.
    orders = [actions("0F0 0B0 0F1 0B1"), actions("1F1 1F0 1B0 1B1")]
    with pytest.raises(PlanError) as info:
        simulate_orders(uniform(2, 1.0, 1.0), orders, 2)
    message = str(info.value)
    assert "deadlock" in message
    assert "rank 0 stuck at 0B0 (step 1), waiting for 1B0 or 1I0 (rank 1)" in message
    assert "rank 1 stuck at 1F1 (step 0), waiting for 0F1 (rank 0)" in message
    assert "rank 0: 0F0\n" in message
    assert "rank 1: (nothing ran)" in message


def test_backward_before_own_forward_deadlocks() -> None:
    orders = [actions("0F0 0B0"), actions("1B0 1F0")]
    with pytest.raises(PlanError, match="rank 1 stuck at 1B0 .* waiting for 1F0"):
        simulate_orders(uniform(2, 1.0, 1.0), orders, 1)


@pytest.mark.parametrize(
    ("orders", "match"),
    [
        ([actions("0F0 0B0"), actions("1F0")], r"miss actions for 1 \(stage, micro-batch\) pair\(s\), e.g. 1B0 on rank 1"),
        ([actions("0F0 0B0 0F0"), actions("1F0 1B0")], "scheduled twice"),
        ([actions("0F0 0B0 1F0"), actions("1B0")], "stage 1 runs on rank 1, not on rank 0"),
        ([actions("0F0 0B0 0F1"), actions("1F0 1B0")], "micro-batch out of range"),
        ([actions("0F0 0B0 4F0"), actions("1F0 1B0")], "stage out of range"),
        ([actions("0F0 0B0") + [Action(0, "X", 0)], actions("1F0 1B0")], "kind must be 'F', 'B', 'I' or 'W'"),
        ([actions("0F0") + ["0B0"], actions("1F0 1B0")], "expected an Action"),
    ],
)
def test_bad_orders(orders: list[list[Action]], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        simulate_orders(uniform(2, 1.0, 1.0), orders, 1)


def test_unknown_schedule_lists_choices() -> None:
    with pytest.raises(PlanError, match="unknown schedule 'zb-v': choose one of gpipe, 1f1b, interleaved"):
        simulate(uniform(2, 1.0, 1.0), "zb-v", 4)


@pytest.mark.parametrize("microbatches", [0, -3])
def test_microbatches_must_be_positive(microbatches: int) -> None:
    with pytest.raises(PlanError, match="microbatches"):
        simulate(uniform(2, 1.0, 1.0), "1f1b", microbatches)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_virtual_stages_need_interleaved(schedule: str) -> None:
    with pytest.raises(PlanError, match="use schedule 'interleaved' or 'zb' for several stages per rank, or set virtual_stages = 1"):
        simulate(uniform(2, 1.0, 1.0, 2), schedule, 4, virtual_stages=2)


def test_interleaved_needs_microbatches_multiple_of_rounds() -> None:
    # torch's rounds: max(1, 9 // 4) = 2 rounds, and 9 is not a multiple of 2 (10 would be).
    with pytest.raises(PlanError, match=r"rounds .* got 9: use 8 or 12"):
        simulate(uniform(4, 1.0, 1.0, 2), "interleaved", 9, virtual_stages=2)


def test_stage_count_must_match_chunks() -> None:
    with pytest.raises(PlanError, match="multiple of virtual_stages"):
        simulate(uniform(3, 1.0, 1.0), "interleaved", 4, virtual_stages=2)
    with pytest.raises(PlanError, match="multiple of virtual_stages"):
        simulate([], "1f1b", 4)


@pytest.mark.parametrize(
    ("field", "value"),
    [("forward_s", -1.0), ("backward_s", math.nan), ("send_s", math.inf), ("dp_reduce_s", -0.1)],
)
def test_stage_cost_rejects_bad_times(field: str, value: float) -> None:
    kwargs = {"forward_s": 1.0, "backward_s": 1.0, field: value}
    with pytest.raises(PlanError, match=f"StageCost.{field}"):
        StageCost(**kwargs)


@pytest.mark.parametrize(("field", "value"), [("activation_bytes", -1), ("static_bytes", 1.5)])
def test_stage_cost_rejects_bad_bytes(field: str, value: float) -> None:
    with pytest.raises(PlanError, match=f"StageCost.{field}"):
        StageCost(1.0, 1.0, **{field: value})


# --------------------------------------------------------------------------
# Determinism and speed


def test_deterministic() -> None:
    stages = [StageCost(0.1 * (s + 1), 0.2, send_s=0.01) for s in range(8)]
    first = simulate(stages, "interleaved", 8, virtual_stages=2)
    assert simulate(stages, "interleaved", 8, virtual_stages=2) == first


def test_large_schedule_is_exact() -> None:
    # Its speed is benchmarks/simulate_speed.py's figure, not a test's.
    ranks, microbatches, chunks = 64, 512, 4
    gc_was_enabled = gc.isenabled()
    result = simulate(uniform(ranks, 1.0, 2.0, chunks), "interleaved", microbatches, virtual_stages=chunks)
    assert len(result.events) == 2 * ranks * microbatches * chunks
    assert result.pipeline_time_s == pytest.approx(microbatches * 3.0 + (ranks - 1) * 3.0 / chunks)
    assert gc.isenabled() == gc_was_enabled


# --------------------------------------------------------------------------
# Split backward (I and W) and the V layout


def split_costs(n: int, f: float = 1.0, b: float = 2.0, w: float = 1.0, **kw: object) -> list[StageCost]:
    return [StageCost(f, b, backward_weight_s=w, **kw) for _ in range(n)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("ranks", "microbatches"), [(4, 4), (4, 8), (8, 8), (8, 16)])
def test_zero_bubble_halves_the_1f1b_bubble_on_equal_stages(ranks: int, microbatches: int) -> None:
    # F = I = W = 1: 1F1B idles (p-1)(F+B) = 3(p-1) per rank; ZB1P fills most of it with W.
    plain = simulate(split_costs(ranks), "1f1b", microbatches)
    zb = simulate(split_costs(ranks), "zb", microbatches)
    work = microbatches * 3.0
    assert plain.pipeline_time_s == pytest.approx(work + (ranks - 1) * 3.0)
    assert zb.pipeline_time_s - work <= 0.5 * (plain.pipeline_time_s - work)
    assert sum(zb.busy_s) == pytest.approx(sum(plain.busy_s))


def test_activations_are_held_until_the_weight_gradient() -> None:
    one = [StageCost(1.0, 2.0, activation_bytes=10, backward_weight_s=1.0)]
    deferred = simulate_orders(one, [actions("0F0 0F1 0I0 0I1 0W0 0W1")], 2)
    prompt = simulate_orders(one, [actions("0F0 0I0 0W0 0F1 0I1 0W1")], 2)
    assert (deferred.peak_inflight, deferred.peak_activation_bytes) == ((2,), (20,))
    assert (prompt.peak_inflight, prompt.peak_activation_bytes) == ((1,), (10,))
    assert deferred.pipeline_time_s == prompt.pipeline_time_s == pytest.approx(6.0)


def test_the_output_gradients_for_w_are_held_from_the_input_gradient_to_the_weight_gradient() -> None:
    # [Note: zero-bubble memory]: torch's I keeps the gradients W starts from (a linear's output gradient),
    # so deferring W holds them for every micro-batch between its I and its W
    one = [StageCost(1.0, 2.0, activation_bytes=10, backward_weight_s=1.0, weight_grad_bytes=7)]
    deferred = simulate_orders(one, [actions("0F0 0F1 0I0 0I1 0W0 0W1")], 2)
    prompt = simulate_orders(one, [actions("0F0 0I0 0W0 0F1 0I1 0W1")], 2)
    assert deferred.peak_parts[0].activations == 2 * 10 + 2 * 7  # at 0W0: both micro-batches, both I done
    assert prompt.peak_parts[0].activations == 10 + 7
    # a full backward (B) never holds them
    assert simulate_orders(one, [actions("0F0 0F1 0B0 0B1")], 2).peak_parts[0].activations == 2 * 10


def test_input_gradient_unblocks_the_previous_stage_before_the_weight_gradient() -> None:
    costs = split_costs(2, f=1.0, b=4.0, w=3.0)
    result = simulate_orders(costs, [actions("0F0 0I0 0W0"), actions("1F0 1I0 1W0")], 1)
    start = {str(e.action): e.start_s for e in result.events}
    assert start["0I0"] == pytest.approx(1.0 + 1.0 + 1.0)  # 0F0, 1F0, then 1I0 (1 s), not 1I0 + 1W0
    assert result.pipeline_time_s == pytest.approx(3.0 + 4.0)


def test_v_layout_places_stages_and_passes_the_turn_for_free() -> None:
    orders = schedule_order("zbv", 2, 4, 2)
    assert {a.stage for a in orders[0]} == {0, 3} and {a.stage for a in orders[1]} == {1, 2}
    costs = split_costs(2, send_s=100.0) + split_costs(2)
    # One rank holds stages 0 and 1 of a 2-stage V: no transfer anywhere.
    single = simulate(split_costs(2, send_s=100.0), "zbv", 3, virtual_stages=2)
    assert single.pipeline_time_s == pytest.approx(3 * 2 * 3.0)
    assert simulate(costs, "zbv", 4, virtual_stages=2).pipeline_time_s > 100.0  # stage 0 -> 1 crosses ranks


def test_weight_gradient_needs_its_input_gradient_first() -> None:
    with pytest.raises(PlanError, match=r"W without an earlier I .* put 0I0 first"):
        simulate_orders(split_costs(1), [actions("0F0 0W0 0I0")], 1)
    with pytest.raises(PlanError, match=r"miss actions .* e.g. 0W0"):
        simulate_orders(split_costs(1), [actions("0F0 0I0")], 1)


def test_weight_share_cannot_exceed_the_backward() -> None:
    with pytest.raises(PlanError, match="backward_weight_s = 3.0 exceeds backward_s = 2.0"):
        StageCost(1.0, 2.0, backward_weight_s=3.0)


def test_idle_time_is_split_into_transfer_wait_and_bubble() -> None:
    # Two stages, one micro-batch: F0 runs 0..1; its output arrives at stage 1 at 1.5, so
    # stage 1 waits 1.5, of which 0.5 with the activation on the wire. F1 1.5..2.5, B1
    # 2.5..4.5; the gradient arrives at 5.0, so stage 0 waits 4.0 (1..5), 0.5 of it in transit.
    stages = [StageCost(1.0, 2.0, send_s=0.5), StageCost(1.0, 2.0)]
    result = simulate(stages, "gpipe", 1)
    assert result.wait_s == pytest.approx((4.0, 1.5))
    assert result.transfer_wait_s == pytest.approx((0.5, 0.5))
    assert result.step_time_s == pytest.approx(7.0)
    for r in range(2):  # busy + waits reach the end of the rank's last action
        last = max(e.end_s for e in result.events if e.rank == r)
        assert result.busy_s[r] + result.wait_s[r] == pytest.approx(last)


# --- what the search reads without simulating -------------------------------------------------


def _random_stages(rng, k: int) -> list[StageCost]:
    out = []
    for _ in range(k):
        b = rng.uniform(0.1, 2.0)
        out.append(StageCost(
            forward_s=rng.uniform(0.1, 1.0), backward_s=b, backward_weight_s=b * rng.uniform(0.0, 1.0),
            send_s=rng.uniform(0.0, 0.3), dp_reduce_s=rng.uniform(0.0, 2.0), after_s=rng.uniform(0.0, 1.0),
            activation_bytes=rng.randint(0, 1000), static_bytes=5000, fresh_grad_bytes=rng.randint(0, 2000),
            buffer_bytes=rng.randint(0, 100), input_grad_bytes=rng.randint(0, 100),
            backward_workspace_bytes=rng.randint(0, 3000), optimizer_workspace_bytes=rng.randint(0, 3000),
        ))
    return out


def _random_shapes(seed: int, n: int):
    import random

    from partitioner.schedules import REGISTRY, check_schedule

    rng = random.Random(seed)
    shapes = []
    while len(shapes) < n:
        name = rng.choice(sorted(REGISTRY))
        pp, v, m = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3]), rng.choice([1, 2, 4, 6, 8])
        try:
            fixed = check_schedule(name, pp, m, v).virtual_stages
        except PlanError:
            continue
        v = fixed or v
        shapes.append((name, pp, m, v, _random_stages(rng, pp * v), rng.random() < 0.5))
    return shapes


def test_peak_memory_is_the_simulated_peak_without_timing():
    # The per-block recompute search checks memory with peak_memory; it must agree with simulate exactly.
    from partitioner.simulate import peak_memory

    for name, pp, m, v, stages, _ in _random_shapes(1, 60):
        assert peak_memory(stages, name, m, v) == simulate(stages, name, m, v).peak_parts, (name, pp, m, v)


def test_busiest_rank_is_a_lower_bound_of_the_step():
    # The search skips a candidate whose busiest rank already takes longer than the best step (search.py).
    from partitioner.simulate import busiest_rank_s

    for name, pp, m, v, stages, overlap in _random_shapes(2, 60):
        sim = simulate(stages, name, m, v, overlap_dp=overlap)
        assert busiest_rank_s(stages, name, m, pp) <= sim.step_time_s * (1 + 1e-12), (name, pp, m, v)
    # One rank without a reduction waits for nothing: the bound is the step.
    one = [replace(c, dp_reduce_s=0.0, send_s=0.0) for c in _random_stages(random.Random(3), 2)]
    assert busiest_rank_s(one, "interleaved", 4, 1) == pytest.approx(simulate(one, "interleaved", 4, 2).step_time_s)


# --- tied weights' gradient sums ([Note: tied weights' gradient sums] in simulate.py) ---------------


def test_a_tied_weight_is_summed_after_both_owners_reduce_then_each_steps():
    """GPT-2's embedding (stage 0) and head (stage 1): the sum starts when the later owner has
    reduced, ends on both ``seconds`` later, and the optimizer step follows it on each rank."""
    tie = TiedSum("wte.weight", 0.5)
    stages = [StageCost(1.0, 2.0, dp_reduce_s=0.25, tied_sums=(tie,), after_s=0.125),
              StageCost(1.0, 2.0, tied_sums=(tie,), after_s=0.0625)]
    plain = simulate([replace(c, tied_sums=()) for c in stages], "1f1b", 4, overlap_dp=False)
    tied = simulate(stages, "1f1b", 4, overlap_dp=False)
    ends = [max(e.end_s for e in tied.events if e.rank == r) for r in range(2)]
    reduced = [ends[0] + 0.25, ends[1]]
    summed = max(reduced) + 0.5
    assert tied.step_time_s == pytest.approx(max(summed + 0.125, summed + 0.0625))
    assert tied.tied_sum_s == pytest.approx((summed - reduced[0], summed - reduced[1]))
    assert tied.step_time_s > plain.step_time_s and plain.tied_sum_s == ()


def test_a_weight_shared_by_stages_of_one_rank_is_not_summed():
    """Interleaved, stages 0 and 2 on rank 0 share one copy: nothing to all-reduce."""
    tie = TiedSum("w", 1.0)
    stages = [StageCost(1.0, 2.0, tied_sums=(tie,)), StageCost(1.0, 2.0),
              StageCost(1.0, 2.0, tied_sums=(tie,)), StageCost(1.0, 2.0)]
    with_tie = simulate(stages, "interleaved", 4, virtual_stages=2)
    without = simulate([replace(c, tied_sums=()) for c in stages], "interleaved", 4, virtual_stages=2)
    assert with_tie.step_time_s == without.step_time_s and with_tie.tied_sum_s == ()
