"""Blocks to pipeline stages, and recomputation per stage, as a CP-SAT model.

For one fixed mesh (``pp`` ranks, ``v`` stages per rank, ``K = pp * v``
stages), micro-batching (``M`` micro-batches) and block costs (already
sharded for the mesh's tp), choose the stage of every block and whether each
stage recomputes its activations, minimizing the predicted step time under the
device memory limit. Stage ``s`` runs on rank ``s % pp``.

Formulation (times in integer units of ``UNIT_S``; every coefficient is a
per-micro-batch figure from the evaluator, so the model prices exactly what
the simulator will be given):

    variables  x[i,s] in {0,1}   block i on stage s
               r[s] in {0,1}     stage s recomputes every block (full activation checkpointing)
               w[i,s] = x[i,s] AND r[s]
               q[s] in {0,1}, k[s] in 0..N   stage s recomputes k[s] of its recomputable blocks
                                 (partial; see [Note: partial recomputation in the ILP])
               c[t,k] in {0,1}   tensor t crosses the cut after stage k
               u[p,s] in {0,1}   shared (tied) parameter p is held by stage s
               P, E >= 0         the steady-state period per micro-batch; exposed dp time

    assignment     sum_s x[i,s] = 1;  sum_i x[i,s] >= 1                   add_assignment_constraints()
    partial        r[s] + q[s] <= 1;  k[s] <= N q[s];
                   k[s] <= sum_{i in Rc} x[i,s]                            add_partial_constraints()
    graph order    stage(i) <= stage(j) for every block edge i -> j,
                   stage(i) = sum_s s x[i,s]                               add_order_constraints()
    cuts           c[t,k] >= le[src(t),k] - le[j,k] for every reader j of t,
                   le[i,k] = sum_{s<=k} x[i,s]                             add_cut_constraints()
    stage time     T_s = sum_i x[i,s] (f_i + b_i) + sum_i w[i,s] (f_i + ck_i) + c k[s]
                   (ck_i: block i's checkpoint cost, 0 unless calibrated)  add_time_constraints()
                   R_r = sum_{s on r} T_s;  P >= R_r
    period         (q - r + 1) P >= sum_{s=r..q} T_s + 2 sum_{k=r..q-1} send_k
                   for every window of consecutive stages r..q (v = 1)     add_objective()
    memory         for rank r and each in-flight pattern n of its schedule:
                   sum_{s on r} (static_s + work_s + n_s act_s + buf_s(n_s)) <= limit
                                                                           add_memory_constraints()
                   buf_s(n) = M cut_s + (M - n) cut_{s-1}: torch's receive buffers, all M
                   micro-batches of the output's gradient and of the input, of which the n in
                   flight are already in act_s (cut_k: bytes_k in KiB, 0 outside 0..K-2)
                   static_s = sum_i x[i,s] st_i + sum_p u[p,s] st_p;  u[p,s] >= x[i,s] (i reads p)
                   act_s = sum_i x[i,s] sv_i - sum_i w[i,s] (sv_i - in_i) - g k[s]
                   work_s >= w[i,s] sv_i;  work_s >= W q[s]
    data parallel  E >= DP_r - B_r - lead_r (overlapped) or E >= DP_r - lead_r, with
                   lead_r = sum_{s<r} (B_s + send_s) how much earlier rank r finishes
                                                                           add_dp_constraints()

    minimize  v M P + (sum_s T_s - P) + 2 v sum_k send_k + v E + v S        add_objective()
              (divided by v when reported; S, a constant: the gradient sums of the tied weights
              that the chain's first and last block read, on two ranks in every split)

with ``send_k = alpha_k + beta_k * sum_t bytes_t c[t,k]``. Each family is a
method of that name in both encodings (``_StageModel``, ``_ChainModel``), and
each method's docstring repeats its formula and names its constraints.

[Note: partial recomputation in the ILP]
Besides all or none (``r[s]``), a stage may recompute some of its blocks:
``k[s]`` of the blocks marked ``recomputable`` (the set ``Rc``, N of them), as
AdaPipe chooses how many layers of each stage recompute. Which ``k[s]`` blocks
is not modelled; the per-block greedy of solver/recompute.py picks them
([Note: choosing the recomputed blocks]). So every recomputable block is priced
by constants that hold for *any* ``k[s]`` of them:

    g = min_{i in Rc} (sv_i - in_i)    the least a recomputed block frees, per micro-batch in flight
    c = max_{i in Rc} (f_i + ck_i)     the most it replays, its checkpoint's own cost included
    W = max_{i in Rc} sv_i             the most its replay holds at once (the stage's workspace)

so ``k[s]`` recomputed blocks free at least ``g k[s]`` and cost at most
``c k[s]``: the model's memory and time are never below the evaluator's for the
same blocks (recompute_terms in evaluate.py; its ``in_b`` is ``input_bytes``
here, as for whole stages). Where the recomputable blocks are alike
(a transformer's layers) the constants are exact. ``q[s]`` says the stage
recomputes partially (it pays the workspace ``W`` once); a stage recomputes
wholly or partially, never both. Partial recomputation is offered only where
recomputation is not pinned (``recompute is None``), some block is
recomputable and ``g > 0``; otherwise ``k = q = 0`` and the model is the
all-or-none one. The search gives the ILP's split with the chosen stages to the
greedy, which takes the fewest blocks that fit by the simulator's peak
(search.py, [Note: recompute per block in the search]).

[Note: the step-time closed form]
For 1F1B (v = 1) the objective is ``(M - 1) P + sum_s T_s + 2 sum_k send_k
+ E``: the first micro-batch's round trip through every stage and transfer,
then one period ``P`` per further micro-batch. In the steady state rank r
alternates ``F(m + w_r)`` and ``B(m)`` with ``w_r = p - r - 1``; writing each
event's start as an offset plus ``m P`` turns the schedule's dependencies into
difference constraints, and their cycles give exactly the bounds above: the
cycle through ranks r..q (forward down, backward up, back to rank r's next
forward) spans ``q - r + 1`` periods and holds the work of those stages and
two transfers per cut between them. A window of one stage is ``P >= T_r``;
the whole pipeline is the round trip over ``p`` micro-batches in flight; on
slow links a short window around a slow cut is what binds. For equal stages
and free links this is the textbook ``(M + p - 1)(f + b)``. For more than 16
stages only windows of up to 8 stages and the prefix/suffix windows are
added (longer windows rarely bind). GPipe (only when pinned) and interleaved
(v > 1) use ``P >= R_r`` and the whole-pipeline window, exact only for equal
stages (see [Note: pruning] in search.py). The in-flight patterns
come from the schedule's own action order, so the memory constraint is
exactly the simulator's peak. The closed form leaves out that a stage's last
gradient waits for its reduction ([Note: a stage's reduction before its last
gradient send] in simulate.py), whose exposed parts add up down the cool-down:
only ``E`` bounds the reductions here, and the simulator, which judges every
candidate, prices the chain.

[Note: two encodings of the same model]
The *assignment* encoding above admits any edge-respecting assignment of a
block DAG, which matters for small graphs with parallel branches; its size is
``blocks x stages`` booleans, too many for a 100-block model on 64 stages.
Large problems use the *chain* encoding (``_ChainModel``): stages are
contiguous ranges of the blocks in graph order (what pipeline runtimes
split), represented by the cut positions ``0 = p_0 < p_1 < ... < p_K = n``,
and every stage sum is a difference of prefix sums read with element
constraints: ``T_s = FB[p_{s+1}] - FB[p_s] + r_s (F[p_{s+1}] - F[p_s])``,
``send_k = alpha_k + beta_k CUT[p_{k+1}]`` with ``CUT[p]`` the bytes crossing a
cut before block ``p``. The recompute workspace is bounded by the largest
block of the model rather than of the stage, and a tied parameter read by two
blocks of one stage is counted twice there (both conservative). Objective,
memory and data-parallel constraints are otherwise the same.
``ASSIGNMENT_MAX_VARS`` picks the encoding.

[Note: chain domains]
Each cut position is declared with its tight range ``s <= p_s <= n - K + s``
(s blocks before it at least, K - s after), not ``1..n-1``. The model is the
same (the ``nonempty`` constraints imply the range), but CP-SAT's presolve
otherwise spends most of a solve narrowing the index and target domains of
the 7 (K + 1) prefix-sum element constraints, loop after loop, and that work
is not counted in its deterministic time: on GPT-3 175B at batch 4096 (64
nodes) the 14 stage solves took 36.1 s of CPU with ``1..n-1`` and 17.9 s with
the tight ranges, under the same deterministic budgets
(benchmarks/results/2026-12-05-solve-time-4.md). CP-SAT sees a different
model, so its search path, and on ties the assignment it returns, may differ.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

from ortools.sat.python import cp_model

from ..graph import TensorFlow
from .sharding_ilp import UNIT_S

__all__ = ["BlockData", "StageProblem", "StageSolution", "solve_stages", "inflight_patterns", "schedule_inflight"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockData:
    """What the stage model needs of one block, for one micro-batch on one device."""

    forward_s: float  # compute + tensor-parallel communication
    backward_s: float
    saved_bytes: float  # activations kept for backward
    input_bytes: float  # what recomputation keeps instead
    static_bytes: float  # weights + gradients + optimizer state of its unshared parameters
    grad_bytes: float  # gradient bytes of its unshared parameters (data-parallel reduction)
    # The ILP may count it in a stage's partial recomputation k[s] ([Note: partial recomputation in the ILP])
    recomputable: bool = False
    # what its torch.utils.checkpoint call costs beyond the replayed forward (per call and per node inside it that saves a tensor),
    # forward and backward together,
    # paid when it recomputes ([Note: software overheads] in cost_models/overheads.py; 0 unless calibrated)
    checkpoint_s: float = 0.0

    @property
    def replay_s(self) -> float:
        """What recomputing the block adds to its stage's time: the replayed forward and its checkpoint."""
        return self.forward_s + self.checkpoint_s


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedParam:
    """A parameter read by several blocks (tied weights): held once per stage that reads it."""

    static_bytes: float
    grad_bytes: float
    readers: tuple[int, ...]


