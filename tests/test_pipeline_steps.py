"""benchmarks/pipeline_steps.py: its replay is the simulator's timing model, and its gaps are split by input."""

from __future__ import annotations

import pytest

from benchmarks.pipeline_steps import GAP_KINDS, gap_split, replay
from partitioner.simulate import StageCost, simulate


def test_replay_of_a_hand_checked_pipeline() -> None:
    # gpipe, 2 ranks, 1 micro-batch: 0F0 (1.0) -> send 0.5 -> 1F0 (2.0) -> 1B0 (3.0) -> send 0.5 -> 0B0 (1.5),
    # each action 0.1 more for the runtime's own work.
    orders = [[(0, "F", 0), (0, "B", 0)], [(1, "F", 0), (1, "B", 0)]]
    dur = {(0, "F", 0): 1.0, (1, "F", 0): 2.0, (1, "B", 0): 3.0, (0, "B", 0): 1.5}
    assert replay(orders, dur.__getitem__, 0.1, [0.5, 0.0], 2, 1) == pytest.approx(1.1 + 0.5 + 2.1 + 3.1 + 0.5 + 1.6)


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_replay_with_the_stage_costs_ends_where_the_simulator_does(schedule: str, virtual: int) -> None:
    pp, m, before = 2, 4, 0.05
    costs = [StageCost(forward_s=1.0 + 0.3 * s, backward_s=2.0 - 0.2 * s, send_s=0.4 + 0.1 * s) for s in range(pp * virtual)]
    sim = simulate(costs, schedule, m, virtual)
    orders = [[(e.action.stage, e.action.kind, e.action.microbatch) for e in sim.events if e.rank == r] for r in range(pp)]

    def dur(a: tuple[int, str, int]) -> float:  # the simulator's action costs hold the per-action work
        c = costs[a[0]]
        return (c.forward_s if a[1] == "F" else c.backward_s) - before

    assert replay(orders, dur, before, [c.send_s for c in costs], pp, len(costs) - 1) == pytest.approx(sim.pipeline_time_s)


def test_replay_refuses_orders_that_deadlock() -> None:
    with pytest.raises(ValueError, match="deadlock"):
        replay([[(0, "B", 0), (0, "F", 0)], [(1, "F", 0), (1, "B", 0)]], lambda a: 1.0, 0.0, [0.0, 0.0], 2, 1)


def test_gaps_are_split_by_where_the_input_came_from() -> None:
    def ev(rank: int, action: str, start: float, end: float) -> dict:
        return dict(rank=rank, stage=int(action[0]), kind=action[1], microbatch=int(action[2]), start_s=start, end_s=end)

    # Interleaved on 2 ranks: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    events = [ev(0, "0F0", 0.0, 1.0), ev(0, "0F1", 1.2, 3.2), ev(0, "2F0", 3.6, 4.0), ev(0, "2F1", 4.3, 5.0),
              ev(1, "1F0", 1.5, 2.0), ev(1, "1F1", 3.5, 4.0)]
    gaps = gap_split(events, 2, 3)
    assert gaps[GAP_KINDS[0]] == pytest.approx([0.2])  # 0F1: its input is the rank's own
    assert gaps[GAP_KINDS[1]] == pytest.approx([0.4])  # 2F0: 1F0 ended at 2.0, over 1 ms before rank 0 was free at 3.2
    # 2F1: 1F1 ended as rank 0 was free, at 4.0; 1F1: 0F1 ended at 3.2, after rank 1 was free at 2.0
    assert gaps[GAP_KINDS[2]] == pytest.approx([0.3, 0.3])


def test_the_rendezvous_rule_makes_a_receive_of_an_input_sent_long_before_pay() -> None:
    # GPipe on 2 ranks, 2 micro-batches, a send of 0.5 of which the receive's share is 0.25. 1F1's input
    # (0F1, ended at 2.0) arrives at 2.5, before rank 1 is free at 4.5. Today 1F1 starts at 4.5; with the
    # rule it pays the receive's 0.25 after rank 1 is free: 4.75.
    orders = [[(0, "F", 0), (0, "F", 1), (0, "B", 0), (0, "B", 1)], [(1, "F", 0), (1, "F", 1), (1, "B", 0), (1, "B", 1)]]
    dur = {(0, "F", 0): 1.0, (0, "F", 1): 1.0, (1, "F", 0): 3.0, (1, "F", 1): 3.0,
           (1, "B", 0): 1.0, (1, "B", 1): 1.0, (0, "B", 0): 1.0, (0, "B", 1): 1.0}
    today = replay(orders, dur.__getitem__, 0.0, [0.5, 0.0], 2, 1)
    # rank 1: 1F0 1.5-4.5, 1F1 4.5-7.5, 1B0 7.5-8.5, 1B1 8.5-9.5; rank 0: 0B0 at 9.0-10.0, 0B1 at 10.0-11.0
    assert today == pytest.approx(11.0)
    # with the rule: 1F0 starts at 1.0 + 0.25 + 0.25 = 1.5 (late: no change), 1F1 at 4.5 + 0.25 = 4.75 - 7.75,
    # 1B0 7.75-8.75, 1B1 8.75-9.75; 0B0: max(2.0, 8.75 + 0.25) + 0.25 = 9.25-10.25, 0B1: max(10.25, 9.75 + 0.25)
    # + 0.25 = 10.5-11.5
    assert replay(orders, dur.__getitem__, 0.0, [0.5, 0.0], 2, 1, receive_s=0.25) == pytest.approx(11.5)
