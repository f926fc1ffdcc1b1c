"""The registry of pipeline schedules: their names, layouts, rules and per-rank action orders.

One table that the plan (which names it accepts), the simulator (which
order of actions it replays), the solver's search (which schedules it tries)
and the runtime (which ``torch.distributed.pipelining`` class it builds)
all read, so that adding a schedule touches one place. The orders are those
torch's schedule objects execute (their ``pipeline_order`` without idle steps
and bookkeeping actions); ``tests/test_schedule_orders.py`` checks that
against torch for every schedule here.

Glossary (as in simulate.py): a **stage** is a pipeline stage, possibly a
virtual one, numbered ``0 .. ranks * virtual_stages - 1`` in model order; a
**rank** is a pipeline rank running one action at a time; a **micro-batch**
is one slice of the global batch; an **action** is one of

- ``F``: forward of one micro-batch on one stage;
- ``B``: its full backward (input and weight gradients together);
- ``I``: the input-gradient half of the backward, which the previous stage
  waits for;
- ``W``: the weight-gradient half, which nothing waits for, so zero-bubble
  schedules use it to fill the pipeline's bubbles.

A stage runs, for each micro-batch, ``F`` and either ``B`` or ``I`` then ``W``.

[Note: stage layouts]
``loop``: stage ``s`` runs on rank ``s % ranks`` (Megatron-LM's interleaving;
one stage per rank when ``virtual_stages == 1``). ``v``: two stages per rank
folded into a V, rank ``r`` holding stages ``r`` and ``2 * ranks - 1 - r``,
so the first and the last stage share rank 0 and the turn of the V
(stages ``ranks - 1`` and ``ranks``) needs no transfer. These are torch's
``generate_stage_to_rank_mapping`` styles ``loop`` and ``v``.

[Note: zero-bubble memory]
Splitting the backward does not free activations early: ``W`` needs the
stage's saved inputs to its weight multiplications and the output gradients
``I`` computed, so a micro-batch's activations stay held until its ``W``
ends. The simulator counts them as held from the start of ``F`` to the end
of ``B`` or ``W``; that is the memory zero-bubble schedules pay for the
bubble they remove (``W`` is deferred, so more micro-batches are held).
Those output gradients are held too, from ``I`` to ``W``
(``StageCost.weight_grad_bytes``): torch's ``stage_backward_input`` keeps,
for each parameter, the gradient flowing into the op where the parameter
meets the stage's input (a linear's output gradient, the logits' for the
head), and ``stage_backward_weight`` starts from them. Torch's first stage
runs its whole backward at ``W`` and keeps none; its last stage detaches
its output at ``I``, so there the term is those gradients less the output.
(GPT-2's 50,257-row head alone on the last of two ranks under ``zb``: the
head's output gradient is the logits' size, and the term is zero.) The
storage meter once read 98 MiB of activations there, 8 micro-batches'
log-softmax outputs: its own saved-tensor hook had kept them alive
([Note: the meter's saved-tensor hook] in measure.py).

[Note: overlapped pairs]
DualPipeV pairs a forward of one chunk with a full backward of the other as
one ``OVERLAP_F_B`` action. torch's ``_PipelineScheduleRuntime`` runs the two
parts one after the other, and ``_add_send_recv`` puts the sends of both after
the compound action: the forward's activation leaves only when the backward
ends, so the next stage's rank gets it a backward later than a lone forward
would send it. ``ScheduleSpec.overlaps`` names the pairs and the simulator
sends such a forward's output at its pair's end ([Note: timing model] in
simulate.py). Seen in a run (2 CPU ranks, the hetero-lm funnel's dualpipev
plan, events of ``autopart run --json``): rank 1's forward ``2F2`` ended at
22.3 ms, its pair's backward ``1B0`` at 31.3 ms, and rank 0, free from 28.7 ms,
started ``3F2`` at 31.6 ms; likewise ``2F3`` 40.9 ms, ``1B1`` 48.6 ms, ``3F3``
48.9 ms.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PlanError

__all__ = [
    "SCHEDULES",
    "REGISTRY",
    "Action",
    "ScheduleSpec",
    "check_recompute",
    "check_schedule",
    "overlapped_pairs",
    "rank_stages",
    "schedule_order",
    "spec",
    "stage_rank",
]

FORWARD, FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT = "F", "B", "I", "W"
KINDS = (FORWARD, FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)
_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBIW])\s*(\d+)\s*$")


@dataclass(frozen=True, slots=True, repr=False)
class Action:
    """One forward or backward part of one micro-batch on one stage; prints as ``2F0``."""

    stage: int  # pipeline stage (virtual stage index with several stages per rank)
    kind: str  # "F", "B", "I" or "W" (see the module glossary)
    microbatch: int  # micro-batch index, 0-based

    # No __post_init__ on purpose: the simulator creates hundreds of thousands
    # of these, and simulate_orders() validates every action it is given.

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    # Compact repr, like torch's _Action, so lists of actions stay readable.
    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse ``"2F0"`` back into ``Action(2, "F", 0)``."""
        match = _ACTION_RE.match(text)
        if match is None:
            raise PlanError(
                f"cannot parse action {text!r}: expected <stage><F|B|I|W><microbatch>, e.g. '2F0'"
            )
        return cls(int(match.group(1)), match.group(2), int(match.group(3)))