@dataclass(frozen=True)
class StageProblem:
    """One stage-assignment problem: the mesh, schedule and block costs are fixed."""

    blocks: tuple[BlockData, ...]
    edges: tuple[tuple[int, int], ...]  # block DAG edges, (from block, to block)
    tensors: tuple[TensorFlow, ...]  # tensors between blocks, bytes per micro-batch
    shared: tuple[SharedParam, ...]
    pp: int
    virtual_stages: int
    microbatches: int
    inflight: tuple[tuple[tuple[int, ...], ...], ...]  # per rank: the distinct in-flight count vectors over its chunks
    memory_limit: float  # bytes per device
    send_alpha: tuple[float, ...]  # per cut k: latency of the point-to-point transfer
    send_beta: tuple[float, ...]  # per cut k: seconds per byte
    dp_alpha: float = 0.0  # data-parallel all-reduce: latency part per stage
    dp_beta: float = 0.0  # seconds per gradient byte
    # the gradient sums of tied weights that every split puts on two pipeline ranks, once per step
    # ([Note: tied weights' gradient sums] in simulate.py): a constant of the objective
    tied_sum_s: float = 0.0
    overlap_dp: bool = True
    recompute: bool | None = None  # None: the solver decides per stage
    stage_starts: tuple[int, ...] = ()  # blocks pinned to begin a stage
    hint: tuple[int, ...] | None = None  # a stage per block to start from
    hint_recompute: tuple[bool, ...] | None = None  # and a recompute flag per stage
    hint_partial: tuple[int, ...] | None = None  # and a partial recomputation count k[s] per stage
    schedule: str = "1f1b"  # the schedule's name (the event objective replays its action order)
    objective: str = "auto"  # "events", "closed_form", or "auto" (see [Note: exact small problems])
    max_time_s: float = 10.0  # deterministic time budget
    wall_cap_s: float | None = None  # a wall-clock safety cap (binds only if the deterministic budget runs slow)

    @property
    def stages(self) -> int:
        return self.pp * self.virtual_stages


