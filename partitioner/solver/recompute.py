"""The search's recompute choice per block: after the split is chosen, the least replay that fits.

The stage ILP (pipeline_ilp.py) decides per stage whether all of a stage's blocks recompute,
none, or how many ([Note: partial recomputation in the ILP]), not which. Given its split
(or a seed's), ``fewest_recomputed`` chooses them per block, as
AdaPipe does per stage, with Megatron's selective mode as a second option
([Note: recompute per block] in recompute.py). It runs on the evaluator's own figures, and
the plan it returns is priced by the evaluator and the simulator as every plan is.

[Note: choosing the recomputed blocks]
For pipeline rank ``r`` holding stages ``S_r``, with static bytes ``st_s`` (weights,
gradients, optimizer state and FSDP's transients), in-flight patterns ``n`` of its
schedule (micro-batches in flight per stage, the vectors the ILP's memory constraint uses)
and the limit ``L``, a choice (``R_s`` per stage, ``σ`` for the rank) fits when

    sum_{s in S_r} (st_s + work_s) + max_n sum_{s in S_r} n_s act_s  <=  L

with ``act_s`` as in [Note: recompute per block] and ``work_s`` what the replay adds to the
stage's backward workspace, ``max_b (nd_b + rp_b) - max_b nd_b`` (``nd_b`` the block's node
gradients, ``rp_b`` its replay: ``evaluate.backward_work``). Its cost is the replay,
``M sum_s rec_s``. Recomputing block ``b`` of stage ``s`` frees ``g_b = sv'_b - in_b``
bytes per micro-batch in flight (``sv'_b = sv_b - σ core_b``) for ``c_b = f_b - σ fc_b``
seconds per micro-batch, plus its checkpoint call's own work on a calibrated cluster
(``a_ckpt + n_b a_ckpt_node + a_ckpt_bwd``, ``n_b`` its nodes that save a tensor; under ``σ``
a block with a core already pays a call: only its other ``n_b - 1`` nodes). For each ``σ`` (off, and on when the model has attention cores
and the runtime can realize it), blocks are taken in the order of the most bytes freed
per second, ``n̂_s g_b / c_b`` with ``n̂_s`` the stage's most micro-batches in flight
(ties: stage, then block, in model order), and the shortest prefix that fits is kept.
Of the two, the one with less replay time, checkpoint calls included, wins (ties: σ off). When the rank fits
without recomputation it recomputes nothing; when no prefix fits, its stages keep what
they were given. The formula leaves out what does not depend on the choice (the loss, receive
buffers, workspaces); the simulated peak of the rank's bare stages adds it, and the simulator
checks the prefix found ([Note: the simulated check]).

For ``m`` identical blocks this prefix is the fewest blocks that fit, and it is the
cheapest replay too: each block frees the same bytes for the same seconds. With blocks of
different kinds (an embedding or a head beside the layers) the greedy order is the
fractional-knapsack order, exact up to the last block taken. The choice is deterministic.
The ILP prices how many blocks of a stage recompute with constants that hold for any of
them, and this greedy picks which; where the ILP recomputed a whole stage (or a seed
does), its split was chosen for all-or-none, and the search says so by leaving the
candidate's bound at its recompute-free lower bound (search.py). Only blocks with weights of
their own are taken (``recomputable_alone``): a tied embedding or head frees nothing (an
embedding saves its indices, a head its input), though the runtime can replay one through a
weightless module ([Note: recompute in the runtime] in recompute.py), as it does in a stage
that recomputes every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..baselines import inflight_horizon
from ..evaluate import BlockCost, Evaluator, StageSpec, backward_work, recompute_terms
from ..plan import Mesh, Schedule
from ..schedules import spec as schedule_spec, stage_rank
from ..simulate import StageCost, peak_memory
from .pipeline_ilp import schedule_inflight

__all__ = ["RecomputeChoice", "fewest_recomputed", "recomputable_alone"]


@dataclass(frozen=True, slots=True)
class RecomputeChoice:
    """What ``fewest_recomputed`` chose for one pipeline rank."""

    rank: int
    blocks: int  # blocks recomputed whole on the rank's stages
    selective: bool  # the rank's other blocks replay their attention core
    replay_s: float  # seconds replayed per micro-batch on the rank, the checkpoint calls' own work included
    fits: bool  # False: no choice fit, the given stages are kept


def fewest_recomputed(
    ev: Evaluator, specs: Sequence[StageSpec], mesh: Mesh, schedule: Schedule, sharding: Mapping[str, str],
    *, selective: bool = True,
) -> tuple[list[StageSpec], list[RecomputeChoice]]:
    """``specs`` with each rank's recomputation re-chosen as [Note: choosing the recomputed blocks]
    says; ``selective=False`` leaves Megatron's selective mode out."""
    pp, K = mesh.pp, len(specs)
    layout = schedule_spec(schedule.name).layout
    limit = ev.usable_memory_bytes  # the reserve and the memory margin kept free
    bare = [StageSpec(sp.blocks) for sp in specs]
    bare_costs = ev.stage_costs(bare, mesh, schedule, sharding)
    static = [c.static_bytes for c in bare_costs]
    bare_peak = _simulated_peaks(bare_costs, schedule)
    costs = {b: ev.block_cost(ev.pgraph.blocks[b], schedule.micro_batch_size, mesh.tp, sharding)
             for sp in specs for b in sp.blocks}
    nodes = {b: ev.node_backward_bytes(ev.pgraph.blocks[b], schedule.micro_batch_size) for sp in specs for b in sp.blocks}
    horizon = inflight_horizon(schedule.name, pp, schedule.microbatches, schedule.virtual_stages)
    patterns = schedule_inflight(schedule.name, pp, horizon, schedule.virtual_stages)
    alone = recomputable_alone(ev)
    saving = {b: ev.saving_nodes(ev.pgraph.blocks[b]) for b in costs}
    o = ev.overheads

    def recompute_cost(spec: StageSpec) -> float:
        """What the stage's recomputation costs per micro-batch: the replay, and its checkpoint calls' own work
        in forward and backward ([Note: software overheads])."""
        blocks = [costs[b] for b in spec.blocks]
        return recompute_terms(spec, blocks)[1] + sum(ev.checkpoint_time(spec, blocks))

    def ckpt(b: int, sel: bool) -> float:
        """The checkpoint work block ``b`` adds when it recomputes whole: one call around its saving nodes, in
        place of its core's call under ``sel``."""
        core = sel and costs[b].core_forward_s > 0
        return sum(o.checkpoint_time(1 - core, saving[b] - core))

    out = list(specs)
    # Per rank that needs recomputation: (its stages, the blocks in the chosen order, selective, how many taken).
    todo: dict[int, tuple[list[int], list[tuple[int, int]], bool, int]] = {}
    report: dict[int, RecomputeChoice] = {}
    for r in range(pp):
        mine = [s for s in range(K) if stage_rank(s, pp, layout) == r]
        chunk = {s: s // pp for s in mine}  # a pattern counts micro-batches per chunk (stage // pp)
        most = {s: max(p[chunk[s]] for p in patterns[r]) for s in mine}

        def formula(chosen: dict[int, set[int]], sel: bool) -> float:
            act, work = {}, 0.0
            for s in mine:
                spec = StageSpec(specs[s].blocks, tuple(b for b in specs[s].blocks if b in chosen[s]), sel)
                block_costs, block_nodes = [costs[b] for b in spec.blocks], [nodes[b] for b in spec.blocks]
                act[s] = recompute_terms(spec, block_costs)[0]
                # the backward's workspace grows by the replay beside its block's gradients (evaluate.backward_work)
                work += (backward_work(spec, block_costs, block_nodes)
                         - backward_work(StageSpec(spec.blocks), block_costs, block_nodes))
            return sum(static[s] for s in mine) + work + max(sum(p[chunk[s]] * act[s] for s in mine) for p in patterns[r])

        if bare_peak[r] <= limit:
            for s in mine:
                out[s] = StageSpec(specs[s].blocks)
            report[r] = RecomputeChoice(r, 0, False, 0.0, True)
            continue
        # What the formula leaves out (the loss, receive buffers, workspaces: [Note: what a step holds] in
        # evaluate.py) does not depend on the choice; the simulated peak of the bare stages gives it.
        offset = bare_peak[r] - formula({s: set() for s in mine}, False)
        has_core = any(costs[b].core_bytes > 0 for s in mine for b in specs[s].blocks)
        best: tuple[float, bool, list[tuple[int, int]], int] | None = None
        for sel in (False, True) if selective and has_core else (False,):
            order = [(s, b) for s, b in _order(mine, specs, costs, most, sel, ckpt) if b in alone]
            chosen: dict[int, set[int]] = {s: set() for s in mine}
            taken = 0
            fits = formula(chosen, sel) + offset <= limit
            for s, b in order:
                if fits:
                    break
                chosen[s].add(b)
                taken += 1
                fits = formula(chosen, sel) + offset <= limit
            if not fits:
                continue
            replay = sum(recompute_cost(StageSpec(specs[s].blocks, tuple(b for b in specs[s].blocks if b in chosen[s]), sel))
                         for s in mine)
            if best is None or replay < best[0]:
                best = (replay, sel, order, taken)
        if best is None:
            report[r] = RecomputeChoice(r, sum(len(specs[s].recompute) for s in mine),
                                        any(specs[s].selective for s in mine), 0.0, False)
            continue
        todo[r] = (mine, best[2], best[1], best[3])

    def chosen_specs(taken: Mapping[int, int]) -> list[StageSpec]:
        trial = list(out)
        for r, (mine, order, sel, _) in todo.items():
            picked = {b for _, b in order[: taken[r]]}
            for s in mine:
                trial[s] = StageSpec(specs[s].blocks, tuple(b for b in specs[s].blocks if b in picked), sel)
        return trial

    # [Note: the simulated check] The formula's prefix is checked by the simulator, every rank in one
    # simulation per round: a rank over the limit takes its next block, then a rank that still fits
    # with one block fewer gives it back. Each round only moves ranks one way, so it ends.
    taken = {r: t[3] for r, t in todo.items()}
    for grow in (True, False):
        for _ in range(len(costs) + 1):
            if not todo:
                break
            trial = {r: taken[r] + (0 if grow else -1) for r in todo}
            if not grow:
                trial = {r: max(0, n) for r, n in trial.items()}
            peaks = _simulated_peaks(ev.stage_costs(chosen_specs(trial), mesh, schedule, sharding), schedule)
            moved = False
            for r, (_, order, _, _) in todo.items():
                if grow and peaks[r] > limit and taken[r] < len(order):
                    taken[r] += 1
                    moved = True
                elif not grow and trial[r] < taken[r] and peaks[r] <= limit:
                    taken[r] = trial[r]
                    moved = True
            if not moved:
                break
    final = _simulated_peaks(ev.stage_costs(chosen_specs(taken), mesh, schedule, sharding), schedule) if todo else []
    for r, (mine, order, sel, _) in todo.items():
        if final[r] > limit:  # not even every block: keep what the rank was given
            report[r] = RecomputeChoice(r, sum(len(specs[s].recompute) for s in mine),
                                        any(specs[s].selective for s in mine), 0.0, False)
            continue
        picked = {b for _, b in order[: taken[r]]}
        replay = 0.0
        for s in mine:
            out[s] = StageSpec(specs[s].blocks, tuple(b for b in specs[s].blocks if b in picked), sel)
            replay += recompute_cost(out[s])
        report[r] = RecomputeChoice(r, len(picked), sel, replay, True)
    return out, [report[r] for r in range(pp)]


def _simulated_peaks(stage_costs: Sequence[StageCost], schedule: Schedule) -> tuple[int, ...]:
    """Each pipeline rank's peak memory as the simulator finds it ([Note: memory over the step] in
    simulate.py), from the schedule's order alone: no timing is needed for it."""
    return tuple(p.total for p in peak_memory(stage_costs, schedule.name, schedule.microbatches, schedule.virtual_stages))


def recomputable_alone(ev: Evaluator) -> frozenset[int]:
    """The blocks the search may recompute alone: those with weights of their own that no other block
    reads (the runtime folds such a block into a module at its path; [Note: recompute in the runtime] in
    recompute.py). A tied embedding, or a head that only reads the embedding's weight, is not one: it
    frees nothing."""
    readers = ev.param_readers()
    table = ev.captured.params
    out = set()
    for i, b in enumerate(ev.pgraph.blocks):
        mine = [p for p in b.params if not table[p].is_buffer]
        if mine and all(readers[p] == 1 for p in mine):
            out.add(i)
    return frozenset(out)


def _order(mine: Sequence[int], specs: Sequence[StageSpec], costs: Mapping[int, BlockCost], most: Mapping[int, int],
           sel: bool, ckpt: Callable[[int, bool], float]) -> list[tuple[int, int]]:
    """The rank's (stage, block) pairs that free bytes when recomputed, most bytes per replayed second first
    (the checkpoint's own work, ``ckpt``, counted in the seconds)."""
    keyed = []
    for s in mine:
        for b in specs[s].blocks:
            c = costs[b]
            gain = c.saved_bytes - (c.core_bytes if sel else 0.0) - c.input_bytes
            secs = c.time.forward_s - (c.core_forward_s if sel else 0.0) + ckpt(b, sel)
            if gain <= 0:
                continue
            rate = most[s] * gain / secs if secs > 0 else float("inf")
            keyed.append((-rate, s, b))
    return [(s, b) for _, s, b in sorted(keyed)]