Order = Callable[[int, int, int], list[list[Action]]]  # (ranks, microbatches, virtual_stages) -> per-rank orders


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What autopart knows about one schedule."""

    name: str  # the plan's schedule.name
    torch_class: str  # class in torch.distributed.pipelining that runs it
    layout: str  # "loop" or "v" (see [Note: stage layouts])
    virtual_stages: int | None  # stages per rank it requires; None: any >= 1
    multi_stage: bool  # torch class takes a list of stages (PipelineScheduleMulti) rather than one stage
    splits_backward: bool  # runs I and W actions (zero-bubble); see [Note: zero-bubble memory]
    min_microbatches_per_rank: int  # torch refuses fewer than this x ranks micro-batches (0: no minimum)
    rounds: bool  # micro-batches must be a multiple of torch's rounds, max(1, M // ranks)
    order: Order  # the per-rank action orders torch executes
    summary: str  # one line for --help and docs
    # every backward past the first stage runs as I then W (zb, zbv); False: DualPipeV, whose steady state
    # runs whole backwards beside forwards and splits only a few ([Note: software overheads] in
    # cost_models/overheads.py prices the split in the stage's backward where it is the rule, on the split
    # actions alone otherwise)
    split_throughout: bool = False
    # (forward, backward) pairs that torch runs as one OVERLAP_F_B action: the forward's output is sent
    # only after the backward ([Note: overlapped pairs]); None: the schedule has none
    overlaps: Callable[[int, int, int], list[list[tuple[Action, Action]]]] | None = None


def stage_rank(stage: int, ranks: int, layout: str = "loop") -> int:
    """The pipeline rank that runs ``stage`` (see [Note: stage layouts])."""
    if layout == "v":
        return stage if stage < ranks else 2 * ranks - 1 - stage
    return stage % ranks


def rank_stages(rank: int, ranks: int, virtual_stages: int, layout: str = "loop") -> tuple[int, ...]:
    """The stages that ``rank`` runs, in model order."""
    return tuple(s for s in range(ranks * virtual_stages) if stage_rank(s, ranks, layout) == rank)


def spec(name: str) -> ScheduleSpec:
    """The registry entry of ``name``; a clear error for unknown names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise PlanError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}") from None


