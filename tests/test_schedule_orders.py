"""The simulator's per-rank action orders equal the orders torch's schedule objects execute.

For every schedule in the registry (partitioner/schedules.py) and several
(pp, micro-batches, virtual stages), build the real ``torch.distributed.pipelining``
schedule object on torch's fake process group (one process, no real
communication) and read what each rank executes (see ``torch_orders``).
Compare with our orders, then replay ours in the simulator: each must run to
the end without deadlock.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
from torch.distributed.pipelining import PipelineStage
from torch.testing._internal.distributed.fake_pg import FakeStore

from partitioner.errors import PlanError
from partitioner.schedules import (REGISTRY, SCHEDULES, Action, check_schedule, overlapped_pairs, rank_stages,
                                   schedule_order, spec)
from partitioner.simulate import StageCost, simulate_orders

# (pp, microbatches, virtual_stages): at least six per schedule, including the odd corners
# (one rank, fewer micro-batches than ranks, rounds smaller than pp, many chunks).
CASES = {
    "gpipe": [(1, 1, 1), (2, 1, 1), (2, 4, 1), (4, 3, 1), (4, 8, 1), (8, 2, 1), (3, 7, 1)],
    "1f1b": [(1, 3, 1), (2, 2, 1), (2, 5, 1), (4, 4, 1), (4, 8, 1), (3, 7, 1), (8, 8, 1), (8, 12, 1)],
    "interleaved": [(2, 4, 2), (4, 8, 2), (4, 4, 2), (3, 6, 4), (4, 10, 2), (4, 3, 2), (2, 2, 3), (8, 16, 2)],
    "zb": [(2, 4, 1), (4, 8, 1), (4, 8, 2), (4, 4, 2), (3, 6, 3), (4, 10, 2), (8, 16, 2), (4, 3, 2)],
    "zbv": [(1, 1, 2), (2, 1, 2), (2, 4, 2), (4, 8, 2), (4, 3, 2), (3, 6, 2), (8, 16, 2), (4, 7, 2)],
    "dualpipev": [(1, 2, 2), (2, 4, 2), (2, 5, 2), (4, 8, 2), (4, 12, 2), (3, 6, 2), (8, 16, 2), (4, 9, 2)],
}


def test_every_schedule_has_cases() -> None:
    assert set(CASES) == set(SCHEDULES)
    assert all(len(cases) >= 6 for cases in CASES.values())


class RecordingStage(PipelineStage):
    """A real PipelineStage that appends each forward and backward part it runs to ``log``."""

    log: list[Action]

    def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.log.append(Action(self.stage_index, "F", fwd_chunk_id))
        return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):  # type: ignore[no-untyped-def]
        self.log.append(Action(self.stage_index, "B" if full_backward else "I", bwd_chunk_id))
        return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                          last_backward=last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):  # type: ignore[no-untyped-def]
        self.log.append(Action(self.stage_index, "W", bwd_chunk_id))
        return super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)

    def _warmup_backward_result(self, received_result=None):  # type: ignore[no-untyped-def]
        # The fake process group carries no data, so the ranks' vote on static shapes (every
        # stage here is built with its shapes) would read zeros and fall back to exchanging
        # shapes, which cannot work without data. Hand every stage the vote's true result.
        return torch.ones(1, dtype=torch.int32)


def compute_actions(ir: list) -> list[Action]:
    """The forwards and backward parts of one rank's torch schedule IR, in order."""
    out = []
    for a in ir:
        for part in (a.sub_actions or (a,)) if a is not None else ():
            if part.computation_type.value in ("F", "B", "I", "W"):
                out.append(Action.parse(str(part)))
    return out


def build(name: str, pp: int, rank: int, microbatches: int, virtual_stages: int) -> tuple[object, list[Action]]:
    """torch's schedule object for ``rank`` (the process group must be initialized), and its stages' log."""
    sp = spec(name)
    log: list[Action] = []
    stages = []
    for s in rank_stages(rank, pp, virtual_stages, sp.layout):
        stage = RecordingStage(torch.nn.Linear(2, 2), s, pp * virtual_stages, torch.device("cpu"),
                               input_args=(torch.empty(1, 2, requires_grad=s > 0),), output_args=(torch.empty(1, 2),))
        stage.log = log
        stages.append(stage)
    cls = getattr(pipelining, sp.torch_class)
    return cls(stages if sp.multi_stage else stages[0], microbatches, loss_fn=lambda out, y: out.sum()), log


def torch_orders(name: str, pp: int, microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """What torch's schedule object for ``name`` executes on each rank.

    Multi-stage schedules (``_PipelineScheduleRuntime``) execute their
    ``pipeline_order_with_comms[rank]`` literally, and every rank computes all
    ranks' lists, so one object on rank 0 gives them all. The single-stage ones
    (GPipe, 1F1B) execute their hand-written ``_step_microbatches``; their
    ``pipeline_order`` only describes it, and for ``Schedule1F1B`` the
    description is wrong on the last rank (it starts the steady state at
    micro-batch 1). So the last rank, which needs no data from a peer, runs one
    real step on the fake process group and we record what its stage executes;
    the other ranks are read from ``pipeline_order``.
    """
    multi = spec(name).multi_stage
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=pp)
    try:
        schedule, _ = build(name, pp, 0, microbatches, virtual_stages)
        ir = schedule.pipeline_order_with_comms if multi else schedule.pipeline_order
        orders = [compute_actions(ir[r]) for r in range(pp)]
    finally:
        dist.destroy_process_group()
    if not multi:
        dist.init_process_group("fake", store=FakeStore(), rank=pp - 1, world_size=pp)
        try:
            schedule, log = build(name, pp, pp - 1, microbatches, virtual_stages)
            x = torch.randn(microbatches, 2)
            schedule.step(*([x] if pp == 1 else []), target=x)
            orders[pp - 1] = log
        finally:
            dist.destroy_process_group()
    return orders


