"""Event-level simulator for pipeline schedules: it scores a Plan's schedule.

Given per-stage costs (forward, backward, point-to-point send, activation and
static memory, data-parallel gradient reduction), :func:`simulate` replays a
pipeline schedule (any of ``partitioner.schedules.SCHEDULES``: GPipe, 1F1B,
interleaved 1F1B, zero-bubble ZB1P and ZB-V, DualPipeV) action by action and returns the step time, per-rank busy/idle time, the bubble
fraction, peak memory and a printable timeline. It sits after ``solve`` in the
flow (``Plan ─▶ simulate / explain / compare``): the solver and the CLI use it
to compare candidate plans without running them. It is pure Python and
deterministic, and its cost is linear in the number of actions.

Glossary (the words mean only this in this module):

- **stage**: a pipeline stage, possibly a *virtual* one. Stages are numbered
  ``0 .. ranks * virtual_stages - 1`` in model order; activations flow from
  stage ``s`` to ``s + 1`` and gradients back.
- **rank**: a process that runs one or more stages, one action at a time.
  Stage ``s`` runs on rank ``s % ranks`` (the ``loop`` layout: with
  interleaving rank ``r`` holds stages ``r, r + ranks, ...``) or, for the
  V-shaped schedules, on the rank of [Note: stage layouts] in schedules.py;
  each of a rank's stages is one *chunk* of the rank.
- **micro-batch**: one slice of the global batch; the pipeline runs ``M`` of
  them per step.
- **action**: one forward (``F``), backward (``B``), input-gradient backward
  (``I``) or weight-gradient backward (``W``) of one micro-batch on one stage,
  written ``2F0`` (stage 2, forward, micro-batch 0) as in
  ``torch.distributed.pipelining`` (see schedules.py).
- **in flight**: a micro-batch is in flight on a stage from the start of its
  forward to the end of its backward (``B``, or ``W`` when the backward is
  split); its activations are held meanwhile ([Note: zero-bubble memory] in
  schedules.py).

[Note: timing model]
Each rank executes its ordered action list strictly in order, one action at a
time. ``F(s, m)`` starts when the rank is free and ``F(s-1, m)`` has finished
plus ``stages[s-1].send_s`` (or, where ``F(s-1, m)`` runs paired with a backward as one
action, that backward has finished: [Note: overlapped pairs] in schedules.py). ``B(s, m)`` or ``I(s, m)`` needs ``F(s, m)`` done
and ``B(s+1, m)`` or ``I(s+1, m)`` finished plus ``stages[s].grad_send_s`` (its
``send_s`` unless set apart: a stage may send more tensors than gradients come back); the
last stage's backward needs only its own forward. ``W(s, m)`` needs
``I(s, m)``; ``I`` takes ``backward_s - backward_weight_s`` and ``W`` takes
``backward_weight_s``, each plus the stage's ``split_input_s`` / ``split_weight_s``. Adjacent stages on the same rank (the turn of a V)
pass tensors without a transfer. Point-to-point transfers are asynchronous: they
delay the receiver but occupy neither rank's compute, and links are not
modelled as contended. Because the order on every rank is fixed, start times
are a longest-path computation over the dependency DAG, so the simulator
visits each action once (see :func:`simulate_orders`).

[Note: data-parallel reduction]
At the end of the step each rank reduces the gradients of its stages across
data-parallel replicas; it costs the sum of ``dp_reduce_s`` over the rank's
stages. Without overlap it starts when the rank's last backward ends. With
``overlap_dp=True`` it models a bucketed all-reduce that is launched as
gradients become ready during the rank's *last* backward (``B`` or ``W``):
it starts at the start of that backward, but cannot finish before the backward ends (the last
bucket is only ready then). Earlier backwards are not overlapped, because for
most stages the gradients of a parameter keep accumulating until the last
micro-batch. The exposed time is the part that sticks out past the rank's
last backward. ``step_time_s`` is the latest end over ranks.
With ``comm_overlap = c < 1`` (measured by ``autopart calibrate``; [Note:
software overheads] in cost_models/overheads.py) only the fraction ``c`` of
the last backward can run beside the reduction: ``R - c min(R, b)`` of a
reduction ``R`` launched with a backward of ``b`` is exposed. After its
reduction each rank spends its stages' ``after_s`` (the optimizer step and
the per-step overhead) before the step ends on it.

[Note: a stage's reduction before its last gradient send]
A stage wrapped in DDP reduces its gradients in its last backward: torch's
stage runs that backward with DDP's reducer armed, and the reducer's final
callback waits for every bucket's all-reduce before the backward returns;
only then does the schedule send the backward's input gradient to the stage
before. So the gradient of a stage's last backward leaves when its
reduction ends (as [Note: data-parallel reduction] times it), not when its
compute does, and the stage before it waits for it: down a pipeline of
``pp`` stages the reductions' exposed parts add up along the cool-down. Not
held: schedules that split any backward (the runtime wraps no stage in DDP
there: weight gradients come from ``autograd.grad``, which DDP's hooks never
see, and replicas average them in the optimizer step) and FSDP stages (no
``dp_reduce_s``). Measured on 4 CPU ranks (pp2 x dp2): stage 0's
last backward started when stage 1's all-reduce ended, 5 ms after stage 1's
compute (benchmarks/results/2026-12-07-oversubscribed-replay.md).

[Note: tied weights' gradient sums]
A weight that stages on different pipeline ranks read (GPT-2's embedding and LM head) has a
copy on each, and after the reduction the owning ranks all-reduce its gradient ([Note: tied
weights across stages] in runtime/model.py). A stage lists each such weight it holds as a
``TiedSum`` with the all-reduce's seconds. The owners of a weight are the ranks whose stages
list it; the sum starts when the last of them has finished its reduction, and ends on all of
them ``seconds`` later; the sums go in the order of the weights' names, as the runtime runs
them. A rank's share, from the end of its reduction to the end of its last sum (the wait for
the other owners included, as the runtime's clock sees it), is ``SimResult.tied_sum_s``.
Then the optimizer step (``after_s``).

[Note: where idle time goes]
A rank is idle before an action when the action's inputs are not ready yet.
That wait is charged to the action's stage (``SimResult.wait_s``), and the
part of it during which the awaited activation (forward) or gradient
(backward) was on the wire, ``[sent, arrives] ∩ [rank free, action start]``,
is its transfer wait (``transfer_wait_s``); the rest is pipeline bubble:
waiting for compute on another rank. Per rank, busy time plus its stages'
waits is the end of its last action; the exposed reduction and the wait for
the slowest rank then make up the step. The evaluator stores this split in
every plan (``StageComponents``), so that ``explain`` and ``diff`` read it.
A ``W`` waits only for its own stage's ``I`` on the same rank: never a transfer.

[Note: memory over the step]
Each rank's memory is walked through its actions in order (the terms are sized by the
evaluator: [Note: what a step holds] in evaluate.py). Live at any moment: the static bytes
of its stages, less the gradients a stage makes afresh (``fresh_grad_bytes``) until its
first backward has ended; the receive buffers (``buffer_bytes``); the input gradients kept
by every backward so far (``input_grad_bytes``); and ``activation_bytes`` per micro-batch in
flight, added at its forward and released at the end of its ``B`` or ``W``, with
``weight_grad_bytes`` from its ``I`` to the end of its ``W``. A ``B`` or ``I``
adds its stage's ``backward_workspace_bytes`` while it runs. After the last backward the
optimizer step holds every gradient and the largest ``optimizer_workspace_bytes`` of the
rank's stages. The rank's peak is the largest of these moments (``SimResult.peak_parts``
says what was live then).
"""