def check_schedule(name: str, ranks: int, microbatches: int, virtual_stages: int) -> ScheduleSpec:
    """Refuse a (schedule, ranks, micro-batches, virtual stages) that torch would refuse; return its spec."""
    sp = spec(name)
    for what, value in (("ranks", ranks), ("microbatches", microbatches), ("virtual_stages", virtual_stages)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(f"{what} = {value!r}: must be an integer >= 1")
    if sp.virtual_stages is not None and virtual_stages != sp.virtual_stages:
        if sp.virtual_stages == 1:
            fix = "use schedule 'interleaved' or 'zb' for several stages per rank, or set virtual_stages = 1"
        else:
            fix = f"set virtual_stages = {sp.virtual_stages}"
        raise PlanError(
            f"schedule {name!r} runs {sp.virtual_stages} stage(s) per rank but virtual_stages = {virtual_stages}: {fix}"
        )
    need = sp.min_microbatches_per_rank * ranks
    if microbatches < need:
        raise PlanError(
            f"schedule {name!r} needs at least {need} micro-batches on {ranks} pipeline ranks "
            f"(torch's {sp.torch_class} refuses fewer), got microbatches = {microbatches}: use {need} or more"
        )
    if sp.rounds:  # torch checks it for one stage per rank too
        rounds = max(1, microbatches // ranks)
        if microbatches % rounds:
            lower = microbatches // ranks * ranks
            raise PlanError(
                f"schedule {name!r} needs microbatches to be a multiple of its number of rounds "
                f"(max(1, microbatches // ranks) = {rounds} on {ranks} ranks), got {microbatches}: "
                f"use {lower} or {lower + ranks}"
            )
    return sp


def schedule_order(schedule: str, ranks: int, microbatches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Per-rank ordered action lists of a named schedule: ``orders[r]`` is what rank ``r`` runs, in order."""
    sp = check_schedule(schedule, ranks, microbatches, virtual_stages)
    return sp.order(ranks, microbatches, virtual_stages)


def overlapped_pairs(schedule: str, ranks: int, microbatches: int, virtual_stages: int = 1) -> list[list[tuple[Action, Action]]]:
    """Per rank, the (forward, backward) pairs of its order that torch runs as one action, whose
    forward's output leaves only after the backward ([Note: overlapped pairs]); empty lists for a
    schedule without such pairs."""
    sp = check_schedule(schedule, ranks, microbatches, virtual_stages)
    if sp.overlaps is None:
        return [[] for _ in range(ranks)]
    return sp.overlaps(ranks, microbatches, virtual_stages)


# --------------------------------------------------------------------------
# The orders. Each mirrors the torch class named in its registry entry.


def _gpipe(ranks: int, microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """All forwards ``m = 0 .. M-1``, then all backwards in the same order (``ScheduleGPipe``)."""
    return [
        [Action(r, FORWARD, m) for m in range(microbatches)] + [Action(r, FULL_BACKWARD, m) for m in range(microbatches)]
        for r in range(ranks)
    ]


def _one_f_one_b(ranks: int, microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """``Schedule1F1B``: rank ``r`` runs ``min(ranks - r - 1, M)`` warm-up forwards, then a forward and a
    backward in turn, then the remaining backwards (PipeDream-Flush). The warm-up fills the pipeline just
    deep enough for the last stage's first backward, capping the micro-batches in flight at ``ranks - r``.

    torch's ``Schedule1F1B`` refuses fewer micro-batches than ranks, so its registry entry asks for
    at least one per rank and ``check_schedule`` (which the planner, the plan and the runtime all
    call) refuses such a plan."""
    out = []
    for r in range(ranks):
        warmup = min(ranks - r - 1, microbatches)
        forwards = [Action(r, FORWARD, m) for m in range(microbatches)]
        backwards = [Action(r, FULL_BACKWARD, m) for m in range(microbatches)]
        steady = microbatches - warmup
        pairs = [a for f, b in zip(forwards[warmup:], backwards[:steady]) for a in (f, b)]
        out.append(forwards[:warmup] + pairs + backwards[steady:])
    return out


def _interleaved(ranks: int, microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """``ScheduleInterleaved1F1B`` (Megatron-LM's interleaved 1F1B, Narayanan et al. 2021).

    Micro-batches go in rounds of ``max(1, M // ranks)``, each of ``M // rounds``
    micro-batches: the rank runs a round's forwards on chunk 0, then on chunk 1,
    and so on, and its backwards on the chunks in reverse. Rank ``r`` warms up
    with ``(v - 1) * per_round + 2 * (ranks - r - 1)`` forwards (capped at
    ``M * v``), then alternates a forward and a backward, then drains.
    With one stage per rank it is plain 1F1B (``_one_f_one_b``).
    """
    if virtual_stages == 1:
        return _one_f_one_b(ranks, microbatches, 1)
    return [_rounds_order(r, ranks, microbatches, virtual_stages, zero_bubble=False) for r in range(ranks)]


def _zero_bubble(ranks: int, microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """``ScheduleInterleavedZeroBubble`` (ZB1P of Qi et al. 2024, arXiv:2401.10241).

    The interleaved rounds of ``_interleaved`` with the backward split: rank
    ``r`` warms up one forward per hop from the last rank (not two), runs ``I``
    instead of ``B`` in the steady state, and from its ``r``-th steady step on
    follows each ``I`` with the oldest pending ``W``; the rest of the ``W``
    drain at the end.
    """
    return [_rounds_order(r, ranks, microbatches, virtual_stages, zero_bubble=True) for r in range(ranks)]


def _rounds_order(rank: int, ranks: int, microbatches: int, chunks: int, zero_bubble: bool) -> list[Action]:
    """torch's ``_get_1f1b_rank_ops`` for one rank of the interleaved and zero-bubble schedules.

    Step ``k`` of the forwards visits chunk ``(k // per_round) % chunks`` and,
    since each chunk is visited in blocks of ``per_round`` steps, micro-batch
    ``(k // (per_round * chunks)) * per_round + k % per_round`` there; the
    backwards do the same with the chunks reversed. torch's counters per stage
    give the same micro-batches; this form builds the lists without them.
    """
    per_round = microbatches // max(1, microbatches // ranks)
    total = microbatches * chunks
    warmup = min((chunks - 1) * per_round + (1 if zero_bubble else 2) * (ranks - 1 - rank), total)
    block = per_round * chunks
    forwards = [
        Action((k // per_round) % chunks * ranks + rank, FORWARD, k // block * per_round + k % per_round)
        for k in range(total)
    ]
    backwards = [
        Action((chunks - 1 - (k // per_round) % chunks) * ranks + rank, BACKWARD_INPUT if zero_bubble else FULL_BACKWARD,
               k // block * per_round + k % per_round)
        for k in range(total)
    ]
    steady = total - warmup
    if not zero_bubble:
        pairs: list[Action] = [None] * (2 * steady)  # type: ignore[list-item]  # filled by the slices below
        pairs[0::2] = forwards[warmup:]
        pairs[1::2] = backwards[:steady]
        return forwards[:warmup] + pairs + backwards[steady:]
    # ZB1P: from backward number ``rank`` on, each I is followed by the oldest pending W.
    weights = [Action(a.stage, BACKWARD_WEIGHT, a.microbatch) for a in backwards]
    ops = forwards[:warmup]
    for j in range(total):
        if j < steady:
            ops.append(forwards[warmup + j])
        ops.append(backwards[j])
        if j >= rank:
            ops.append(weights[j - rank])
    ops += weights[max(0, total - rank):]
    return ops


def _zbv(ranks: int, microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """``ScheduleZBVZeroBubble`` (ZB-V of Qi et al. 2024, section 6): two stages per rank in a V.

    Rank ``r`` holds chunk 0 (stage ``r``) and chunk 1 (stage ``2 ranks - 1 - r``).
    Warm-up: ``2 (ranks - r) - 1`` forwards of chunk 0, then ``r`` pairs of
    chunk-1 and chunk-0 forwards, then ``ranks - r`` rounds of chunk-1 F, I, W.
    Steady: chunk-0 F (while any remain), I, W, then chunk-1 F, I, W. Cool-down:
    ``r`` pairs of I on both chunks, ``ranks - r`` chunk-0 I, W pairs, then the
    pending W of chunk 1 and of chunk 0. torch plans it for at least
    ``2 ranks - 1`` micro-batches and drops the actions of the ones beyond ``M``.
    """
    return [_zbv_rank(r, ranks, microbatches) for r in range(ranks)]


def _zbv_rank(rank: int, ranks: int, microbatches: int) -> list[Action]:
    n = max(2 * ranks - 1, microbatches)
    c0, c1 = rank, 2 * ranks - 1 - rank
    count: dict[tuple[int, str], int] = defaultdict(int)
    ops: list[Action] = []

    def emit(stage: int, kind: str, m: int | None = None) -> None:
        if m is None:
            m = count[stage, kind]
            count[stage, kind] = m + 1
        ops.append(Action(stage, kind, m))

    for _ in range(2 * (ranks - rank) - 1):
        emit(c0, FORWARD)
    for _ in range(rank):
        emit(c1, FORWARD)
        emit(c0, FORWARD)
    for _ in range(ranks - rank):
        emit(c1, FORWARD)
        emit(c1, BACKWARD_INPUT)
        emit(c1, BACKWARD_WEIGHT)
    while count[c1, FORWARD] < count[c0, FORWARD] or count[c0, FORWARD] < n:
        if count[c0, FORWARD] < n:
            emit(c0, FORWARD)
        emit(c0, BACKWARD_INPUT)
        emit(c0, BACKWARD_WEIGHT)
        emit(c1, FORWARD)
        emit(c1, BACKWARD_INPUT)
        emit(c1, BACKWARD_WEIGHT)
    for _ in range(rank):
        emit(c0, BACKWARD_INPUT)
        emit(c1, BACKWARD_INPUT)
    for _ in range(ranks - rank):
        emit(c0, BACKWARD_INPUT)
        emit(c0, BACKWARD_WEIGHT)
    for stage in (c1, c0):
        while count[stage, BACKWARD_WEIGHT] < count[stage, BACKWARD_INPUT]:
            emit(stage, BACKWARD_WEIGHT)
    return [a for a in ops if a.microbatch < microbatches]


def _dualpipev(ranks: int, microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """``ScheduleDualPipeV`` (DeepSeek-V3's DualPipe folded into a V, arXiv:2412.19437).

    Same V layout as ZB-V. Its eight phases per rank (warm-up forwards; chunk-1
    I, W, F; the main phase pairing a forward of one chunk with a full backward
    of the other; then backwards, the second half split into I and deferred W)
    follow torch's ``_calculate_single_rank_operations``. torch issues each
    forward/backward pair as one OVERLAP_F_B action whose parts run one after
    the other; here they are the two actions in that order, and
    ``_dualpipev_overlaps`` names the pairs ([Note: overlapped pairs]).
    """
    return [_dualpipev_rank(r, ranks, microbatches)[0] for r in range(ranks)]


def _dualpipev_overlaps(ranks: int, microbatches: int, virtual_stages: int) -> list[list[tuple[Action, Action]]]:
    """The OVERLAP_F_B pairs of each rank's ``_dualpipev`` order, (forward, backward)."""
    return [_dualpipev_rank(r, ranks, microbatches)[1] for r in range(ranks)]


def _dualpipev_rank(rank: int, ranks: int, microbatches: int) -> tuple[list[Action], list[tuple[Action, Action]]]:
    c0, c1 = rank, 2 * ranks - 1 - rank
    count: dict[tuple[int, str], int] = defaultdict(int)  # (stage, F or I) -> next micro-batch
    pending_w: list[tuple[int, int]] = []
    ops: list[Action] = []
    pairs: list[tuple[Action, Action]] = []

    def emit(stage: int, kind: str) -> Action:
        key = (stage, FORWARD if kind == FORWARD else BACKWARD_INPUT)
        m = count[key]
        count[key] = m + 1
        ops.append(Action(stage, kind, m))
        if kind == BACKWARD_INPUT:
            pending_w.append((stage, m))
        return ops[-1]

    def overlap(forward_stage: int, backward_stage: int) -> None:  # torch's add_overlap_f_b
        pairs.append((emit(forward_stage, FORWARD), emit(backward_stage, FULL_BACKWARD)))

    def weight() -> None:
        if pending_w:
            stage, m = pending_w.pop(0)
            ops.append(Action(stage, BACKWARD_WEIGHT, m))

    for _ in range((ranks - rank - 1) * 2):
        emit(c0, FORWARD)
    for _ in range(rank + 1):
        emit(c0, FORWARD)
        emit(c1, FORWARD)
    for _ in range(ranks - rank - 1):
        emit(c1, BACKWARD_INPUT)
        weight()
        emit(c1, FORWARD)
    for i in range(microbatches - ranks * 2 + rank + 1):
        if i == 0 and rank == ranks - 1:  # torch does not overlap the last rank's first pair
            emit(c0, FORWARD)
            emit(c1, FULL_BACKWARD)
        else:
            overlap(c0, c1)
        overlap(c1, c0)
    for _ in range(ranks - rank - 1):
        emit(c1, FULL_BACKWARD)
        overlap(c1, c0)
    split = False
    for i in range(rank + 1):
        if i == (rank + 1) // 2 and rank % 2 == 1:
            split = True
        emit(c1, BACKWARD_INPUT if split else FULL_BACKWARD)
        if i == (rank + 1) // 2 and rank % 2 == 0:
            split = True
        emit(c0, BACKWARD_INPUT if split else FULL_BACKWARD)
    for _ in range(ranks - rank - 1):
        weight()
        emit(c0, BACKWARD_INPUT if split else FULL_BACKWARD)
    for _ in range(rank + 1):
        weight()
    return ops, pairs


REGISTRY: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec("gpipe", "ScheduleGPipe", "loop", 1, False, False, 0, False, _gpipe,
                     "all forwards, then all backwards (fill-drain)"),
        ScheduleSpec("1f1b", "Schedule1F1B", "loop", 1, False, False, 1, False, _one_f_one_b,
                     "one forward, one backward in the steady state (PipeDream-Flush)"),
        ScheduleSpec("interleaved", "ScheduleInterleaved1F1B", "loop", None, True, False, 0, True, _interleaved,
                     "1F1B over several stages per rank (Megatron-LM interleaved)"),
        ScheduleSpec("zb", "ScheduleInterleavedZeroBubble", "loop", None, True, True, 0, True, _zero_bubble,
                     "interleaved 1F1B with the backward split into I and W, W filling bubbles (ZB1P)",
                     split_throughout=True),
        ScheduleSpec("zbv", "ScheduleZBVZeroBubble", "v", 2, True, True, 0, False, _zbv,
                     "zero-bubble over two stages per rank in a V (ZB-V)", split_throughout=True),
        ScheduleSpec("dualpipev", "ScheduleDualPipeV", "v", 2, True, True, 2, False, _dualpipev,
                     "DeepSeek's DualPipe in a V: forward of one chunk paired with backward of the other",
                     overlaps=_dualpipev_overlaps),
    )
}
SCHEDULES = tuple(REGISTRY)


def check_recompute(name: str, recompute: bool) -> None:
    """Refuse recomputation under a schedule that splits the backward: torch's ``stage_backward_input``
    cannot run through a checkpointed block yet ([Note: recompute in the runtime] in recompute.py)."""
    if recompute and spec(name).splits_backward:
        raise PlanError(
            f"schedule {name!r} splits the backward, which torch cannot run through a recomputed stage yet: "
            "plan with --no-recompute or another schedule"
        )