@pytest.mark.parametrize(
    ("name", "pp", "microbatches", "virtual_stages"),
    [(name, *case) for name, cases in CASES.items() for case in cases],
)
def test_order_equals_torch(name: str, pp: int, microbatches: int, virtual_stages: int) -> None:
    ours = schedule_order(name, pp, microbatches, virtual_stages)
    theirs = torch_orders(name, pp, microbatches, virtual_stages)
    for r in range(pp):
        assert ours[r] == theirs[r], f"{name} pp={pp} M={microbatches} v={virtual_stages}: rank {r} differs"
    # Every order the simulator knows also replays to the end (no deadlock), with split backwards timed.
    costs = [StageCost(1.0, 2.0, send_s=0.1, activation_bytes=1, backward_weight_s=1.0)] * (pp * virtual_stages)
    result = simulate_orders(costs, ours, microbatches, layout=REGISTRY[name].layout)
    assert sum(result.busy_s) == pytest.approx(3.0 * pp * virtual_stages * microbatches)


@pytest.mark.parametrize(
    ("name", "pp", "microbatches", "virtual_stages"),
    [(name, *case) for name, cases in CASES.items() for case in cases if REGISTRY[name].multi_stage],
)
def test_overlapped_pairs_are_torchs(name: str, pp: int, microbatches: int, virtual_stages: int) -> None:
    """The pairs the simulator sends late ([Note: overlapped pairs]) are torch's OVERLAP_F_B actions, and in
    torch's list of what each rank runs, the pair's forward is sent after the whole pair."""
    ours = overlapped_pairs(name, pp, microbatches, virtual_stages)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=pp)
    try:
        schedule, _ = build(name, pp, 0, microbatches, virtual_stages)
        ir = schedule.pipeline_order_with_comms
    finally:
        dist.destroy_process_group()
    checked = 0
    for r in range(pp):
        theirs, sends = [], []
        for i, a in enumerate(ir[r]):
            if a is not None and a.sub_actions:
                f, b = (Action.parse(str(x)) for x in a.sub_actions)
                theirs.append((f, b))
                sends.append((i, f))
        assert ours[r] == theirs, f"{name} pp={pp} M={microbatches}: rank {r}"
        for i, f in sends:  # the forward's SEND_F, where it has one (another rank's stage next), follows the pair
            send = [j for j, a in enumerate(ir[r]) if a is not None and str(a) == f"{f.stage}SEND_F{f.microbatch}"]
            assert all(j > i for j in send), (name, pp, microbatches, r, f)
            checked += len(send)
    if name == "dualpipev" and pp > 1:
        assert checked > 0  # every DualPipeV of two ranks or more sends some paired forward to another rank


@pytest.mark.parametrize("name", SCHEDULES)
def test_registry_rules_are_torchs(name: str) -> None:
    """check_schedule (which the planner, the plan and the runtime all use) accepts exactly what torch's
    class accepts, fewer micro-batches than ranks included; its refusal is one line naming the fix."""
    sp = spec(name)
    for pp in (2, 3, 4):
        for microbatches in (1, 2, 3, 4, 5, 6, 8):
            for virtual_stages in ([sp.virtual_stages] if sp.virtual_stages else [1, 2]):
                try:
                    check_schedule(name, pp, microbatches, virtual_stages)
                    ours = None
                except PlanError as exc:
                    ours = str(exc)
                    assert "\n" not in ours and "use " in ours, ours
                dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=pp)
                try:
                    build(name, pp, 0, microbatches, virtual_stages)
                    theirs = None
                except ValueError as exc:
                    theirs = str(exc)
                finally:
                    dist.destroy_process_group()
                case = f"{name} pp={pp} M={microbatches} v={virtual_stages}"
                assert (ours is None) == (theirs is None), f"{case}: ours {ours!r}, torch {theirs!r}"


def test_recompute_under_a_split_backward_is_refused_and_never_planned():
    """torch cannot split the backward of a checkpointed stage: a plan that asks is refused in one
    line, and the planners never produce one (they keep such stages on a whole-backward schedule)."""
    from partitioner import Cluster, plan_parallelism
    from partitioner.errors import PlanError
    from partitioner.schedules import check_recompute
    from partitioner.zoo import load_model

    with pytest.raises(PlanError, match="splits the backward.*--no-recompute"):
        check_recompute("zbv", True)
    check_recompute("1f1b", True)
    check_recompute("zb", False)
    lm = load_model("gpt2-tiny", device="meta")
    cluster = Cluster.preset("dgx-a100-80g", nodes=1)
    with pytest.raises(PlanError, match="splits the backward"):
        plan_parallelism(lm.model, lm.example_inputs, cluster, global_batch=16, pp=4, microbatches=4,
                         method="ilp", time_limit_s=2, schedule="zb", recompute=True)
    for method in ("ilp", "expert"):
        plan = plan_parallelism(lm.model, lm.example_inputs, cluster, global_batch=16, pp=4, microbatches=4,
                                method=method, time_limit_s=2, recompute=True).plan
        assert all(st.recompute for st in plan.stages)
        assert plan.schedule.name in ("gpipe", "1f1b", "interleaved"), plan.schedule