from __future__ import annotations

import gc
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple

from partitioner.errors import PlanError
from partitioner.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    SCHEDULES,
    Action,
    overlapped_pairs,
    schedule_order,
    spec,
    stage_rank,
)

__all__ = [
    "SCHEDULES",
    "Action",
    "Event",
    "MemoryAtPeak",
    "SimResult",
    "StageCost",
    "TiedSum",
    "busiest_rank_s",
    "core_shares",
    "peak_memory",
    "schedule_order",
    "simulate",
    "simulate_orders",
    "simulate_sharing",
]

_FORWARD = FORWARD
_new_event = tuple.__new__  # Event(...) without the named tuple's Python-level __new__
_BACKWARDS = (FULL_BACKWARD, BACKWARD_WEIGHT)  # the kinds that end a micro-batch's backward on a stage


@dataclass(frozen=True, slots=True)
class TiedSum:
    """A weight this stage shares with a stage of another pipeline rank: the all-reduce of its
    gradient among the owners after the step's reduction ([Note: tied weights' gradient sums])."""

    param: str  # the weight's name in the captured model
    seconds: float  # the all-reduce, priced on the links between the owners

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise PlanError(f"TiedSum({self.param!r}).seconds = {self.seconds!r}: must be finite and >= 0 seconds")