@dataclass(frozen=True, slots=True)
class StageSolution:
    """The stage ILP's answer: a stage per block, and per stage whether it recomputes every block
    and how many of its recomputable blocks it recomputes otherwise (empty if none)."""

    status: str  # OPTIMAL, FEASIBLE, INFEASIBLE, UNKNOWN
    stage_of: tuple[int, ...] = ()  # stage of each block
    recompute: tuple[bool, ...] = ()  # per stage: every block recomputes (r[s])
    # per stage: k[s], its recomputable blocks that recompute when it does not recompute wholly
    # ([Note: partial recomputation in the ILP]); 0 where recompute[s]
    partial: tuple[int, ...] = ()
    objective_s: float = float("inf")  # predicted step time
    bound_s: float = 0.0  # proven lower bound on it
    deterministic_s: float = 0.0  # CP-SAT's deterministic time spent, the hint's completion included


def period_windows(stages: int) -> list[tuple[int, int]]:
    """The windows r..q of consecutive stages whose cycle bounds the 1F1B period."""
    short = stages if stages <= 16 else 8
    return [
        (r, q)
        for r in range(stages)
        for q in range(r, stages)
        if q - r + 1 <= short or r == 0 or q == stages - 1
    ]


def schedule_inflight(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """``inflight_patterns`` of a named schedule; closed forms for 1F1B and GPipe, else from its order.

    1F1B keeps ``min(pp - r, M)`` micro-batches in flight on rank r, GPipe all ``M``.
    """
    if virtual_stages == 1 and schedule == "1f1b":
        return tuple(((min(pp - r, microbatches),),) for r in range(pp))
    if virtual_stages == 1 and schedule == "gpipe":
        return tuple(((microbatches,),) for _ in range(pp))
    from ..simulate import schedule_order

    return inflight_patterns(schedule_order(schedule, pp, microbatches, virtual_stages), pp, virtual_stages)


def inflight_patterns(orders: Sequence[Sequence], pp: int, virtual_stages: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per rank, the distinct vectors (micro-batches in flight per chunk) its action order passes through.

    In-flight counts change only at the rank's own forward (up) and backward
    (down) actions, so they depend on the order alone, not on the costs.
    """
    out = []
    for r, order in enumerate(orders):
        counts = [0] * virtual_stages
        seen: set[tuple[int, ...]] = set()
        for a in order:
            chunk = a.stage // pp
            if a.kind == "F":
                counts[chunk] += 1
                seen.add(tuple(counts))
            else:
                counts[chunk] -= 1
        # Keep only maximal vectors: a pattern dominated by another cannot bind.
        maximal = [p for p in seen if not any(q != p and all(a >= b for a, b in zip(q, p)) for q in seen)]
        out.append(tuple(sorted(maximal)))
    return tuple(out)


EVENTS_MAX = 800  # forward + backward actions up to which the exact event objective is used (any schedule)


def _use_events(p: StageProblem) -> bool:
    if p.objective == "events":
        return True
    if p.objective == "closed_form":
        return False
    return 2 * p.microbatches * p.stages <= EVENTS_MAX


def _add_event_step(m: cp_model.CpModel, forward: list, backward: list, send: list, p: StageProblem, dp: list | None,
                    dp_stage: list | None = None):
    """The step time as the schedule's longest path: one start variable per action.

    [Note: exact small problems]
    Every action of the schedule's order gets a start time; each start is at
    least the end of the rank's previous action and of its data dependencies
    (``F(s,m)`` after ``F(s-1,m)`` plus the transfer, ``B(s,m)`` after its own
    forward and after ``B(s+1,m)`` plus the transfer), the step at least the end
    of every rank's last action, and, with data parallelism, at least that end
    plus the reduction not hidden behind the last backward; and a stage's last
    backward sends its gradient once its own reduction has ended ([Note: a
    stage's reduction before its last gradient send] in simulate.py):
    ``B(s,m) >= B(s+1,m) + DP_{s+1} + send_s`` (overlapped; ``+ B_{s+1}`` more
    without overlap) for the last ``m`` of stage ``s+1``, in schedules that split
    no backward. These are exactly
    the simulator's rules, so for a fixed assignment the minimum is the
    simulated step: the objective and the judge agree exactly. The model has
    ``2 M K`` start variables, so it is used when that is at most
    ``EVENTS_MAX``; larger problems use the closed form of [Note: the step-time
    closed form], whose error shrinks as the transient becomes a smaller part
    of ``M`` periods.
    """
    from ..simulate import schedule_order

    orders = schedule_order(p.schedule, p.pp, p.microbatches, p.virtual_stages)
    start = {}
    for order in orders:
        for a in order:
            start[(a.stage, a.kind, a.microbatch)] = m.new_int_var(0, _BIG, f"start[{a}]")

    def dur(stage: int, kind: str):
        return forward[stage] if kind == "F" else backward[stage]

    for order in orders:  # each rank runs its actions in order, one at a time
        for prev, nxt in zip(order, order[1:]):
            m.add(start[(nxt.stage, nxt.kind, nxt.microbatch)] >= start[(prev.stage, prev.kind, prev.microbatch)] + dur(prev.stage, prev.kind))
    K = p.stages
    last_backward = {}  # stage -> the micro-batch of its last backward in its rank's order
    for order in orders:
        for a in order:
            if a.kind == "B":
                last_backward[a.stage] = a.microbatch
    splits = any(a.kind == "I" for order in orders for a in order)  # no DDP in a schedule that splits backwards
    finalizes = set() if splits else set(last_backward.items())
    for (s, kind, mb), var in start.items():
        if kind == "F" and s > 0:
            m.add(var >= start[(s - 1, "F", mb)] + forward[s - 1] + send[s - 1])
        if kind == "B":
            m.add(var >= start[(s, "F", mb)] + forward[s])
            if s < K - 1:
                m.add(var >= start[(s + 1, "B", mb)] + backward[s + 1] + send[s])
                if dp_stage is not None and (s + 1, mb) in finalizes:  # after the next stage's reduction
                    held = dp_stage[s + 1] + (0 if p.overlap_dp else backward[s + 1])
                    m.add(var >= start[(s + 1, "B", mb)] + held + send[s]).with_name(f"reduced_before_send[{s + 1}]")
    step = m.new_int_var(0, _BIG, "step")
    for r, order in enumerate(orders):
        last = order[-1]
        end = start[(last.stage, last.kind, last.microbatch)] + dur(last.stage, last.kind)
        m.add(step >= end).with_name(f"step_after[{r}]")
        if dp is not None:  # the reduction may overlap the rank's last backward (that action's stage)
            hidden = backward[last.stage] if p.overlap_dp else 0
            m.add(step >= end + dp[r] - hidden).with_name(f"step_after_reduce[{r}]")
    return step


def _add_period_constraints(m: cp_model.CpModel, period, T: list, send: list, p: StageProblem) -> None:
    """(q - r + 1) P >= sum_{s=r..q} T_s + 2 sum_{k=r..q-1} send_k (``period[r,q]``); see the Note."""
    K = p.stages
    if p.virtual_stages == 1:
        windows = period_windows(K)
    else:  # interleaved: the whole-pipeline window only (P >= R_r is added with the stage times)
        windows = [(0, K - 1)]
    for r, q in windows:
        work = sum(T[s] for s in range(r, q + 1)) + 2 * sum(send[k] for k in range(r, q))
        size = (q - r + 1) if p.virtual_stages == 1 else p.pp
        m.add(size * period >= work).with_name(f"period[{r},{q}]")


def _lead(B: list, send: list, r: int, p: StageProblem):
    """How much earlier than rank 0 rank r finishes its last backward (1F1B: the backward
    chain from r down to 0, ``sum_{s<r} (B_s + send_s)``), so its reduction has that much
    more room before it delays the step. Zero for interleaved schedules (not modelled)."""
    if p.virtual_stages != 1 or r == 0:
        return 0
    return sum(B[s] + send[s] for s in range(r))


_BIG = 2**48  # upper bound of the period and exposed-time variables (units of UNIT_S: ~2.8e6 s)


def _u(seconds: float) -> int:
    return int(round(seconds / UNIT_S))


class _Model(abc.ABC):
    """What both encodings share: the recomputation choice, the objective, the solve and its read-out.

    A subclass builds its CP-SAT model in ``build()``, one method per constraint
    family of the formulation (each named as in the module docstring), and
    leaves behind, per stage ``s``: ``T[s]`` (forward + backward + recomputation),
    ``F[s]`` (forward), ``B[s]`` (backward + recomputation), and per cut ``k``:
    ``send[k]``; the period ``P``, the exposed reduction ``E`` and, with data
    parallelism, ``dp_rank[r]``. All are in integer units of ``UNIT_S``.

    The partial recomputation's constants ([Note: partial recomputation in the ILP]) are
    ``gain`` (g, KiB), ``replay`` (c, time units) and ``rc_work`` (W, KiB); ``rc`` lists the
    recomputable blocks, empty when partial recomputation is not offered.
    """

    KIB = 1024  # memory in KiB keeps coefficients small

    def __init__(self, p: StageProblem) -> None:
        self.p = p
        self.m = cp_model.CpModel()
        self.T: list[cp_model.LinearExpr] = []
        self.F: list[cp_model.LinearExpr] = []
        self.B: list[cp_model.LinearExpr] = []
        self.send: list[cp_model.LinearExpr] = []
        self.cut_bytes: list[cp_model.LinearExpr] = []  # per cut k, KiB (the assignment encoding's)
        self._cut_kib: dict[int, cp_model.IntVar] = {}  # per cut k, KiB (the chain encoding's, made on demand)
        self.dp_rank: list[cp_model.LinearExpr] | None = None
        self.dp_stage: list[cp_model.LinearExpr] | None = None  # each stage's reduction (dp_rank's terms)
        kib = self.KIB
        rc = [i for i, b in enumerate(p.blocks) if b.recomputable]
        self.gain = min((int((p.blocks[i].saved_bytes - p.blocks[i].input_bytes) // kib) for i in rc), default=0)
        self.replay = max((_u(p.blocks[i].replay_s) for i in rc), default=0)
        self.rc_work = max((int(p.blocks[i].saved_bytes // kib) for i in rc), default=0)
        self.rc = rc if p.recompute is None and self.gain > 0 else []

    def new_recompute_vars(self) -> list:
        """r[s]: stage s recomputes; constants when the user pinned recomputation on or off."""
        if self.p.recompute is None:
            return [self.m.new_bool_var(f"r[{s}]") for s in range(self.p.stages)]
        return [self.m.new_constant(int(self.p.recompute)) for _ in range(self.p.stages)]

    def new_partial_vars(self) -> None:
        """q[s], k[s]: stage s recomputes k[s] of its recomputable blocks (constants 0 when not offered)."""
        p, m = self.p, self.m
        K, N = p.stages, len(self.rc)
        if not N:
            self.q = [m.new_constant(0) for _ in range(K)]
            self.k = [m.new_constant(0) for _ in range(K)]
            return
        self.q = [m.new_bool_var(f"q[{s}]") for s in range(K)]
        self.k = [m.new_int_var(0, N, f"k[{s}]") for s in range(K)]
        for s in range(K):
            m.add(self.r[s] + self.q[s] <= 1).with_name(f"whole_or_partial[{s}]")
            m.add(self.k[s] <= N * self.q[s]).with_name(f"partial_on[{s}]")

    @abc.abstractmethod
    def cut_kib(self, k: int) -> cp_model.LinearExpr:
        """The bytes per micro-batch crossing cut ``k`` (between stages k and k + 1), in KiB."""

    def buffers(self, s: int, n: int) -> cp_model.LinearExpr:
        """buf_s(n) = M cut_s + (M - n) cut_{s-1}: stage s's receive buffers with n of its micro-batches
        in flight. torch's stage holds one for the output's gradient and one for the input per
        micro-batch; the input of those in flight is what its first blocks save, in ``act_s``
        ([Note: what a step holds] in evaluate.py)."""
        M, K = self.p.microbatches, self.p.stages
        out = M * self.cut_kib(s) if s < K - 1 else 0
        return out + ((M - n) * self.cut_kib(s - 1) if s > 0 else 0)

    def recompute_hints(self) -> list[tuple[cp_model.IntVar, int]]:
        """The hint's r[s] and, where partial recomputation is offered, its q[s] and k[s]."""
        p = self.p
        out = []
        if p.hint_recompute is not None and p.recompute is None:
            out += [(self.r[s], int(flag)) for s, flag in enumerate(p.hint_recompute)]
        if p.hint_partial is not None and self.rc:
            out += [(self.k[s], k) for s, k in enumerate(p.hint_partial)]
            out += [(self.q[s], int(k > 0)) for s, k in enumerate(p.hint_partial)]
        return out

    @abc.abstractmethod
    def build(self) -> None:
        """Add every constraint family and the objective."""

    @abc.abstractmethod
    def hints(self) -> list[tuple[cp_model.IntVar, int]]:
        """The problem's hint as (variable, value) pairs."""

    @abc.abstractmethod
    def stage_of_blocks(self, solver: cp_model.CpSolver) -> tuple[int, ...]:
        """The stage of every block in the solution."""

    def add_objective(self) -> None:
        """minimize  v M P + (sum_s T_s - P) + 2 v sum_k send_k + v E + v S, with the period windows,
        ``S`` the tied weights' gradient sums every split pays (``StageProblem.tied_sum_s``).

        ``(q - r + 1) P >= sum_{s=r..q} T_s + 2 sum_{k=r..q-1} send_k`` (``period[r,q]``,
        see [Note: the step-time closed form]); or, for small schedules, the exact
        step of [Note: exact small problems], which replaces both.
        """
        p = self.p
        tied = _u(p.tied_sum_s)  # a constant: after the step's last action and reduction, on the tied ranks
        if _use_events(p):
            self.m.minimize(_add_event_step(self.m, self.F, self.B, self.send, p, self.dp_rank, self.dp_stage) + tied)
            return
        v, M = p.virtual_stages, p.microbatches
        total = sum(self.T)
        _add_period_constraints(self.m, self.P, self.T, self.send, p)
        self.m.minimize(v * M * self.P + (total - self.P) + 2 * v * sum(self.send) + v * self.E + v * tied)

    def solve(self) -> StageSolution:
        p = self.p
        self.build()
        solver, spent = _solve(self.m, self.hints(), p.max_time_s, p.wall_cap_s)
        status = solver.response_proto.status
        name = solver.status_name(status)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return StageSolution(name, bound_s=float("inf") if status == cp_model.INFEASIBLE else 0.0, deterministic_s=spent)
        scale = 1 if _use_events(p) else p.virtual_stages  # the closed form is minimized times v; the event step is not
        return StageSolution(
            status=name,
            stage_of=self.stage_of_blocks(solver),
            recompute=tuple(bool(solver.value(r)) for r in self.r),
            partial=tuple(int(solver.value(k)) for k in self.k),
            objective_s=solver.objective_value * UNIT_S / scale,
            bound_s=solver.best_objective_bound * UNIT_S / scale,
            deterministic_s=spent,
        )


class _StageModel(_Model):
    """The assignment encoding: a boolean per block and stage (see [Note: two encodings of the same model])."""

    def __init__(self, p: StageProblem) -> None:
        super().__init__(p)
        n, K = len(p.blocks), p.stages
        self.x = [[self.m.new_bool_var(f"x[{i},{s}]") for s in range(K)] for i in range(n)]
        self.r = self.new_recompute_vars()
        self.new_partial_vars()
        self.w = [[self.m.new_bool_var(f"w[{i},{s}]") for s in range(K)] for i in range(n)]
        self.P = self.m.new_int_var(0, _BIG, "P")  # the period (see the formulation)
        self.E = self.m.new_int_var(0, _BIG, "E")

    def build(self) -> None:
        self.add_assignment_constraints()
        self.add_partial_constraints()
        self.add_order_constraints()
        self.add_cut_constraints()
        self.add_time_constraints()
        self.add_memory_constraints()
        self.add_dp_constraints()
        self.add_objective()

    def stage_of(self, i: int) -> cp_model.LinearExpr:
        return sum(s * self.x[i][s] for s in range(self.p.stages))

    def add_assignment_constraints(self) -> None:
        """sum_s x[i,s] = 1 (``assign[i]``); sum_i x[i,s] >= 1 (``nonempty[s]``); w = x AND r."""
        p, m = self.p, self.m
        for i in range(len(p.blocks)):
            m.add_exactly_one(self.x[i]).with_name(f"assign[{i}]")
        for s in range(p.stages):
            m.add(sum(self.x[i][s] for i in range(len(p.blocks))) >= 1).with_name(f"nonempty[{s}]")
            for i in range(len(p.blocks)):
                w, x, r = self.w[i][s], self.x[i][s], self.r[s]
                m.add(w <= x).with_name(f"recompute_and_x[{i},{s}]")
                m.add(w <= r).with_name(f"recompute_and_r[{i},{s}]")
                m.add(w >= x + r - 1).with_name(f"recompute_and[{i},{s}]")

    def add_partial_constraints(self) -> None:
        """k[s] <= sum_{i in Rc} x[i,s] (``partial_count[s]``); r[s] + q[s] <= 1 and k[s] <= N q[s]
        (``whole_or_partial[s]``, ``partial_on[s]``, added with the variables)."""
        if not self.rc:
            return
        for s in range(self.p.stages):
            self.m.add(self.k[s] <= sum(self.x[i][s] for i in self.rc)).with_name(f"partial_count[{s}]")

    def add_order_constraints(self) -> None:
        """stage(i) <= stage(j) for every edge i -> j (``order[i,j]``); pinned stage starts."""
        p, m = self.p, self.m
        for i, j in p.edges:
            m.add(self.stage_of(i) <= self.stage_of(j)).with_name(f"order[{i},{j}]")
        for j in p.stage_starts:  # every block before j is in an earlier stage, every later one not earlier
            for i in range(len(p.blocks)):
                if i < j:
                    m.add(self.stage_of(i) + 1 <= self.stage_of(j)).with_name(f"starts[{j}] after {i}")
                elif i > j:
                    m.add(self.stage_of(i) >= self.stage_of(j)).with_name(f"starts[{j}] before {i}")

    def le(self, i: int, k: int) -> cp_model.LinearExpr:
        return sum(self.x[i][s] for s in range(k + 1))

    def add_cut_constraints(self) -> None:
        """c[t,k] >= le[src,k] - le[j,k] for readers j; send_k = alpha_k + beta_k * bytes_k (``cut[t,k,j]``)."""
        p, m = self.p, self.m
        for k in range(p.stages - 1):
            bytes_k = []
            for t, flow in enumerate(p.tensors):
                if flow.bytes <= 0:
                    continue
                c = m.new_bool_var(f"c[{t},{k}]")
                for j in flow.readers:
                    m.add(c >= self.le(flow.producer, k) - self.le(j, k)).with_name(f"cut[{t},{k},{j}]")
                bytes_k.append((flow.bytes, c))
            beta = p.send_beta[k]
            self.send.append(_u(p.send_alpha[k]) + sum(_u(beta * size) * c for size, c in bytes_k))
            self.cut_bytes.append(sum(int(size // self.KIB) * c for size, c in bytes_k))

    def cut_kib(self, k: int) -> cp_model.LinearExpr:
        return self.cut_bytes[k]

    def add_time_constraints(self) -> None:
        """T_s = sum x (f + b) + sum w f + c k[s]; P >= R_r for every rank r (``bottleneck[r]``).

        The period constraints over windows of stages (``_add_period_constraints``)
        are added in ``add_objective()``, once the transfers are known.
        """
        p, m = self.p, self.m
        n = len(p.blocks)
        for s in range(p.stages):
            fb = sum(_u(p.blocks[i].forward_s + p.blocks[i].backward_s) * self.x[i][s] for i in range(n))
            again = sum(_u(p.blocks[i].replay_s) * self.w[i][s] for i in range(n)) + self.replay * self.k[s]
            self.T.append(fb + again)
            self.B.append(sum(_u(p.blocks[i].backward_s) * self.x[i][s] for i in range(n)) + again)
            self.F.append(self.T[-1] - self.B[-1])
        for r in range(p.pp):
            m.add(self.P >= sum(self.T[s] for s in range(r, p.stages, p.pp))).with_name(f"bottleneck[{r}]")

    def add_memory_constraints(self) -> None:
        """Per rank and in-flight pattern: static + workspace + sum_s n_s act_s <= limit (``memory[r,n]``).

        act_s = sum x sv - sum w (sv - in) - g k[s]; work_s >= w[i,s] sv_i and work_s >= W q[s].
        """
        p, m = self.p, self.m
        n = len(p.blocks)
        scale = self.KIB
        limit = int(p.memory_limit // scale)
        static, act, work = [], [], []
        for s in range(p.stages):
            st = sum(int(p.blocks[i].static_bytes // scale) * self.x[i][s] for i in range(n))
            for q, sh in enumerate(p.shared):
                u = m.new_bool_var(f"u[{q},{s}]")
                for i in sh.readers:
                    m.add(u >= self.x[i][s]).with_name(f"shared[{q},{s},{i}]")
                st = st + int(sh.static_bytes // scale) * u
            static.append(st)
            keep = sum(int(p.blocks[i].saved_bytes // scale) * self.x[i][s] for i in range(n))
            drop = sum(
                int((p.blocks[i].saved_bytes - p.blocks[i].input_bytes) // scale) * self.w[i][s] for i in range(n)
            )
            act.append(keep - drop - self.gain * self.k[s])
            wk = m.new_int_var(0, max(1, int(max((b.saved_bytes for b in p.blocks), default=0) // scale) + 1), f"work[{s}]")
            for i in range(n):
                m.add(wk >= int(p.blocks[i].saved_bytes // scale) * self.w[i][s])
            if self.rc:
                m.add(wk >= self.rc_work * self.q[s]).with_name(f"partial_work[{s}]")
            work.append(wk)
        for r in range(p.pp):
            mine = list(range(r, p.stages, p.pp))
            base = sum(static[s] + work[s] for s in mine)
            for j, pattern in enumerate(p.inflight[r]):
                held = sum(cnt * act[s] + self.buffers(s, cnt) for cnt, s in zip(pattern, mine))
                m.add(base + held <= limit).with_name(f"memory[{r},{j}]")

    def add_dp_constraints(self) -> None:
        """E >= DP_r - B_r - lead_r (overlap) or E >= DP_r - lead_r (``dp[r]``).

        DP_r = sum_{s on r} (alpha + beta grad_s), grad_s = sum_i x[i,s] g_i + sum_p u[p,s] g_p.
        """
        p, m = self.p, self.m
        if p.dp_beta == 0 and p.dp_alpha == 0:
            return
        n = len(p.blocks)
        grad = []
        for s in range(p.stages):
            g = sum(_u(p.dp_beta * p.blocks[i].grad_bytes) * self.x[i][s] for i in range(n))
            for q, sh in enumerate(p.shared):
                u = m.new_bool_var(f"ug[{q},{s}]")
                for i in sh.readers:
                    m.add(u >= self.x[i][s])
                g = g + _u(p.dp_beta * sh.grad_bytes) * u
            grad.append(_u(p.dp_alpha) + g)
        self.dp_stage = grad
        self.dp_rank = []
        for r in range(p.pp):
            mine = list(range(r, p.stages, p.pp))
            dp_r = sum(grad[s] for s in mine)
            self.dp_rank.append(dp_r)
            last_b = self.B[mine[0]]  # the rank's last action is the first chunk's backward
            lead = _lead(self.B, self.send, r, p)
            m.add(self.E >= (dp_r - last_b if p.overlap_dp else dp_r) - lead).with_name(f"dp[{r}]")

    def hints(self) -> list[tuple[cp_model.IntVar, int]]:
        """The hint's stage of every block (and recomputation flags)."""
        p = self.p
        if p.hint is None:
            return []
        hints = [(self.x[i][s], int(s == s_i)) for i, s_i in enumerate(p.hint) for s in range(p.stages)]
        return hints + self.recompute_hints()

    def stage_of_blocks(self, solver: cp_model.CpSolver) -> tuple[int, ...]:
        K = self.p.stages
        return tuple(next(s for s in range(K) if solver.value(self.x[i][s])) for i in range(len(self.p.blocks)))


def _solve(
    model: cp_model.CpModel, hints: list[tuple[cp_model.IntVar, int]], budget_s: float, wall_cap_s: float | None = None
) -> tuple[cp_model.CpSolver, float]:
    """Solve ``model`` deterministically, starting from a complete solution when ``hints`` allow one;
    the solver and the deterministic time both solves spent.

    CP-SAT takes a partial hint (the cut positions) as a suggestion and may
    not manage to complete it. So the hint is first completed by solving a
    copy of the model with the hinted variables fixed (cheap: everything else
    follows), and that full solution becomes the hint. The search therefore
    never returns worse than the hint when the hint is feasible.
    """
    spent = 0.0
    if hints:
        fixed = model.clone()
        for var, val in hints:
            fixed.add(fixed.get_int_var_from_proto_index(var.index) == val)
        first = cp_model.CpSolver()
        first.parameters.num_workers = 1
        first.parameters.max_deterministic_time = max(0.05, budget_s / 4)
        completed = first.solve(fixed)
        spent += first.response_proto.deterministic_time
        if completed in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            model.clear_hints()
            values = first.response_proto.solution
            for index in range(len(model.proto.variables)):
                model.add_hint(model.get_int_var_from_proto_index(index), values[index])
        else:
            for var, val in hints:
                model.add_hint(var, val)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1  # deterministic
    solver.parameters.max_deterministic_time = budget_s
    if wall_cap_s is not None:
        solver.parameters.max_time_in_seconds = wall_cap_s
    solver.solve(model)
    return solver, spent + solver.response_proto.deterministic_time


ASSIGNMENT_MAX_VARS = 256  # blocks x stages up to which the assignment encoding is used


def solve_stages(problem: StageProblem, encoding: str = "auto") -> StageSolution:
    """Solve one stage-assignment problem with CP-SAT (deterministic, time-bounded).

    ``encoding`` is "assignment", "chain" or "auto" (see [Note: two encodings of the same model]).
    """
    if encoding == "auto":
        encoding = "assignment" if len(problem.blocks) * problem.stages <= ASSIGNMENT_MAX_VARS else "chain"
    if encoding == "assignment":
        return _StageModel(problem).solve()
    if encoding == "chain":
        return _ChainModel(problem).solve()
    raise ValueError(f"encoding {encoding!r} is not 'auto', 'assignment' or 'chain'")


class _ChainModel(_Model):
    """The chain encoding: cut positions and prefix sums (see [Note: two encodings of the same model]).

    Every per-stage sum is ``X_s = X[p_{s+1}] - X[p_s]`` over a prefix-sum table
    ``X`` of the blocks in graph order, read at the cut positions with element
    constraints (``read_prefix_sums``).
    """

    def __init__(self, p: StageProblem) -> None:
        super().__init__(p)
        n, kib = len(p.blocks), self.KIB
        shared_static = [0.0] * n
        shared_grad = [0.0] * n
        for sh in p.shared:
            for i in sh.readers:
                shared_static[i] += sh.static_bytes
                shared_grad[i] += sh.grad_bytes
        self.tables = {
            "FB": _prefix([_u(b.forward_s + b.backward_s) for b in p.blocks]),
            "F": _prefix([_u(b.forward_s) for b in p.blocks]),
            "BK": _prefix([_u(b.backward_s) for b in p.blocks]),
            "ST": _prefix([int((b.static_bytes + shared_static[i]) // kib) for i, b in enumerate(p.blocks)]),
            "SV": _prefix([int(b.saved_bytes // kib) for b in p.blocks]),
            "IN": _prefix([int(b.input_bytes // kib) for b in p.blocks]),
            "G": _prefix([_u(p.dp_beta * (b.grad_bytes + shared_grad[i])) for i, b in enumerate(p.blocks)]),
        }
        # RF: what recomputing costs, the replay and its checkpoint; F itself where checkpoints are free
        # (every uncalibrated cluster), so that CP-SAT reads one table fewer
        self.replay_table = "RF" if any(b.checkpoint_s > 0 for b in p.blocks) else "F"
        if self.replay_table == "RF":
            self.tables["RF"] = _prefix([_u(b.replay_s) for b in p.blocks])
        if self.rc:  # RC[j]: recomputable blocks before block j (only when partial recomputation is offered)
            marked = set(self.rc)
            self.tables["RC"] = _prefix([int(i in marked) for i in range(n)])
        self.cut = [0] * (n + 1)  # CUT[j]: bytes crossing a cut placed before block j
        for t in p.tensors:
            for j in range(t.producer + 1, max(t.readers) + 1):
                self.cut[j] += t.bytes
        # Recompute workspace: the largest block of the model (conservative; a range-maximum
        # table would need an element over n^2 entries, which CP-SAT's presolve expands).
        self.largest = max(int(b.saved_bytes // kib) for b in p.blocks)

    def build(self) -> None:
        self.add_assignment_constraints()
        self.add_order_constraints()
        self.r = self.new_recompute_vars()
        self.new_partial_vars()
        self.read_prefix_sums()
        self.add_partial_constraints()
        self.add_time_constraints()
        self.add_memory_constraints()
        self.add_cut_constraints()
        self.add_dp_constraints()
        self.add_objective()

    def _at(self, table: Sequence[int], index, name: str):
        """table[index] as a variable (an element constraint)."""
        var = self.m.new_int_var(min(table), max(table), name)
        self.m.add_element(index, list(table), var)
        return var

    def diff(self, name: str, s: int) -> cp_model.LinearExpr:
        """Stage s's share of table ``name``: ``X[p_{s+1}] - X[p_s]``."""
        return self.at[name][s + 1] - self.at[name][s]

    def add_assignment_constraints(self) -> None:
        """Cut positions 0 = p_0 < p_1 < ... < p_K = n: p_s + 1 <= p_{s+1} (``nonempty[s]``).

        Every block is on exactly one stage and no stage is empty by construction. The domains
        ``s <= p_s <= n - K + s`` follow from these constraints; stating them up front spares
        presolve the narrowing of every prefix-sum element constraint ([Note: chain domains]).
        """
        p, m = self.p, self.m
        n, K = len(p.blocks), p.stages
        # max(): with more stages than blocks the domain stays non-empty and nonempty[] proves infeasibility
        self.pos = ([m.new_constant(0)] + [m.new_int_var(s, max(s, n - K + s), f"p[{s}]") for s in range(1, K)]
                    + [m.new_constant(n)])
        for s in range(K):
            m.add(self.pos[s] + 1 <= self.pos[s + 1]).with_name(f"nonempty[{s}]")

    def add_order_constraints(self) -> None:
        """A pinned block j begins a stage: exactly one s with p_s = j (``starts[j]``).

        Graph order holds by construction: stages are contiguous in a topological order.
        """
        p, m = self.p, self.m
        K = p.stages
        for j in p.stage_starts:
            choice = [m.new_bool_var(f"start[{j},{s}]") for s in range(1, K)]
            m.add_exactly_one(choice).with_name(f"starts[{j}]")
            for s, c in zip(range(1, K), choice):
                m.add(self.pos[s] == j).only_enforce_if(c)

    def read_prefix_sums(self) -> None:
        """X[p_s] for every table X and cut position p_s (``FB[s]``, ``F[s]``, ... element constraints)."""
        K = self.p.stages
        self.at = {name: [self._at(tab, self.pos[s], f"{name}[{s}]") for s in range(K + 1)] for name, tab in self.tables.items()}

    def add_partial_constraints(self) -> None:
        """k[s] <= RC[p_{s+1}] - RC[p_s] (``partial_count[s]``), RC the prefix count of the recomputable
        blocks; r[s] + q[s] <= 1 and k[s] <= N q[s] (``whole_or_partial[s]``, ``partial_on[s]``, added
        with the variables)."""
        if not self.rc:
            return
        for s in range(self.p.stages):
            self.m.add(self.k[s] <= self.diff("RC", s)).with_name(f"partial_count[{s}]")

    def add_time_constraints(self) -> None:
        """T_s = FB_s + r_s RF_s + c k_s, B_s = BK_s + r_s RF_s + c k_s; P >= sum_{s on r} T_s (``bottleneck[r]``).

        ``RF`` is ``F`` plus each block's checkpoint cost (``BlockData.replay_s``; the table ``F``
        itself where every checkpoint is free). ``r_s RF_s`` is a variable at least
        ``RF_s - bigT (1 - r_s)`` (``recompute_time[s]``), equal to it at the optimum.
        """
        p, m = self.p, self.m
        K, RF = p.stages, self.tables[self.replay_table]
        big_t = self.tables["FB"][-1] + RF[-1] + 1
        for s in range(K):
            fdiff = self.diff("F", s)
            extra = m.new_int_var(0, RF[-1], f"recompute_time[{s}]")
            m.add(extra >= self.diff(self.replay_table, s) - big_t * (1 - self.r[s])).with_name(f"recompute_time[{s}]")
            extra = extra + self.replay * self.k[s]
            self.T.append(self.diff("FB", s) + extra)
            self.F.append(fdiff)
            self.B.append(self.diff("BK", s) + extra)
        self.P = m.new_int_var(0, _BIG, "P")
        for rk in range(p.pp):
            m.add(self.P >= sum(self.T[s] for s in range(rk, K, p.pp))).with_name(f"bottleneck[{rk}]")

    def add_memory_constraints(self) -> None:
        """Per rank r and in-flight pattern n: sum_{s on r} (ST_s + work_s + n_s act_s) <= limit (``memory[r,n]``).

        act_s >= SV_s - g k_s - bigM r_s (``act_keep[s]``), act_s >= IN_s - bigM (1 - r_s)
        (``act_recompute[s]``): the saved activations less what the partial recomputation
        frees, or only the inputs when the stage recomputes wholly; work_s = r_s x the largest
        block's saved activations + q_s W.
        """
        p, m = self.p, self.m
        K, tab = p.stages, self.tables
        big_m = tab["SV"][-1] + tab["IN"][-1] + self.largest + 1
        static, act, work = [], [], []
        for s in range(K):
            static.append(self.diff("ST", s))
            a = m.new_int_var(0, big_m, f"act[{s}]")
            m.add(a >= self.diff("SV", s) - self.gain * self.k[s] - big_m * self.r[s]).with_name(f"act_keep[{s}]")
            m.add(a >= self.diff("IN", s) - big_m * (1 - self.r[s])).with_name(f"act_recompute[{s}]")
            act.append(a)
            work.append(self.largest * self.r[s] + self.rc_work * self.q[s])
        limit = int(p.memory_limit // self.KIB)
        for rk in range(p.pp):
            mine = list(range(rk, K, p.pp))
            base = sum(static[s] + work[s] for s in mine)
            for j, pattern in enumerate(p.inflight[rk]):
                held = sum(c * act[s] + self.buffers(s, c) for c, s in zip(pattern, mine))
                m.add(base + held <= limit).with_name(f"memory[{rk},{j}]")

    def cut_kib(self, k: int) -> cp_model.LinearExpr:
        """CUT[p_{k+1}] in KiB (``cut_kib[k]``, an element constraint), made once."""
        if k not in self._cut_kib:
            self._cut_kib[k] = self._at([int(c // self.KIB) for c in self.cut], self.pos[k + 1], f"cut_kib[{k}]")
        return self._cut_kib[k]

    def add_cut_constraints(self) -> None:
        """send_k = alpha_k + beta_k CUT[p_{k+1}] (``send_bytes[k]``, an element constraint)."""
        p = self.p
        for k in range(p.stages - 1):
            cut_time = self._at([_u(p.send_beta[k] * c) for c in self.cut], self.pos[k + 1], f"send_bytes[{k}]")
            self.send.append(_u(p.send_alpha[k]) + cut_time)

    def add_dp_constraints(self) -> None:
        """E >= DP_r - B_r - lead_r (overlap) or E >= DP_r - lead_r (``dp[r]``).

        DP_r = sum_{s on r} (alpha + G_s) with ``G`` the prefix sums of beta x gradient bytes.
        """
        p, m = self.p, self.m
        self.E = m.new_int_var(0, _BIG, "E")
        if not (p.dp_beta or p.dp_alpha):
            return
        self.dp_stage = [_u(p.dp_alpha) + self.diff("G", s) for s in range(p.stages)]
        self.dp_rank = []
        for rk in range(p.pp):
            mine = list(range(rk, p.stages, p.pp))
            dp_r = sum(self.dp_stage[s] for s in mine)
            self.dp_rank.append(dp_r)
            lead = _lead(self.B, self.send, rk, p)
            m.add(self.E >= (dp_r - self.B[mine[0]] if p.overlap_dp else dp_r) - lead).with_name(f"dp[{rk}]")

    def hints(self) -> list[tuple[cp_model.IntVar, int]]:
        """The hint's cut positions (and recomputation flags), when it has K stages."""
        p, n, K = self.p, len(self.p.blocks), self.p.stages
        if p.hint is None:
            return []
        starts = [i for i in range(1, n) if p.hint[i] != p.hint[i - 1]]
        if len(starts) != K - 1:
            return []
        hints = [(self.pos[s], j) for s, j in zip(range(1, K), starts)]
        return hints + self.recompute_hints()

    def stage_of_blocks(self, solver: cp_model.CpSolver) -> tuple[int, ...]:
        cuts = [solver.value(x) for x in self.pos]
        return tuple(next(s for s in range(self.p.stages) if cuts[s] <= i < cuts[s + 1]) for i in range(len(self.p.blocks)))


def _prefix(values: Sequence[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