@dataclass(frozen=True, slots=True)
class StageCost:
    """What one micro-batch costs on one stage, and what the stage keeps resident."""

    forward_s: float  # one micro-batch forward on this stage (compute + tensor-parallel collectives)
    backward_s: float  # one micro-batch backward (includes the recomputed forward when recompute is on)
    # p2p time to send this stage's output to the next stage, per micro-batch (ignored on the last stage)
    send_s: float = 0.0
    # activation memory held per in-flight micro-batch (forward done, backward not yet)
    activation_bytes: int = 0
    static_bytes: int = 0  # parameters + gradients + optimizer state resident for this stage
    dp_reduce_s: float = 0.0  # data-parallel gradient reduction for this stage at the end of the step
    # the part of backward_s that computes weight gradients: a separate W action in the
    # schedules that split the backward (zb, zbv, dualpipev); the rest is the I action
    backward_weight_s: float = 0.0
    # Memory over the step beyond static and in-flight activations ([Note: memory over the step]):
    fresh_grad_bytes: int = 0  # of static_bytes, the gradients that exist only from the stage's first backward on
    buffer_bytes: int = 0  # allocated for the whole step (receive buffers for the output's gradient)
    input_grad_bytes: int = 0  # kept after each backward until the step ends (the received input's gradient)
    backward_workspace_bytes: int = 0  # live during one backward (B or I) of this stage only
    optimizer_workspace_bytes: int = 0  # live during the optimizer step only, after every backward
    # per micro-batch from the start of its I to the end of its W: the output gradients W starts from
    # ([Note: zero-bubble memory] in schedules.py)
    weight_grad_bytes: int = 0
    # once per step, after the rank's reduction: this stage's optimizer step and the rank's per-step
    # overhead ([Note: software overheads] in cost_models/overheads.py); 0 unless calibrated
    after_s: float = 0.0
    tied_sums: tuple[TiedSum, ...] = ()  # weights shared with another rank's stage ([Note: tied weights' gradient sums])
    # p2p time of the output's gradient coming back from the next stage; None: the same as send_s
    grad_send_s: float | None = None
    # what splitting its backward costs beyond backward_s, on this stage's I and on its W actions only: for a
    # schedule that splits some backwards and runs others whole (DualPipeV; [Note: software overheads] in
    # cost_models/overheads.py); the schedules that split every one carry it in backward_s
    split_input_s: float = 0.0
    split_weight_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("forward_s", "backward_s", "send_s", "grad_send_s", "dp_reduce_s", "backward_weight_s", "after_s",
                     "split_input_s", "split_weight_s"):
            value = getattr(self, name)
            if name == "grad_send_s" and value is None:
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PlanError(
                    f"StageCost.{name} = {value!r}: times must be finite and >= 0 seconds; "
                    "check the cost model that produced this stage"
                )
        for name in ("activation_bytes", "static_bytes", "fresh_grad_bytes", "buffer_bytes", "input_grad_bytes",
                     "backward_workspace_bytes", "optimizer_workspace_bytes", "weight_grad_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise PlanError(f"StageCost.{name} = {value!r}: must be an integer >= 0 bytes")
        if self.backward_weight_s > self.backward_s:
            raise PlanError(
                f"StageCost.backward_weight_s = {self.backward_weight_s!r} exceeds backward_s = "
                f"{self.backward_s!r}: the weight-gradient part is a share of the backward"
            )
        if self.fresh_grad_bytes > self.static_bytes:
            raise PlanError(
                f"StageCost.fresh_grad_bytes = {self.fresh_grad_bytes} exceeds static_bytes = {self.static_bytes}: "
                "the gradients are part of the static bytes"
            )


@dataclass(frozen=True, slots=True)
class MemoryAtPeak:
    """What is live on one rank at its predicted memory peak, in bytes ([Note: memory over the step])."""

    static: int  # weights, gradients made so far and optimizer state
    activations: int  # held for the micro-batches in flight
    workspace: int  # buffers, kept input gradients, and the running backward's or optimizer step's workspace
    moment: str  # when: the action at the peak ("1B3") or "optimizer step"

    @property
    def total(self) -> int:
        return self.static + self.activations + self.workspace


class Event(NamedTuple):
    """One action as it ran in the simulation.

    A named tuple, not a frozen dataclass: a search simulates steps of 10^5-10^6 actions many
    times over, and building a tuple costs a fraction of a frozen dataclass's ``__init__``.
    """

    rank: int  # rank that executed the action
    action: Action  # what ran
    start_s: float  # start time, seconds from the start of the step
    end_s: float  # end time, seconds from the start of the step


@dataclass(frozen=True, slots=True)
class SimResult:
    """The simulated step: timing, memory and the full event list."""

    step_time_s: float  # makespan including the exposed data-parallel reduction
    pipeline_time_s: float  # makespan of the forward/backward part only
    busy_s: tuple[float, ...]  # per rank compute time
    idle_s: tuple[float, ...]  # per rank pipeline_time - busy
    bubble_fraction: float  # 1 - sum(busy)/(ranks*pipeline_time)
    # per rank: max over time of the activation bytes of micro-batches in flight on its stages
    peak_activation_bytes: tuple[int, ...]
    peak_memory_bytes: tuple[int, ...]  # per rank: the peak of [Note: memory over the step]
    peak_inflight: tuple[int, ...]  # per rank: max number of micro-batches in flight (summed over its stages)
    dp_exposed_s: tuple[float, ...]  # per rank exposed gradient reduction time
    events: tuple[Event, ...]  # every action as it ran, rank-major, each rank in execution order
    # Per stage: how long its rank sat idle before this stage's actions, and the part of
    # that idle time in which the awaited activation or gradient was in transit
    # (see [Note: where idle time goes]).
    wait_s: tuple[float, ...] = ()
    transfer_wait_s: tuple[float, ...] = ()
    # Per rank, what is live at its memory peak ([Note: memory over the step]).
    peak_parts: tuple["MemoryAtPeak", ...] = ()
    # Per rank, the tied weights' gradient sums, waits for the other owners included
    # ([Note: tied weights' gradient sums]); empty when no weight is shared across ranks.
    tied_sum_s: tuple[float, ...] = ()

    @property
    def ranks(self) -> int:
        """Number of ranks simulated."""
        return len(self.busy_s)

    @property
    def bottleneck_rank(self) -> int:
        """The rank with the most compute time (lowest index on ties): the one to lighten first."""
        return max(range(len(self.busy_s)), key=lambda r: (self.busy_s[r], -r))

    def grid(self, width: int = 100) -> str:
        """Text timeline: one row per rank, time scaled into ``width`` columns, then per-rank action lists."""
        by_rank = _events_by_rank(self.events, self.ranks)
        ends = [rank_events[-1].end_s if rank_events else 0.0 for rank_events in by_rank]
        exposed = [(ends[r], ends[r] + self.dp_exposed_s[r]) for r in range(self.ranks)]
        return _render(by_rank, self.step_time_s, width, exposed, max_listed=None)


def simulate(
    stages: Sequence[StageCost],
    schedule: str,
    microbatches: int,
    virtual_stages: int = 1,
    overlap_dp: bool = True,
    comm_overlap: float = 1.0,
) -> SimResult:
    """Simulate one training step of ``schedule`` over ``stages``.

    ``len(stages)`` must be ``ranks * virtual_stages``; ``stages[s]`` runs on
    the rank of the schedule's layout (``s % ranks`` except for the V-shaped
    schedules, see schedules.py). See [Note: timing model] and [Note: data-parallel
    reduction] in the module docstring.
    """
    if not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise PlanError(f"virtual_stages = {virtual_stages!r}: must be an integer >= 1")
    if len(stages) == 0 or len(stages) % virtual_stages != 0:
        raise PlanError(
            f"len(stages) = {len(stages)} is not a positive multiple of virtual_stages = "
            f"{virtual_stages}: give one StageCost per (rank, chunk), i.e. ranks * virtual_stages"
        )
    ranks = len(stages) // virtual_stages
    layout = spec(schedule).layout
    with _gc_paused():
        orders, checked, pairs = _prepared_orders(schedule, ranks, microbatches, virtual_stages, len(stages), layout)
        return _simulate_orders(stages, orders, microbatches, overlap_dp, layout, checked, comm_overlap, pairs)


def busiest_rank_s(stages: Sequence[StageCost], schedule: str, microbatches: int, ranks: int) -> float:
    """A lower bound of ``simulate(...).step_time_s`` without simulating: the most work one rank
    does, its stages' forward and backward for every micro-batch, then its once-per-step work
    (``after_s``). A rank runs one action at a time, so its compute alone ends no earlier, and the
    step ends no earlier than any rank's ([Note: timing model])."""
    layout = spec(schedule).layout
    work = [0.0] * ranks
    for s, c in enumerate(stages):
        work[stage_rank(s, ranks, layout)] += microbatches * (c.forward_s + c.backward_s) + c.after_s
    return max(work)


def peak_memory(
    stages: Sequence[StageCost], schedule: str, microbatches: int, virtual_stages: int = 1
) -> tuple[MemoryAtPeak, ...]:
    """Per rank, what is live at its memory peak: ``simulate(...).peak_parts`` without the timing.

    The memory over the step depends on each rank's order of actions and the stages' costs, never
    on when an action starts ([Note: memory over the step]), so the search's memory checks
    (solver/recompute.py) walk the schedule's orders instead of simulating the step.
    """
    if not isinstance(virtual_stages, int) or virtual_stages < 1 or len(stages) % virtual_stages:
        raise PlanError(f"virtual_stages = {virtual_stages!r}: must divide len(stages) = {len(stages)}")
    costs = _check_stages(stages)
    ranks = len(costs) // virtual_stages
    layout = spec(schedule).layout
    orders, _, _ = _prepared_orders(schedule, ranks, microbatches, virtual_stages, len(costs), layout)
    owner = [stage_rank(s, ranks, layout) for s in range(len(costs))]
    return tuple(
        _memory_walk(costs, [c for s, c in enumerate(costs) if owner[s] == r], orders[r]).peak for r in range(ranks)
    )


# The search simulates many plans of one schedule shape (each mesh, tp and recompute choice of a
# grid point); their orders and the orders' flat keys depend on the shape only, so the last few
# shapes are kept, with the schedule's overlapped pairs. The lists are shared and never modified.
_Prepared = tuple[list[list[Action]], tuple[list[list[int]], bytearray], list[list[tuple[Action, Action]]]]
_PREPARED: dict[tuple[str, int, int, int, int], _Prepared] = {}
_PREPARED_MAX = 8
_PREPARED_LOCK = threading.Lock()


def _prepared_orders(
    schedule: str, ranks: int, microbatches: int, virtual_stages: int, num_stages: int, layout: str
) -> _Prepared:
    key = (schedule, ranks, microbatches, virtual_stages, num_stages)
    with _PREPARED_LOCK:
        hit = _PREPARED.pop(key, None)
    if hit is None:
        orders = schedule_order(schedule, ranks, microbatches, virtual_stages)
        hit = (orders, _check_orders(orders, num_stages, microbatches, layout),
               overlapped_pairs(schedule, ranks, microbatches, virtual_stages))
    with _PREPARED_LOCK:
        _PREPARED[key] = hit  # most recent last
        while len(_PREPARED) > _PREPARED_MAX:
            del _PREPARED[next(iter(_PREPARED))]
    return hit


def simulate_orders(
    stages: Sequence[StageCost],
    orders: Sequence[Sequence[Action]],
    microbatches: int,
    *,
    overlap_dp: bool = True,
    layout: str = "loop",
    overlapped: Sequence[Sequence[tuple[Action, Action]]] = (),
) -> SimResult:
    """Simulate explicit per-rank action orders (``orders[r]`` is rank ``r``'s list).

    Every stage runs, for every micro-batch, ``F`` and either ``B`` or ``I``
    and ``W``, each once, on the rank ``layout`` gives it ([Note: stage
    layouts] in schedules.py). Raises :class:`PlanError` with the timeline of
    what ran if the orders deadlock.

    [Note: linear-time replay] Start times are computed in dependency order
    rather than time order: a rank advances through its list while the
    dependencies of its next action are finished, and otherwise parks on the
    one missing dependency; finishing an action wakes the ranks parked on it.
    Every action is visited once, so the cost is O(actions). Since a rank never
    reorders its list, this equals a time-ordered event simulation.

    ``overlapped[r]`` lists rank ``r``'s (forward, backward) pairs that run as one action, the
    forward's output sent at the backward's end ([Note: overlapped pairs] in schedules.py).
    """
    if layout not in ("loop", "v"):
        raise PlanError(f"layout = {layout!r}: must be 'loop' or 'v'")
    with _gc_paused():
        return _simulate_orders(stages, orders, microbatches, overlap_dp, layout, pairs=overlapped)


def _simulate_orders(
    stages: Sequence[StageCost],
    orders: Sequence[Sequence[Action]],
    microbatches: int,
    overlap_dp: bool,
    layout: str,
    checked: tuple[list[list[int]], bytearray] | None = None,  # _check_orders(orders, ...), when known
    comm_overlap: float = 1.0,
    pairs: Sequence[Sequence[tuple[Action, Action]]] = (),  # overlapped (F, B) per rank
) -> SimResult:
    stage_costs = _check_stages(stages)
    ranks = len(orders)
    num_stages = len(stage_costs)
    # keys[r][i] encodes orders[r][i] as slot * N + stage * M + micro-batch with N = stages * M
    # and slot 0 for F, 1 for B or I (the gradient the previous stage waits for), 2 for W:
    # flat int-indexed lists are far faster than objects or dicts of tuples at 10^5-10^6
    # actions, and comparing a key with N and 2N tells its slot without a division. With this
    # layout F(s-1, m) = key - M, B/I(s+1, m) = key + M, and a B/I or W key less N (or 2N) is
    # the F (or I) of the same stage and micro-batch.
    keys, split = checked if checked is not None else _check_orders(orders, num_stages, microbatches, layout)
    M = microbatches
    N = num_stages * M
    N2 = 2 * N
    last_b = N2 - M  # B/I keys at or above this are on the last stage
    fwd = [c.forward_s for c in stage_costs]
    bwd = [c.backward_s for c in stage_costs]
    wgt = [c.backward_weight_s + c.split_weight_s for c in stage_costs]
    inp = [c.backward_s - c.backward_weight_s + c.split_input_s for c in stage_costs]
    # Sends between stages on the same rank (the turn of a V) are local copies: free.
    owner = [stage_rank(s, ranks, layout) for s in range(num_stages)]
    last = num_stages - 1
    send = [
        c.send_s if s < last and owner[s] != owner[s + 1] else 0.0 for s, c in enumerate(stage_costs)
    ]
    grad_send = [
        (c.send_s if c.grad_send_s is None else c.grad_send_s) if s < last and owner[s] != owner[s + 1] else 0.0
        for s, c in enumerate(stage_costs)
    ]
    # [Note: overlapped pairs] in schedules.py: F key -> its pair's B key, where F's output goes to another rank
    held = {
        f.stage * M + f.microbatch: N + b.stage * M + b.microbatch
        for rank_pairs in pairs for f, b in rank_pairs
        if f.stage < last and owner[f.stage] != owner[f.stage + 1]
    }

    # [Note: a stage's reduction before its last gradient send]: per stage, the key of its last backward in
    # its rank's order where the stage reduces over data-parallel replicas with DDP, else -1 (a schedule
    # that splits any backward runs no DDP: its replicas average gradients in the optimizer step)
    finalizes = [-1] * num_stages
    reduce_s = [c.dp_reduce_s for c in stage_costs]
    if not any(split):
        for rank_keys in keys:
            for k in rank_keys:
                if N <= k < N2:
                    finalizes[(k - N) // M] = k
        for s in range(num_stages):
            if reduce_s[s] <= 0.0:
                finalizes[s] = -1

    waited = [0.0] * num_stages  # [Note: where idle time goes]
    in_transit = [0.0] * num_stages
    start: list[float] = [0.0] * (3 * N)
    end: list[float | None] = [None] * (3 * N)  # None until the action has run
    parked: dict[int, list[int]] = {}  # missing dependency key -> ranks waiting for it
    waiting_on = [-1] * ranks  # key each rank is parked on, -1 when done
    position = [0] * ranks  # index of each rank's next action
    free_at = [0.0] * ranks  # when each rank finishes its latest action

    runnable = list(range(ranks - 1, -1, -1))  # stack: rank 0 is tried first
    while runnable:
        r = runnable.pop()
        rank_keys = keys[r]
        n = len(rank_keys)
        pos = position[r]
        t_free = free_at[r]
        while pos < n:
            key = rank_keys[pos]
            sent = arrives = 0.0  # the awaited transfer: when it left and when it arrives
            if key < N:  # F(s, m): needs F(s-1, m) plus the activation's send
                s = key // M
                if s:
                    dep = key - M
                    sent = end[dep]
                    if sent is None:
                        break
                    if held and dep in held:  # sent with its pair's backward
                        dep = held[dep]
                        sent = end[dep]
                        if sent is None:
                            break
                    ready = arrives = sent + send[s - 1]
                else:
                    ready = 0.0
                duration = fwd[s]
            elif key < N2:  # B or I (s, m): needs F(s, m), and B/I(s+1, m) plus the gradient's send
                dep = key - N
                ready = end[dep]
                if ready is None:
                    break
                s = dep // M
                if key < last_b:
                    dep = key + M
                    sent = end[dep]
                    if sent is None:
                        break
                    if dep == finalizes[s + 1]:  # sent once the next stage's reduction has ended
                        sent = _reduction_end(start[dep], sent, reduce_s[s + 1], overlap_dp, comm_overlap)
                    arrives = sent + grad_send[s]
                    if arrives > ready:
                        ready = arrives
                duration = inp[s] if split[key] else bwd[s]
            else:  # W(s, m): needs I(s, m)
                dep = key - N
                ready = end[dep]
                if ready is None:
                    break
                s = (key - N2) // M
                duration = wgt[s]
            if t_free >= ready:
                ready = t_free
            else:
                waited[s] += ready - t_free
                if arrives > sent:  # idle while the data was on the wire
                    in_transit[s] += max(0.0, min(ready, arrives) - max(t_free, sent))
            start[key] = ready
            t_free = ready + duration
            end[key] = t_free
            pos += 1
            if key in parked:
                runnable.extend(parked.pop(key))
        else:
            dep = -1  # ran to the end of its list
        position[r] = pos
        free_at[r] = t_free
        waiting_on[r] = dep
        if dep >= 0:
            parked.setdefault(dep, []).append(r)

    # Materialize the events once, after timing, from the flat arrays.
    events = [
        [
            _new_event(Event, (r, action, start[key], end[key]))  # ran, so end[key] is not None
            for action, key in zip(orders[r][: position[r]], keys[r])
        ]
        for r in range(ranks)
    ]
    if any(position[r] < len(keys[r]) for r in range(ranks)):
        raise PlanError(_deadlock_message(events, orders, position, waiting_on, microbatches, owner))
    return _summarize(stage_costs, events, overlap_dp, owner, waited, in_transit, comm_overlap)


def _reduction_end(start_s: float, end_s: float, reduce_s: float, overlap_dp: bool, comm_overlap: float) -> float:
    """When a data-parallel reduction of ``reduce_s`` launched with a backward from ``start_s`` to ``end_s``
    ends ([Note: data-parallel reduction]: overlapped, it starts with the backward, but the final bucket
    cannot go out before the backward ends, and only ``comm_overlap`` of the backward runs beside it;
    otherwise it starts at the backward's end)."""
    if not overlap_dp:
        return end_s + reduce_s
    if comm_overlap == 1.0:
        return max(end_s, start_s + reduce_s)
    return end_s + reduce_s - comm_overlap * min(reduce_s, end_s - start_s)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a big, acyclic result.

    A large simulation allocates ~10^6 small objects (actions, events), none
    of them in reference cycles; CPython's generational GC would traverse them
    over and over as they pile up, which cost about a third of the run time
    at 64 ranks x 512 micro-batches x 4 chunks. Reference counting still frees
    everything, and the previous GC state is restored on exit (a nested or
    concurrent caller that found it already paused leaves it alone).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------
# Validation


def _check_stages(stages: Sequence[StageCost]) -> list[StageCost]:
    costs = list(stages)
    if not costs:
        raise PlanError("stages is empty: give one StageCost per pipeline stage")
    for s, cost in enumerate(costs):
        if not isinstance(cost, StageCost):
            raise PlanError(f"stages[{s}] is a {type(cost).__name__}, expected StageCost")
    return costs


_SLOT = {FORWARD: 0, FULL_BACKWARD: 1, BACKWARD_INPUT: 1, BACKWARD_WEIGHT: 2}


def _check_orders(
    orders: Sequence[Sequence[Action]], num_stages: int, microbatches: int, layout: str
) -> tuple[list[list[int]], bytearray]:
    """Validate the orders; return each action's flat key (see _simulate_orders) and, per key, 1 for an I."""
    ranks = len(orders)
    if not isinstance(microbatches, int) or microbatches < 1:
        raise PlanError(f"microbatches = {microbatches!r}: must be an integer >= 1")
    if ranks < 1 or num_stages % ranks != 0 or (layout == "v" and num_stages != 2 * ranks):
        need = "twice len(orders) for the V layout" if layout == "v" else "a positive multiple of len(orders)"
        raise PlanError(f"{num_stages} stages cannot be laid out on {ranks} ranks: len(stages) must be {need}")
    owner = [stage_rank(s, ranks, layout) for s in range(num_stages)]
    n = num_stages * microbatches
    seen = bytearray(3 * n)
    split = bytearray(3 * n)  # 1 at the key of an I
    keys: list[list[int]] = []
    for r, order in enumerate(orders):
        rank_keys: list[int] = []
        keys.append(rank_keys)
        for pos, a in enumerate(order):
            # One cheap combined test per action; the message is only built on failure.
            slot = _SLOT.get(a.kind, -1) if isinstance(a, Action) else -1
            if slot >= 0 and 0 <= a.stage < num_stages and 0 <= a.microbatch < microbatches and owner[a.stage] == r:
                key = slot * n + a.stage * microbatches + a.microbatch
                if not seen[key] and (slot != 2 or split[key - n]):
                    seen[key] = 1
                    if a.kind == BACKWARD_INPUT:
                        split[key] = 1
                    rank_keys.append(key)
                    continue
            raise PlanError(_bad_action_message(a, r, pos, owner, microbatches, seen, split))
    # Complete: F and B/I everywhere, and W exactly where an I ran (split[n:2n] marks the I).
    if seen[: 2 * n].count(0) or seen[2 * n :] != split[n : 2 * n]:
        bad = [i for i in range(n) if (seen[i], seen[n + i], seen[2 * n + i]) != (1, 1, split[n + i])]
        first = bad[0]
        stage, m = divmod(first, microbatches)
        kind = FORWARD if not seen[first] else FULL_BACKWARD if not seen[n + first] else BACKWARD_WEIGHT
        raise PlanError(
            f"orders miss actions for {len(bad)} (stage, micro-batch) pair(s), e.g. {Action(stage, kind, m)} "
            f"on rank {owner[stage]}: every stage must run F and either B or I then W for every micro-batch"
        )
    return keys, split


def _bad_action_message(
    a: object, r: int, pos: int, owner: list[int], microbatches: int, seen: bytearray, split: bytearray
) -> str:
    where = f"orders[{r}][{pos}] = {a!r}"
    num_stages = len(owner)
    if not isinstance(a, Action):
        return f"{where}: expected an Action, e.g. Action.parse('0F0')"
    if a.kind not in _SLOT:
        return f"{where}: kind must be 'F', 'B', 'I' or 'W'"
    if not 0 <= a.stage < num_stages:
        return f"{where}: stage out of range 0..{num_stages - 1}"
    if not 0 <= a.microbatch < microbatches:
        return f"{where}: micro-batch out of range 0..{microbatches - 1}"
    if owner[a.stage] != r:
        return f"{where}: stage {a.stage} runs on rank {owner[a.stage]}, not on rank {r}"
    n = num_stages * microbatches
    key = _SLOT[a.kind] * n + a.stage * microbatches + a.microbatch
    if a.kind == BACKWARD_WEIGHT and not seen[key] and not split[key - n]:
        return f"{where}: W without an earlier I of the same stage and micro-batch; put {a.stage}I{a.microbatch} first"
    return f"{where}: action scheduled twice; each stage runs F and B (or I and W) once per micro-batch"


# --------------------------------------------------------------------------
# Results and printing


@dataclass(frozen=True, slots=True)
class _Walk:
    """What one rank's actions, in its order, add up to ([Note: memory over the step])."""

    busy_s: float  # compute: the sum of the actions' costs
    peak_activation_bytes: int
    peak_inflight: int
    peak: MemoryAtPeak


def _memory_walk(stages: Sequence[StageCost], mine: Sequence[StageCost], actions: Sequence[Action]) -> _Walk:
    """Walk one rank's actions in its order: its busy time and what is live at its memory peak.

    A rank runs its actions one at a time, so its order is chronological: add at forward start,
    release at the end of B or W (an I releases nothing: [Note: zero-bubble memory] in
    schedules.py). Busy time sums the costs rather than end - start, to stay exact. Memory
    ([Note: memory over the step]): the gradients a stage makes afresh are counted from the end of
    its first backward; the workspace of a backward while it runs. None of it depends on when an
    action starts, only on the order, so ``peak_memory`` needs no timing.
    """
    held = count = top_bytes = top_count = 0
    compute = 0.0
    static = sum(c.static_bytes - c.fresh_grad_bytes for c in mine)
    kept = sum(c.buffer_bytes for c in mine)
    made: set[int] = set()
    # The peak so far as plain numbers (static, held, workspace, action index; -1 is the start):
    # a MemoryAtPeak is built for the peak alone, once the walk is done.
    top_total, top_at = static + kept, (static, 0, kept, -1)
    for i, a in enumerate(actions):
        cost = stages[a.stage]
        kind = a.kind
        if kind == _FORWARD:
            compute += cost.forward_s
            held += cost.activation_bytes
            count += 1
            if held > top_bytes:
                top_bytes = held
            if count > top_count:
                top_count = count
            work = kept
        elif kind == BACKWARD_INPUT:
            compute += cost.backward_s - cost.backward_weight_s + cost.split_input_s
            work = kept + cost.backward_workspace_bytes
            kept += cost.input_grad_bytes
            held += cost.weight_grad_bytes
            if held > top_bytes:
                top_bytes = held
        else:
            compute += cost.backward_weight_s + cost.split_weight_s if kind == BACKWARD_WEIGHT else cost.backward_s
            work = kept + (cost.backward_workspace_bytes if kind == FULL_BACKWARD else 0)
            now_static, now_held = static, held  # measured before this backward frees and makes anything
            held -= cost.activation_bytes + (cost.weight_grad_bytes if kind == BACKWARD_WEIGHT else 0)
            count -= 1
            if kind == FULL_BACKWARD:
                kept += cost.input_grad_bytes
            if a.stage not in made:
                made.add(a.stage)
                static += cost.fresh_grad_bytes
            if now_static + now_held + work > top_total:
                top_total, top_at = now_static + now_held + work, (now_static, now_held, work, i)
            continue
        if static + held + work > top_total:
            top_total, top_at = static + held + work, (static, held, work, i)
    top = MemoryAtPeak(top_at[0], top_at[1], top_at[2], str(actions[top_at[3]]) if top_at[3] >= 0 else "start")
    full = sum(c.static_bytes for c in mine)
    opt = MemoryAtPeak(full, held, kept + max((c.optimizer_workspace_bytes for c in mine), default=0), "optimizer step")
    return _Walk(compute, top_bytes, top_count, opt if opt.total > top.total else top)


def _summarize(
    stages: list[StageCost],
    events: list[list[Event]],
    overlap_dp: bool,
    owner: list[int],
    waited: Sequence[float],
    in_transit: Sequence[float],
    comm_overlap: float = 1.0,
) -> SimResult:
    ranks = len(events)
    compute_end = [rank_events[-1].end_s if rank_events else 0.0 for rank_events in events]
    pipeline_time = max(compute_end)
    mine = [[c for s, c in enumerate(stages) if owner[s] == r] for r in range(ranks)]

    dp_exposed: list[float] = []
    reduced: list[float] = []  # per rank, when its reduction ends
    for r in range(ranks):
        reduce_s = sum(c.dp_reduce_s for c in mine[r])
        last_b = next((e for e in reversed(events[r]) if e.action.kind in _BACKWARDS), None)
        if reduce_s == 0.0 or last_b is None:
            exposed = 0.0
        else:  # [Note: data-parallel reduction]: launched with the last backward
            exposed = _reduction_end(last_b.start_s, last_b.end_s, reduce_s, overlap_dp, comm_overlap) - last_b.end_s
        # Exposure is measured from the end of the rank's own compute; if the
        # rank's last action is a forward (custom orders), count from there.
        rank_end = max(compute_end[r], (last_b.end_s if last_b else 0.0) + exposed)
        dp_exposed.append(rank_end - compute_end[r])
        reduced.append(rank_end)
    summed = _tied_sums(stages, owner, reduced)
    step_time = pipeline_time
    for r in range(ranks):
        # the optimizer step and per-step overhead, last
        step_time = max(step_time, summed[r] + sum(c.after_s for c in mine[r]))

    busy: list[float] = []
    peak_act: list[int] = []
    peak_count: list[int] = []
    parts: list[MemoryAtPeak] = []
    for r in range(ranks):
        walk = _memory_walk(stages, mine[r], [e.action for e in events[r]])
        busy.append(walk.busy_s)
        peak_act.append(walk.peak_activation_bytes)
        peak_count.append(walk.peak_inflight)
        parts.append(walk.peak)

    total_busy = sum(busy)
    bubble = 1.0 - total_busy / (ranks * pipeline_time) if pipeline_time > 0 else 0.0
    return SimResult(
        step_time_s=step_time,
        pipeline_time_s=pipeline_time,
        busy_s=tuple(busy),
        idle_s=tuple(pipeline_time - b for b in busy),
        bubble_fraction=bubble,
        peak_activation_bytes=tuple(peak_act),
        peak_memory_bytes=tuple(p.total for p in parts),
        peak_inflight=tuple(peak_count),
        dp_exposed_s=tuple(dp_exposed),
        events=tuple(e for rank_events in events for e in rank_events),
        wait_s=tuple(waited),
        transfer_wait_s=tuple(in_transit),
        peak_parts=tuple(parts),
        tied_sum_s=tuple(s - e for s, e in zip(summed, reduced)) if summed != reduced else (),
    )


def _tied_sums(stages: Sequence[StageCost], owner: Sequence[int], reduced: Sequence[float]) -> list[float]:
    """Each rank's end after the tied weights' gradient sums, from the ends of its reduction
    ([Note: tied weights' gradient sums])."""
    end = list(reduced)
    owners: dict[str, set[int]] = {}
    seconds: dict[str, float] = {}
    for s, c in enumerate(stages):
        for t in c.tied_sums:
            owners.setdefault(t.param, set()).add(owner[s])
            seconds[t.param] = max(seconds.get(t.param, 0.0), t.seconds)
    for name in sorted(owners):
        ranks = owners[name]
        if len(ranks) < 2:  # the stages of one rank share the tensor: nothing to sum
            continue
        done = max(end[r] for r in ranks) + seconds[name]
        for r in ranks:
            end[r] = done
    return end


def core_shares(events: Sequence[Event], ranks: int, oversubscribed: float, idle_use: float = 0.0) -> list[float]:
    """Per rank, its compute's time when the ranks share ``ranks / oversubscribed`` cores, over its time
    when every rank computes at once (the compute slowdown's assumption): the mean, over the rank's actions
    in ``events``, of ``max(1, n(t) / (C - b (ranks - n(t)))) / o`` with ``n(t)`` the ranks computing at
    ``t``, ``o`` ``oversubscribed``, ``C = ranks / o`` the cores a rank's share of the machine holds and
    ``b`` ``idle_use``, the share of a core a waiting rank still uses ([Note: ranks sharing cores] in
    evaluate.py). 1 for a rank that never computes."""
    o = oversubscribed
    cores = ranks / o
    bounds = sorted((t, d, e.rank) for e in events if e.end_s > e.start_s
                    for t, d in ((e.start_s, 1), (e.end_s, -1)))  # at one instant, ends (-1) before starts
    busy, weighted = [0.0] * ranks, [0.0] * ranks
    active: set[int] = set()
    last = 0.0
    for t, d, r in bounds:
        if active and t > last:
            n = len(active)
            free = max(cores - idle_use * (ranks - n), n / o)  # at worst, the share every rank computing gets
            w = max(1.0, n / free) / o
            for a in active:
                busy[a] += t - last
                weighted[a] += (t - last) * w
        last = t
        if d > 0:
            active.add(r)
        else:
            active.discard(r)
    return [weighted[r] / busy[r] if busy[r] > 0 else 1.0 for r in range(ranks)]


SHARING_ROUNDS = 8  # at most, of simulate_sharing's fixed point (2-4 settle it to SHARING_TOLERANCE)
SHARING_TOLERANCE = 1e-3  # a rank's factor that moves less than this between rounds has settled


def simulate_sharing(
    stages: Sequence[StageCost],
    schedule: str,
    microbatches: int,
    virtual_stages: int = 1,
    overlap_dp: bool = True,
    comm_overlap: float = 1.0,
    oversubscribed: float = 1.0,
    idle_use: float = 0.0,
) -> tuple[SimResult, list[StageCost], tuple[float, ...]]:
    """``simulate``, with each pipeline rank's compute scaled to the cores it gets where ``oversubscribed``
    (ranks over cores, > 1) ranks share each core ([Note: ranks sharing cores] in evaluate.py): the stages'
    forward and backward are priced as if every rank computed at once, and a rank computing while others
    wait gets their cores, less the ``idle_use`` of a core that each waiting rank still uses. The fixed
    point of ``core_shares``: simulate, scale each rank's work by its factor, simulate again, until no
    factor moves by ``SHARING_TOLERANCE``. Returns the simulation, the stages so scaled and each rank's
    factor (all 1, and ``simulate``'s result, at a core a rank or with one pipeline rank). Not scaled: the
    data-parallel reduction and ``after_s`` (every rank at once)."""
    sim = simulate(stages, schedule, microbatches, virtual_stages, overlap_dp, comm_overlap)
    ranks = len(stages) // virtual_stages
    shares = [1.0] * ranks
    if oversubscribed <= 1 or ranks == 1:
        return sim, list(stages), tuple(shares)
    layout = spec(schedule).layout
    rank = [stage_rank(s, ranks, layout) for s in range(len(stages))]
    scaled = list(stages)
    for _ in range(SHARING_ROUNDS):
        new = core_shares(sim.events, ranks, oversubscribed, idle_use)
        if max(abs(a - b) for a, b in zip(new, shares)) < SHARING_TOLERANCE:
            break
        shares = new
        scaled = [replace(c, forward_s=c.forward_s * shares[rank[s]], backward_s=c.backward_s * shares[rank[s]],
                          backward_weight_s=c.backward_weight_s * shares[rank[s]],
                          split_input_s=c.split_input_s * shares[rank[s]],
                          split_weight_s=c.split_weight_s * shares[rank[s]]) for s, c in enumerate(stages)]
        sim = simulate(scaled, schedule, microbatches, virtual_stages, overlap_dp, comm_overlap)
    return sim, scaled, tuple(shares)


def _events_by_rank(events: Sequence[Event], ranks: int) -> list[list[Event]]:
    by_rank: list[list[Event]] = [[] for _ in range(ranks)]
    for e in events:
        by_rank[e.rank].append(e)
    return by_rank


_LEGEND = "legend: F forward, B backward, I input-gradient backward, W weight-gradient backward, R exposed data-parallel reduction, . idle"


def _render(
    by_rank: Sequence[Sequence[Event]],
    span: float,
    width: int,
    exposed: Sequence[tuple[float, float]],
    max_listed: int | None,
) -> str:
    """Draw the timeline grid and the per-rank action lists.

    Each column shows what the rank was doing at the column's midpoint, so an
    action shorter than a column may not appear; the action lists below the
    grid are exact.
    """
    if width < 1:
        raise ValueError(f"width = {width}: the grid needs at least 1 column")
    label = len(str(max(len(by_rank) - 1, 0)))
    step = span / width if span > 0 else 0.0
    lines = [f"timeline 0 .. {span:.6g} s, {width} columns of {step:.3g} s"]
    for r, rank_events in enumerate(by_rank):
        cells = []
        i = 0
        dp_start, dp_end = exposed[r]
        for col in range(width):
            t = (col + 0.5) * step
            while i < len(rank_events) and rank_events[i].end_s <= t:
                i += 1
            if step > 0 and i < len(rank_events) and rank_events[i].start_s <= t:
                cells.append(rank_events[i].action.kind)
            elif step > 0 and dp_start <= t < dp_end:
                cells.append("R")
            else:
                cells.append(".")
        lines.append(f"rank {r:>{label}} |{''.join(cells)}|")
    lines.append(_LEGEND)
    for r, rank_events in enumerate(by_rank):
        shown = [str(e.action) for e in rank_events]
        if max_listed is not None and len(shown) > max_listed:
            shown = ["..."] + shown[-max_listed:]
        lines.append(f"rank {r:>{label}}: {' '.join(shown) or '(nothing ran)'}")
    return "\n".join(lines)


def _deadlock_message(
    events: list[list[Event]],
    orders: Sequence[Sequence[Action]],
    position: list[int],
    waiting_on: list[int],
    microbatches: int,
    owner: list[int],
) -> str:
    ranks = len(orders)

    def describe(key: int) -> str:
        slot, idx = divmod(key, len(owner) * microbatches)
        stage, m = divmod(idx, microbatches)
        what = f"{stage}F{m}" if slot == 0 else f"{stage}W{m}" if slot == 2 else f"{stage}B{m} or {stage}I{m}"
        return f"{what} (rank {owner[stage]})"

    stuck = [
        f"  rank {r} stuck at {orders[r][position[r]]} (step {position[r]}), "
        f"waiting for {describe(waiting_on[r])}"
        for r in range(ranks)
        if position[r] < len(orders[r])
    ]
    span = max((rank_events[-1].end_s for rank_events in events if rank_events), default=0.0)
    timeline = _render(events, span, 60, [(0.0, 0.0)] * ranks, max_listed=12)
    return (
        "pipeline schedule deadlocks: no rank can start its next action\n"
        + "\n".join(stuck)
        + "\nreorder the actions so that each one's inputs can be produced first "
        "(F(s-1,m) before F(s,m); F(s,m) and B(s+1,m) before B(s,m); I(s,m) before W(s,m)). What ran:\n"
        + timeline
    )
