"""Price a candidate partition and turn it into a scored ``Plan``.

Every planner (the baselines, the ILP, a hand-written plan) ends here: given
the blocks each stage owns, the mesh, the schedule and the per-node sharding,
``Evaluator`` asks the cost model for each stage's forward/backward time,
point-to-point and collective times and memory, runs the schedule simulator,
and returns a ``Plan`` with its predicted figures. It is the single place
where costs are assembled, so that all plans are judged the same way.

Tensor-parallel costs come from ``BlockLayoutCosts``: see [Note: layouts and
resharding] in sharding.py.

[Note: input and weight gradients]
Zero-bubble schedules run a stage's backward as two actions, ``I`` (gradients
of the stage's inputs) and ``W`` (gradients of its weights). For a layer
``y = x A`` the two are one matrix product each, the size of the forward's,
so a block with trainable parameters gets half of its backward as ``W``
(``WEIGHT_GRAD_SHARE``); a block without any has no ``W``. The attention
core (softmax, the score and value products) has no weights and all of its
backward is ``I``, so for a transformer layer this overstates ``W`` a
little. Where the profiler timed a block split as torch runs it, its measured
share replaces the half (gpt2-tiny's layers 0.42, the funnel's 0.49-0.51), and
the split's cost over the whole backward is priced from the same measurement:
[Note: the split backward per block] in partitioner/profile/__init__.py.
Recomputation replays the forward inside ``I``, never in ``W``.

Recomputation per block and selective recomputation are priced by ``stage_costs`` as
[Note: recompute per block] in recompute.py writes them.

[Note: what a step holds]
A rank's memory over the step, as the simulator walks it (simulate.py, [Note: memory
over the step]), is made of these terms, each sized from the graph's shapes and dtypes
(``stage_memory``) and checked against the storage meter (tests/test_memory_model.py):

- resident: weights, gradients and optimizer state (``resident_bytes``). Our runtime drops
  the gradients at the start of a step (``zero_grad(set_to_none=True)``) unless DDP owns
  them (its buckets are zeroed), so without DDP a stage's gradients exist only from its
  first backward on (``StageCost.fresh_grad_bytes``).
- per micro-batch in flight (from its forward to the end of its backward): the tensors
  autograd saves (``BlockCost.saved_bytes``, or the recomputed blocks' inputs, ``kept_inputs_bytes``:
  a sequence-split one made in the stage as its 1/tp shard, [Note: a recomputed block's inputs] in recompute.py,
  and a storage several of them keep once, [Note: tensors several blocks read] in graph.py);
  the stage's output, which torch's pipeline stage keeps for the backward; and on the last
  stage what the loss saves ([Note: the loss's memory] in cost_models/memory.py).
- receive buffers: torch's pipeline stage allocates, at its first step and for good, one
  buffer per micro-batch for its input (every stage but the first) and one for its output's
  gradient (every stage but the last): all M of each, whatever the schedule keeps in flight.
  What the stage saves of its received input is that buffer, so it is not counted again
  among the micro-batch's saved tensors (``saved_received_bytes``). Without the input
  buffers the model read a stage holding Llama's final norm alone 16.4% low (494,080
  predicted, 590,852 measured: 4 micro-batches, 2 in flight) and the last of two stages with
  eight micro-batches 3.0% low (tests/test_measure.py). A stage with a predecessor keeps,
  per micro-batch whose backward ran, the gradient of its received input (its buffer's
  ``.grad``) until the next step clears it.
- during one backward of the stage (``StageCost.backward_workspace_bytes``): the larger of
  the loss's backward (last stage) and, for the node whose backward needs most, the
  gradient of its output with the gradients of its inputs, plus the gradient received for
  the stage's output; under recomputation, what the replay holds at once: a recomputed
  block's or attention core's saved tensors, since the runtime checkpoints each on its own,
  also when every block recomputes ([Note: recompute per block] and [Note: recompute in the
  runtime] in recompute.py). The blocks back-propagate one at a time, so the node term and
  the replay are taken per block and the largest sum counts (``backward_work``). On the last
  stage the loss's saved tensor is freed by the loss's backward, before any block's, so it
  is taken off that sum; the stage's output (the logits) stays, as torch's pipeline stage
  keeps it to the end of the stage's backward (measured: the storage meter's tensors at the
  peak of gpt2-tiny pp2 1f1b recompute, rank 1).
- during the optimizer step, after every backward: its workspace, with the fp32 gradients of
  the masters under mixed precision ([Note: the optimizer step's workspace] in
  cost_models/memory.py). The runtime's AdamW is torch's fused one on CUDA (no workspace) and
  the single-tensor one on CPU (``optimizer_impl``); a cluster is taken as CPU processes when
  its name starts with ``local-cpu`` (the preset and the files ``autopart calibrate`` writes
  from it).

[Note: measured overheads in a plan]
On a cluster that ``autopart calibrate`` measured, the evaluator adds the
software costs of [Note: software overheads] (cost_models/overheads.py):
every block's compute times ``k`` (the ranks share the machine); per micro-batch, ``a_action`` to each stage's forward and backward, and under
tensor parallelism ``N a_node + D a_dtensor`` (forward) and
``N a_node_bwd + D a_dtensor_bwd`` (backward) to each block's compute; once
per step, each stage's optimizer step ``t_opt`` and each rank's ``a_step``
(on its first stage) as ``StageCost.after_s``. ``components`` reports the
action and step overheads as ``overhead_s`` (2 M a_action per stage) and
``t_opt`` as ``optimizer_s``; the node overheads stay in forward and backward
compute, where the run measures them. Without the calibration every term is
0, and plans are priced exactly as before.

[Note: ranks sharing cores]
On a CPU node with more ranks than cores, the calibrated compute slowdown
``k`` holds the factor ``o = ranks / cores`` (``overheads.oversubscribed``):
every op is priced as if every rank computed at once, each on ``1/o`` of a
core. A pipeline's ranks do not: in its warm-up and cool-down, and whenever
a rank waits for a transfer, the computing ones get the idle ones' cores,
less what a waiting rank still uses: ``b`` of a core
(``overheads.idle_core_use``: its transfers' threads, the schedule's work
between actions; a mean over calibrate's pipeline: gloo's loop thread's CPU
per op grows with the op's wall time on shared cores, 0.2-3.4 ms for a 4 KiB
receive on 4 ranks against 0.1-0.2 ms on 2, and a 4-rank pp2 x dp2 plan's gloo
threads used 22% of the 2 cores, benchmarks/results/2026-12-07-oversubscribed-replay.md).
The evaluator (``simulate.simulate_sharing``) finds
each pipeline rank's share by a fixed point: simulate the step, give each
pipeline rank ``r`` the factor

    f_r = mean over r's actions of max(1, n(t) / (C - b (pp - n(t)))) / o,   C = pp / o

(``simulate.core_shares``; ``n(t)`` the pipeline ranks computing at ``t``;
each stands for its tp x dp processes, which compute alike, so ``pp`` of them
share ``C`` cores' worth; never above 1, every rank at once), scale the rank's
forward and backward by it and simulate again, until no factor moves by
``SHARING_TOLERANCE``. Not scaled: the data-parallel reduction and the
optimizer step (every rank at once), and the memory walk (order only).

calibrate measures ``b`` and fits the transfer wait ``a_p2p`` on its busy
pipeline priced the same way, with each rank's own (CPU) time of its actions
times ``o`` as a plan's ops carry ``k``: an action of a few milliseconds is
not time-sliced, so "every rank at once" there reads each rank's time alone
(4 ranks on 2 cores: 0.97-1.12x). Fitted on the plain simulation instead,
``a_p2p`` took up the cores a bubble frees; fitted with the shares on the
actions' wall times, it read 3.1 ms and over-priced llama-tiny's 4-stage
plan by 27-58% (benchmarks/results/2026-12-07-p2p-fit-shared.md). Measured
on the 2-core machine (``benchmarks/core_use.py``): a running 4-rank plan's
waiting ranks use 0.1-0.3 of a core, and its actions got 0.60-0.79 of a core
beside one other computing rank, 0.91-0.99 alone; calibrate's pipeline reads ``b``
0.12-0.14. Alternated with the plain fit over three rounds, the two 4-rank
fidelity layouts moved within the rounds' spread (gpt2-tiny pp2 x dp2 zero1
-21% to -7%, llama-tiny pp4 +3% to -14%; compute still 17-38% under on pp4:
benchmarks/results/2026-12-07-core-shares.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import AbstractSet as Set, Any, Callable, Iterable, Mapping, Sequence

from cost_models import (
    MASTER_GRAD_CHUNK,
    OPTIMIZERS,
    CostModel,
    LossMemory,
    OpTime,
    loss_memory,
    optimizer_impl,
    optimizer_spec,
    optimizer_workspace_bytes,
    recorded_margin,
    static_bytes,
)

from .capture import CapturedModel, loss_kind
from .dp_sharding import hsdp_shard, spec as dp_spec
from .cluster import LOCAL_CPU, Cluster
from .errors import PlanError
from .graph import Block, PartitionGraph
from .plan import Mesh, ModelRef, Plan, Predicted, Schedule, SolverInfo, Stage, StageComponents, StagePredicted, Training
from .recompute import attention_core
from .sharding import BlockLayoutCosts, sharded_params
from .schedules import spec as schedule_spec, stage_rank
from .simulate import SimResult, StageCost, TiedSum, simulate_sharing
from .tp_strategies import OUTPUT_LAYOUT, STRATEGIES

__all__ = [
    "Evaluator", "StageSpec", "BlockCost", "KeptInput", "StageMemory", "WEIGHT_GRAD_SHARE", "kept_inputs_bytes",
    "recompute_terms", "backward_work",
]


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


WEIGHT_GRAD_SHARE = 0.5  # of a block's backward, when it has trainable parameters ([Note: input and weight gradients])

@dataclass(frozen=True, slots=True)
class StageSpec:
    """A stage as a planner proposes it: the blocks it owns and what it recomputes
    ([Note: recompute per block] in recompute.py)."""

    blocks: tuple[int, ...]
    recompute: tuple[int, ...] = ()  # the blocks (of ``blocks``) that replay their forward in backward
    selective: bool = False  # the other blocks replay their attention core

    def __post_init__(self) -> None:
        if not isinstance(self.recompute, tuple) or not set(self.recompute) <= set(self.blocks):
            raise PlanError(f"StageSpec.recompute must be a tuple of the stage's blocks, got {self.recompute!r}; "
                            "use StageSpec.whole(blocks, True) to recompute every block")

    @classmethod
    def whole(cls, blocks: Sequence[int], recompute: bool) -> "StageSpec":
        """A stage that recomputes all its blocks or none (what the baselines choose)."""
        blocks = tuple(blocks)
        return cls(blocks, blocks if recompute else ())

    @property
    def recomputes(self) -> bool:
        return bool(self.recompute) or self.selective


@dataclass(frozen=True, slots=True)
class KeptInput:
    """One storage that a recomputed block's checkpoint keeps, per micro-batch ([Note: a recomputed block's
    inputs] in recompute.py, [Note: tensors several blocks read] in graph.py)."""

    storage: str  # the node whose output owns the storage: the input itself, or the tensor it views
    producer: int  # the block that makes the input (-1: a model input)
    bytes: float  # the storage's bytes per micro-batch, whole
    split_less: float  # kept less when ``producer`` is in the stage: (1 - 1/tp) of it if sequence-split


@dataclass(frozen=True, slots=True)
class BlockCost:
    """One block's cost for one micro-batch on one device (all components kept for explain/diff)."""

    compute: OpTime  # forward/backward compute
    tp_comm: OpTime  # tensor-parallel collectives
    saved_bytes: float  # activations kept for backward
    # What recomputation keeps, the figure the pipeline ILP and the search add per block: the bytes
    # entering the block when the block before it is in its stage and recomputed too. Those that block
    # made sequence-split count 1/tp, and a storage that block keeps as well (a causal mask, rotary
    # cos/sin) counts 0 ([Note: a recomputed block's inputs] in recompute.py).
    input_bytes: float
    # Selective recomputation ([Note: recompute per block] in recompute.py): the attention core's
    # forward (compute and tp collectives) and the saved bytes that replaying it frees.
    core_forward_s: float = 0.0
    core_bytes: float = 0.0
    # The bytes entering the block, every storage whole and once (None: ``input_bytes``): what a recomputed
    # block keeps when it begins its stage; and per sequence-split input, (how many blocks before this one
    # its producer is, the bytes kept less when that producer is in the same stage).
    whole_input_bytes: float | None = None
    split_inputs: tuple[tuple[int, float], ...] = ()
    # The storages it keeps when recomputed, for the stage's count of each once (empty: only the figures
    # above are known, and each block's are added up).
    inputs: tuple[KeptInput, ...] = ()
    # The training loss, on the model's last block only ([Note: the loss's time] in cost_models/profiled.py):
    # in ``time``, so that the evaluator, the stage ILP, the search and the baselines all split with it; not
    # replayed by recomputation, and part of the input-gradient backward under a split backward.
    loss: OpTime = OpTime(0.0, 0.0)

    @property
    def time(self) -> OpTime:
        return self.compute + self.tp_comm + self.loss

    def kept_input_bytes(self, block: int, stage: Set[int]) -> float:
        """What this block, recomputed as block ``block`` of a stage made of the blocks ``stage``, keeps
        per micro-batch, counting only its own inputs ([Note: a recomputed block's inputs] in recompute.py):
        ``in_b = sum_t bytes_t / (tp if Q(src t) and src t in the stage else 1)``. ``kept_inputs_bytes``
        counts a storage that several blocks of the stage keep once."""
        whole = self.input_bytes if self.whole_input_bytes is None else self.whole_input_bytes
        return whole - sum(less for back, less in self.split_inputs if block - back in stage)


def kept_inputs_bytes(recomputed: Sequence[int], costs: Sequence[BlockCost], stage: Set[int]) -> float:
    """What the checkpoints of the blocks ``recomputed`` (their ``costs``, in that order) of a stage made of
    the blocks ``stage`` keep per micro-batch, each storage once ([Note: tensors several blocks read] in
    graph.py):

        in(R, S) = sum_{u kept by a block of R} max_{b in R keeps u} bytes_u / (tp if Q(u) and src u in S else 1)

    A block whose cost lists no storages (``BlockCost.inputs`` empty) adds its own ``kept_input_bytes``."""
    kept: dict[str, float] = {}
    alone = 0.0
    for b, c in zip(recomputed, costs):
        if not c.inputs:
            alone += c.kept_input_bytes(b, stage)
            continue
        for k in c.inputs:
            held = k.bytes - (k.split_less if k.producer in stage else 0.0)
            if held > kept.get(k.storage, -1.0):
                kept[k.storage] = held
    return alone + sum(kept.values())


@dataclass(frozen=True, slots=True)
class StageMemory:
    """One stage's memory terms beyond its resident bytes, per device ([Note: what a step holds])."""

    saved_bytes: float  # autograd's saved tensors per micro-batch in flight (the inputs under recompute)
    output_bytes: float  # the stage's output kept for its backward, per micro-batch in flight
    loss: LossMemory  # the loss's, on the last stage (zero elsewhere)
    grad_buffer_bytes: float  # receive buffers for the output's gradient, all micro-batches
    input_grad_bytes: float  # the received input's gradient kept per backward done
    backward_bytes: float  # live during one backward of the stage only
    optimizer_bytes: int  # the optimizer step's workspace for this stage's parameters
    # under a split backward, per micro-batch from its I to its W: the output gradients W starts from
    # ([Note: zero-bubble memory] in schedules.py); 0 otherwise
    weight_grad_bytes: float = 0.0
    # receive buffers for the input, all micro-batches (every stage but the first); what the stage saves
    # of its input is in them, and is not in ``saved_bytes``
    input_buffer_bytes: float = 0.0

    @property
    def buffer_bytes(self) -> float:
        """Held all step from its first forward on: the receive buffers of every micro-batch."""
        return self.grad_buffer_bytes + self.input_buffer_bytes

    @property
    def held_bytes(self) -> float:
        """Per micro-batch in flight: saved tensors, the kept output and the loss's saved tensor."""
        return self.saved_bytes + self.output_bytes + self.loss.saved_bytes


@dataclass(frozen=True, slots=True)
class _ShardingMemo:
    """What the evaluator keeps per sharding object (``Evaluator._memo``)."""

    sharding: Mapping[str, str]  # held, so that its id is not reused while it is cached
    split_params: set[str]  # ``sharding.sharded_params`` of it
    strategies: dict[int, tuple[str, ...]] = field(default_factory=dict)  # block -> its nodes' strategies
    weight_grad: dict[tuple[int, int], float] = field(default_factory=dict)  # (block, tp) -> weight_grad_bytes at the capture batch


@dataclass(frozen=True, slots=True)
class SplitTerms:
    """A stage's split backward beyond its whole one, per micro-batch (``Evaluator.split_terms``)."""

    input_s: float  # added to its I (the stage's input gradients)
    weight_s: float  # added to its W (the weight gradients)
    weight_share_s: float  # the measured weight half less ``WEIGHT_GRAD_SHARE``'s, moved from I to W


class Evaluator:
    """Prices partitions of one model on one cluster under one training set-up."""

    def __init__(
        self, pgraph: PartitionGraph, cluster: Cluster, cost_model: CostModel, training: Training,
        memory_margin: float | None = None,
    ) -> None:
        """``memory_margin``: the fraction added to every predicted peak when checking fit; default the
        recorded one ([Note: the memory margin] in cost_models/memory.py)."""
        self.pgraph = pgraph
        self.captured: CapturedModel = pgraph.captured
        self.cluster = cluster
        self.cost_model = cost_model
        self.training = training
        if training.optimizer not in OPTIMIZERS:
            raise PlanError(f"training.optimizer {training.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        self.optimizer = optimizer_spec(training.optimizer, training.dtype)  # fp32 adam-mixed: no master copy
        self.overheads = cluster.overheads  # measured software costs ([Note: measured overheads in a plan])
        cluster.device.flops(training.dtype)  # fail early: the device must support the dtype
        self._block_cache: dict[tuple, BlockCost] = {}
        self._own_cache: dict[tuple, BlockCost] = {}  # (block, its twins' key) -> its cost with its own storages
        self._inputs_cache: dict[int, tuple[tuple[str, int, int], ...]] = {}  # block -> (input, blocks back, bytes)
        self._kept_cache: dict[int, tuple[tuple[str, str, int, int], ...]] = {}  # block -> (input, storage, block, bytes)
        self._layout_cache: dict[tuple, BlockLayoutCosts] = {}
        # The search prices thousands of candidate stages; these depend on a few keys only.
        self._fsdp_units_cache: dict[tuple[tuple[int, ...], int], tuple[list[str], list[list[str]]]] = {}
        self._fsdp_groups_cache: dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._readers: dict[str, int] | None = None  # parameter -> how many blocks read it
        # Per sharding object (a sharding is never changed once made): _ShardingMemo.
        self._by_sharding: dict[int, _ShardingMemo] = {}
        self._saving: dict[int, int] = {}  # block index -> saving_nodes
        self._resident: dict[tuple, tuple[Set[str] | None, tuple[int, int]]] = {}  # resident_bytes's answers
        self._received: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}  # saved_received_bytes at the capture batch
        self._weight_grad_whole: dict[tuple[int, int], float] = {}  # (block, tp = 1) -> weight_grad_bytes at the capture batch
        self._loss_kind: str | None = None
        self._memory_cache: dict[tuple, float] = {}
        if memory_margin is None:
            try:
                memory_margin = recorded_margin().margin
            except ValueError as exc:
                raise PlanError(str(exc)) from None
        if not 0.0 <= memory_margin < 10.0:
            raise PlanError(f"memory margin {memory_margin!r} must be in [0, 10)")
        self.memory_margin = float(memory_margin)

    # --- blocks -----------------------------------------------------------------------

    def _memo(self, sharding: Mapping[str, str]) -> _ShardingMemo:
        """What is kept for ``sharding``, made once per sharding object."""
        memo = self._by_sharding.get(id(sharding))
        if memo is None or memo.sharding is not sharding:
            memo = self._by_sharding[id(sharding)] = _ShardingMemo(sharding, sharded_params(self.captured, sharding))
        return memo

    def split_params(self, sharding: Mapping[str, str]) -> set[str]:
        """``sharding.sharded_params`` of ``sharding``, computed once per sharding (the search prices
        thousands of candidate stages under a few shardings). Do not change the set."""
        return self._memo(sharding).split_params

    def _per_block(self, cache: dict, key: Any, block: Block, compute: Callable[[], Any]) -> Any:
        """``cache[key]``, computed by ``compute`` on a miss; kept only for this evaluator's own block of
        ``block.index`` (a block of another graph is computed each time)."""
        own = 0 <= block.index < len(self.pgraph.blocks) and self.pgraph.blocks[block.index] is block
        if own and key in cache:
            return cache[key]
        value = compute()
        if own:
            cache[key] = value
        return value

    def block_strategies(self, block: Block, sharding: Mapping[str, str]) -> tuple[str, ...]:
        """Each of ``block``'s nodes' strategy under ``sharding`` (``replicate`` where it names none)."""
        return self._per_block(self._memo(sharding).strategies, block.index, block,
                               lambda: tuple(sharding.get(n, "replicate") for n in block.nodes))

    def block_cost(self, block: Block, micro_batch: int, tp: int, sharding: Mapping[str, str]) -> BlockCost:
        """Cost of ``block`` per micro-batch of ``micro_batch`` samples under ``tp``-way sharding.

        Priced by ``BlockLayoutCosts`` (see [Note: layouts and resharding] in
        tp_strategies.py). Cached by the block's signature and strategies: repeated
        identical blocks are priced once.
        """
        strategies = self.block_strategies(block, sharding) if tp > 1 else ()
        split = self.split_inputs(block, micro_batch, tp, sharding)
        key = (block.signature, micro_batch, tp, strategies, split)
        hit = self._block_cache.get(key)
        if hit is None:
            tables = self.layout_costs(block, micro_batch, tp)
            chosen = dict(zip(block.nodes, strategies))
            compute, comm, saved = tables.evaluate(chosen)
            core_s, core_bytes = tables.core(chosen, attention_core(block.nodes, self.captured))
            if self.cpu_kernels:  # the math path's extra saved tensors belong to the attention core
                fallback = self.attention_fallback_bytes(block, micro_batch, tp, chosen)
                saved += fallback
                core_bytes += fallback
            k = self.overheads.compute_slowdown  # ranks sharing the machine ([Note: software overheads])
            if k != 1.0:
                compute, core_s = OpTime(compute.forward_s * k, compute.backward_s * k), core_s * k
            if tp > 1:
                compute = compute + self.tp_node_overhead(len(block.nodes), sum(s != "replicate" for s in strategies))
            whole = block.input_bytes * micro_batch / self.captured.batch_size
            hit = BlockCost(compute, comm, saved, whole - sum(less for back, less in split if back == 1),
                            core_s, min(core_bytes, saved), whole, split)
            self._block_cache[key] = hit
        # Twins share the figures above; what each keeps when recomputed names its own storages.
        own = (block.index, key)
        mine = self._own_cache.get(own)
        if mine is None:
            kept = self.kept_inputs(block, micro_batch, tp, sharding)
            before = ({k.storage for k in self.kept_inputs(self.pgraph.blocks[block.index - 1], micro_batch, tp, sharding)}
                      if block.index > 0 else set())
            first: dict[str, float] = {}  # storage -> kept when the block begins its stage
            marginal: dict[str, float] = {}  # storage -> kept when the block before it is in its stage
            for k in kept:
                first[k.storage] = max(first.get(k.storage, 0.0), k.bytes)
                if k.storage not in before:
                    held = k.bytes - (k.split_less if block.index > 0 and k.producer == block.index - 1 else 0.0)
                    marginal[k.storage] = max(marginal.get(k.storage, 0.0), held)
            mine = replace(hit, input_bytes=sum(marginal.values()), whole_input_bytes=sum(first.values()), inputs=kept)
            if block.index == len(self.pgraph.blocks) - 1:  # the loss runs on the model's outputs, after it
                mine = replace(mine, loss=self.loss_time(micro_batch))
            self._own_cache[own] = mine
        return mine

    def loss_time(self, micro_batch: int) -> OpTime:
        """The training loss's forward and backward per micro-batch of ``micro_batch`` samples, where the cost
        model measured it, times the ranks' compute slowdown ([Note: the loss's time] in cost_models/profiled.py)."""
        t = self.cost_model.loss_time(self.loss_kind(), self.pgraph.output_bytes * micro_batch / self.captured.batch_size)
        k = self.overheads.compute_slowdown  # as every op's ([Note: software overheads])
        return OpTime(t.forward_s * k, t.backward_s * k)

    def kept_inputs(self, block: Block, micro_batch: int, tp: int, sharding: Mapping[str, str]) -> tuple[KeptInput, ...]:
        """The storages ``block``'s checkpoint keeps when it is recomputed, one per input (two inputs may share
        one), per micro-batch of ``micro_batch`` samples ([Note: tensors several blocks read] in graph.py); a
        view of a parameter or buffer keeps nothing more."""
        found = self._kept_cache.get(block.index)
        if found is None:
            found = []
            for i in block.inputs:
                storage = self.pgraph.storage_of(i)
                if storage is not None:
                    producer = self.pgraph.block_of(i) if i in self.pgraph.read_outside else -1
                    found.append((i, storage[0], producer, storage[1]))
            found = self._kept_cache[block.index] = tuple(found)
        per = micro_batch / self.captured.batch_size
        return tuple(
            KeptInput(storage, producer, nbytes * per,
                      nbytes * per * (1 - 1 / tp) if tp > 1 and OUTPUT_LAYOUT[sharding.get(name, "replicate")] == "Q"
                      else 0.0)
            for name, storage, producer, nbytes in found
        )

    def split_inputs(self, block: Block, micro_batch: int, tp: int,
                     sharding: Mapping[str, str]) -> tuple[tuple[int, float], ...]:
        """Per input of ``block`` that a ``Q`` node makes (sequence-split), in the order of their names:
        (how many blocks before ``block`` its producer is, ``bytes (1 - 1/tp)`` per micro-batch): what a
        recomputed ``block`` keeps less of it when the producer is in its stage ([Note: a recomputed
        block's inputs] in recompute.py). Empty without tensor parallelism."""
        if tp <= 1:
            return ()
        inputs = self._inputs_cache.get(block.index)
        if inputs is None:
            inside = set(block.nodes)
            names = sorted({i for n in block.nodes for i in self.captured.nodes[n].inputs
                            if i not in inside and i in self.pgraph.read_outside})
            inputs = self._inputs_cache[block.index] = tuple(
                (i, block.index - self.pgraph.block_of(i), self.captured.nodes[i].output_bytes) for i in names)
        per = micro_batch / self.captured.batch_size * (1 - 1 / tp)
        return tuple((back, nbytes * per) for name, back, nbytes in inputs
                     if OUTPUT_LAYOUT[sharding.get(name, "replicate")] == "Q")

    def attention_fallback_bytes(self, block: Block, micro_batch: int, tp: int, strategies: Mapping[str, str]) -> float:
        """What fused attention with dropout saves beyond the fused kernels' accounting on CPU.

        [Note: attention with dropout on CPU]
        The capture counts a fused attention kernel's saved tensors ([Note: attention memory] in
        capture.py). torch's CPU flash kernel has no dropout, so with ``dropout_p > 0`` the math
        path runs: it saves copies of q, k and v (as the fused kernels save them), the softmax
        probabilities, dropout's mask (in the probabilities' dtype, on CPU) and the dropped
        probabilities, ``3 b h s_q s_k`` elements, and neither the output nor the log-sum-exp.
        Measured against the storage meter in tests/test_memory_model.py.
        """
        extra = 0.0
        for name in block.nodes:
            n = self.captured.nodes[name]
            if "scaled_dot_product" not in n.target or "dropout" not in n.variant.split(",") or not n.outputs:
                continue
            out = n.outputs[0]
            key = self.captured.nodes[n.inputs[1]].outputs[0] if len(n.inputs) > 1 else out
            rows = _numel(out.shape[:-1])  # b h s_q
            scores = rows * key.shape[-2] * (out.bytes // max(1, _numel(out.shape)))  # b h s_q s_k, output's dtype
            lse = rows * 4  # fp32
            extra += (3 * scores - out.bytes - lse) / (tp if strategies.get(name, "replicate") != "replicate" else 1)
        return extra * micro_batch / self.captured.batch_size

    def tp_node_overhead(self, nodes: int, on_dtensors: int) -> OpTime:
        """``(N a_node + D a_dtensor, N a_node_bwd + D a_dtensor_bwd)`` of a block of ``N`` nodes, ``D`` of them
        on DTensors, run by the tensor-parallel interpreter ([Note: software overheads]); 0 uncalibrated."""
        o = self.overheads
        return OpTime(nodes * o.tp_node_s + on_dtensors * o.dtensor_op_s,
                      nodes * o.tp_node_backward_s + on_dtensors * o.dtensor_op_backward_s)

    def optimizer_time(self, params: Iterable[str], tp: int, dp: int, split_params: Set[str],
                       dp_group: Sequence[int]) -> float:
        """``t_opt`` of one rank's share of ``params`` ([Note: software overheads]): ``T a_tensor +
        P (w + g + o) / B_opt`` over the tensors it updates (under ZeRO-2/3 every tensor's shard, each
        also paying ``a_opt_dtensor``), and under ZeRO-1 one broadcast per tensor from
        its owner, priced as an all-gather of the tensor's ``1/dp`` share, and ``a_zero1`` per tensor. 0 on an
        uncalibrated cluster."""
        o = self.overheads
        if (o.optimizer_tensor_s == 0.0 and o.optimizer_bandwidth == 0.0 and o.optimizer_dtensor_s == 0.0
                and o.zero1_tensor_s == 0.0):
            return 0.0
        table = self.captured.params
        mine = sorted(p for p in params if table[p].trainable and not table[p].is_buffer)  # a fixed sum order
        level = dp_spec(self.training.dp_sharding)
        share = dp if dp > 1 and level.shards_optimizer else 1
        fsdp = dp > 1 and level.uses_fsdp  # every rank updates every tensor's 1/dp shard, a DTensor
        elements = sum(table[p].numel // (tp if p in split_params else 1) for p in mine)
        per_param = table[mine[0]].bytes // max(1, table[mine[0]].numel) if mine else 0
        spec = self.optimizer
        t = o.optimizer_time(len(mine) if fsdp else len(mine) / share, elements / share,
                             per_param + spec.grad_bytes + spec.state_bytes, dtensors=fsdp)
        if share > 1 and not level.uses_fsdp:  # ZeroRedundancyOptimizer broadcasts each updated tensor
            t += sum(self.cost_model.collective_time(  # priced as an all-gather of the tensor's share
                "broadcast", table[p].bytes / (tp if p in split_params else 1) / dp, dp_group) for p in mine)
            t += len(mine) * o.zero1_tensor_s  # and does its own work per tensor ([Note: software overheads])
        return t

    def layout_costs(self, block: Block, micro_batch: int, tp: int) -> BlockLayoutCosts:
        """The per-node cost tables of ``block`` (per block: its boundary can differ from its twins')."""
        key = (block.index, micro_batch, tp)
        tables = self._layout_cache.get(key)
        if tables is None:
            tables = BlockLayoutCosts(
                self.captured, block, tp, micro_batch, self.cost_model, self.training.dtype,
                self.pgraph.read_outside, self.pgraph.model_outputs,
            )
            self._layout_cache[key] = tables
        return tables

    def resident_bytes(
        self, params: Iterable[str], tp: int, dp: int, split_params: Set[str], dp_group: Sequence[int] | None = None
    ) -> tuple[int, int]:
        """(weights + gradients + optimizer state, gradient bytes) on one device for ``params``, at rest.

        Parameters in ``split_params`` are divided over tp. ZeRO-1 divides the optimizer state
        over dp; ZeRO-2/3 (FSDP) divide weights, gradients, masters and state, each tensor in
        ``torch.chunk``'s dim-0 chunks, of which the first rank's is the largest
        ([Note: sharding levels] in dp_sharding.py). The one place that turns parameters into
        resident memory. HSDP shards over the dp ranks of one node of ``dp_group`` (default: the
        first stage's).
        """
        params = tuple(params)
        # Cached: the search asks again for the same stage's parameters under each schedule and
        # micro-batching. ``split_params`` matters only under tp; the cache holds the set it was given.
        key = (params, tp, dp, id(split_params) if tp > 1 else 0, None if dp_group is None else tuple(dp_group))
        hit = self._resident.get(key)
        if hit is not None and (tp == 1 or hit[0] is split_params):
            return hit[1]
        out = self._resident_bytes(params, tp, dp, split_params, dp_group)
        self._resident[key] = (split_params if tp > 1 else None, out)
        return out

    def _resident_bytes(
        self, params: tuple[str, ...], tp: int, dp: int, split_params: Set[str], dp_group: Sequence[int] | None
    ) -> tuple[int, int]:
        table = self.captured.params
        level = dp_spec(self.training.dp_sharding)
        if level.uses_fsdp and dp > 1:
            dp = len(self.fsdp_groups(dp_group if dp_group is not None else Mesh(1, tp, dp).dp_group(0))[0])
            share = sum(self._fsdp_share(p, tp if p in split_params else 1, dp) for p in params if table[p].trainable)
            wbytes = sum(table[p].bytes if table[p].is_buffer else
                         self._fsdp_share(p, tp if p in split_params else 1, dp) * table[p].bytes // max(1, table[p].numel)
                         for p in params)
            opt = self.optimizer
            return int(wbytes + share * (opt.grad_bytes + opt.state_bytes)), share * opt.grad_bytes
        count = sum(table[p].numel // (tp if p in split_params else 1) for p in params if table[p].trainable)
        wbytes = sum(table[p].bytes // (tp if p in split_params else 1) for p in params)
        zero1 = level.shards_optimizer and not level.uses_fsdp
        return static_bytes(count, wbytes, self.optimizer, dp, zero1), count * self.optimizer.grad_bytes

    def _fsdp_share(self, name: str, tp: int, dp: int) -> int:
        """Elements of parameter ``name`` (its tp shard) on the first dp rank: FSDP2 keeps dim-0 chunks
        of ``ceil(rows / dp)`` rows. A tp-split parameter is counted as ``numel / tp`` cut over dp by
        elements (which dim tp split is not known here)."""
        info = self.captured.params[name]
        if tp > 1 or not info.shape:
            return -(-(info.numel // tp) // dp)
        rows = info.shape[0]
        return -(-rows // dp) * (info.numel // max(1, rows))

    def fsdp_groups(self, dp_group: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the ranks FSDP shards over, the ranks each shard is replicated over) for a stage's dp group:
        all of it and none for ZeRO-2/3; for HSDP the dp ranks of the first rank's node, and the first
        rank's counterparts on the other nodes ([Note: sharding levels] in dp_sharding.py)."""
        group = tuple(dp_group)
        if not dp_spec(self.training.dp_sharding).within_node:
            return group, ()
        hit = self._fsdp_groups_cache.get(group)
        if hit is None:
            shard = hsdp_shard(group, self.cluster.node_of)
            hit = self._fsdp_groups_cache[group] = (group[:shard], group[::shard])
        return hit

    def fsdp_collectives(self, weight_bytes: float, grad_bytes: float, dp_group: Sequence[int]) -> tuple[float, float]:
        """(one all-gather of ``weight_bytes``, the gradients' reduction) of one unit over a stage's dp
        group: a reduce-scatter over the shard group, and under HSDP the shard's all-reduce across nodes."""
        shard, rep = self.fsdp_groups(dp_group)
        gather = self.cost_model.collective_time("all_gather", weight_bytes, shard)
        reduce = self.cost_model.collective_time("reduce_scatter", grad_bytes, shard)
        if len(rep) > 1:
            reduce += self.cost_model.collective_time("all_reduce", grad_bytes / len(shard), rep)
        return gather, reduce

    def param_readers(self) -> Mapping[str, int]:
        """How many blocks read each parameter (counted once per evaluator)."""
        if self._readers is None:
            self._readers = {}
            for b in self.pgraph.blocks:
                for p in b.params:
                    self._readers[p] = self._readers.get(p, 0) + 1
        return self._readers

    def fsdp_units(self, blocks: Sequence[int], tp: int) -> tuple[list[str], list[list[str]]]:
        """(the stage root's parameters, each block unit's parameters) as the runtime wraps them
        ([Note: FSDP units] in fsdp.py): a block is its own unit when no other block reads its
        parameters; shared parameters, and every parameter under tp, stay with the root."""
        key = (tuple(blocks), tp)
        hit = self._fsdp_units_cache.get(key)
        if hit is not None:
            return list(hit[0]), [list(u) for u in hit[1]]
        readers = self.param_readers()
        table = self.captured.params
        root: list[str] = []
        seen: set[str] = set()
        units: list[list[str]] = []
        for b in key[0]:
            mine = [p for p in self.pgraph.blocks[b].params if not table[p].is_buffer]
            if tp == 1 and mine and all(readers[p] == 1 for p in mine):
                units.append(mine)
            else:
                for p in mine:
                    if p not in seen:
                        seen.add(p)
                        root.append(p)
        self._fsdp_units_cache[key] = (root, units)
        return list(root), [list(u) for u in units]

    def fsdp_costs(
        self, blocks: Sequence[int], mesh: Mesh, stage_rank_index: int, split_params: Set[str], fwd: float, bwd: float,
    ) -> tuple[float, float, float, float]:
        """(transient bytes, exposed forward s, exposed backward s, total collective s) of one stage
        under ZeRO-2/3 for one micro-batch.

        [Note: FSDP prefetch overlap]
        Per micro-batch the stage all-gathers its weights in forward (and again in backward under
        ZeRO-3) and reduce-scatters its gradients in backward, unit by unit, over the dp group,
        priced with the cluster's link model: one collective per unit, so ``X`` is the sum of the
        units' collectives and pays the link's latency ``n`` times. Each unit also pays FSDP's
        software cost per pass, measured by calibration (``a_fsdp`` per forward and per ZeRO-3
        regather, ``a_fsdp_bwd`` per backward: [Note: software overheads]), on top of the exposed
        collectives: it is the rank's own work, which nothing hides. FSDP2 prefetches the next unit's all-gather while
        the current unit computes, so the collectives of all units but one overlap that pass's
        compute: with ``n`` units, a pass with compute ``C`` and collectives ``X`` exposes
        ``X / n + max(0, X (n - 1) / n - C)`` (the first unit's gather, or the last unit's
        reduce-scatter, cannot hide; the rest hide behind compute as far as it lasts). This
        assumes a GPU's separate communication stream; on a cluster whose calibration measured
        that collectives overlap only the fraction ``c`` of compute (``Overheads.comm_overlap``),
        they hide behind ``c C`` only. On this machine's CPU (``cpu_kernels``) nothing hides,
        whatever ``c``: FSDP2 overlaps through streams, and a CPU has none, so its all-gathers
        (``unshard_async_op`` is False unless set) and reduce-scatters block the rank until done
        (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py). ``c`` is measured on an
        ``async_op`` all-reduce, as DDP issues its buckets (gloo runs it on its own thread);
        applied to FSDP (``c`` 0.16-0.83) it hid 9-41% of a llama-tiny dp=2 ZeRO-3 step's
        collectives, 5-22 ms a step, that the run did not hide
        (benchmarks/results/2026-12-07-fsdp-calibration.md).
        Transient bytes: ZeRO-3 holds the root's gathered weights and two block units' (the one
        computing and the prefetched one), ZeRO-2 the whole stage's; both hold the root's
        unsharded gradients through the backward and one block unit's until its reduce-scatter.
        A recomputed block replays its forward inside its own backward, after FSDP's pre-backward
        hook has regathered its unit, and FSDP2 skips its forward hooks then: the replay gathers
        nothing more, whether some blocks recompute or all ([Note: recompute in the runtime] in
        recompute.py; counted on gloo: a dp=2 ZeRO-3 step of GPT-2 makes the same 28 all-gathers
        with every block recomputed as with none).
        """
        level = dp_spec(self.training.dp_sharding)
        table = self.captured.params
        root, units = self.fsdp_units(blocks, mesh.tp)

        def wbytes(ps: Iterable[str]) -> float:
            return float(sum(table[p].bytes // (mesh.tp if p in split_params else 1) for p in ps))

        def gbytes(ps: Iterable[str]) -> float:
            return float(sum(table[p].numel // (mesh.tp if p in split_params else 1)
                             for p in ps if table[p].trainable) * self.optimizer.grad_bytes)

        unit_w = sorted((wbytes(u) for u in units), reverse=True)
        unit_g = max((gbytes(u) for u in units), default=0.0)
        if level.reshard_after_forward:
            held = wbytes(root) + sum(unit_w[:2])
        else:
            held = wbytes(root) + sum(unit_w)
        transient = held + gbytes(root) + unit_g
        group = mesh.dp_group(stage_rank_index)
        gather = scatter = 0.0
        for u in ([root] if root else []) + units:  # one all-gather and one reduce-scatter per unit
            g, r = self.fsdp_collectives(wbytes(u), gbytes(u), group)
            gather, scatter = gather + g, scatter + r
        n = len(units) + (1 if root else 0)

        o = self.overheads
        overlap = self.fsdp_overlap

        def exposed(x: float, compute: float) -> float:
            hidden = compute if overlap == 1.0 else overlap * compute  # [Note: software overheads]
            return x / n + max(0.0, x * (n - 1) / n - hidden) if n else 0.0

        gathers = level.gathers_per_microbatch
        f = exposed(gather, fwd) + n * o.fsdp_unit_s
        b = exposed(gather * (gathers - 1) + scatter, bwd) + n * (o.fsdp_unit_backward_s + (gathers - 1) * o.fsdp_unit_s)
        return transient, f, b, gather * gathers + scatter

    @property
    def fsdp_overlap(self) -> float:
        """The share of a pass's compute that FSDP's collectives run beside ([Note: FSDP prefetch overlap])."""
        return 0.0 if self.cpu_kernels else self.overheads.comm_overlap

    @property
    def memory_limit_bytes(self) -> int:
        """Device memory less the reserve: a plan fits when its peak plus the margin is within it."""
        return int(self.cluster.device.memory_bytes * (1 - self.training.memory_reserve))

    @property
    def usable_memory_bytes(self) -> float:
        """The largest predicted peak that fits: the limit less the memory margin."""
        return self.memory_limit_bytes / (1 + self.memory_margin)

    # --- memory beyond the resident bytes ([Note: what a step holds]) -------------------

    @property
    def cpu_kernels(self) -> bool:
        """Whether the cluster's devices are this machine's CPU processes (torch's CPU kernels)."""
        return self.cluster.name.startswith(LOCAL_CPU)

    def loss_kind(self) -> str:
        """The loss ``autopart run`` trains with ([Note: the loss's memory] in cost_models/memory.py)."""
        if self._loss_kind is None:
            self._loss_kind = loss_kind(self.captured)
        return self._loss_kind

    def saving_nodes(self, block: Block) -> int:
        """The nodes of ``block`` that save a tensor for their backward (an input, their output, or an
        intermediate): a checkpoint hooks each such tensor ([Note: software overheads])."""
        nodes = self.captured.nodes
        return self._per_block(self._saving, block.index, block, lambda: sum(
            1 for n in (nodes[name] for name in block.nodes) if n.saved_inputs or n.saves_output or n.saved_bytes > 0))

    def checkpoint_time(self, spec: StageSpec, costs: Sequence[BlockCost]) -> tuple[float, float]:
        """(forward, backward) seconds per micro-batch of the stage's ``torch.utils.checkpoint`` calls' own
        work (``costs`` in ``spec.blocks`` order; [Note: software overheads])."""
        saving = [self.saving_nodes(self.pgraph.blocks[b]) for b in spec.blocks]
        return self.overheads.checkpoint_time(*checkpoint_calls(spec, costs, saving))

    def node_backward_bytes(self, block: Block, micro_batch: int) -> float:
        """The most one node's backward holds at once in ``block``: the gradient of its output and the
        gradients of its inputs that need one, per micro-batch of ``micro_batch`` samples. Views
        make no gradient of their own."""
        key = ("bwd", block.signature, micro_batch)
        hit = self._memory_cache.get(key)
        if hit is None:
            nodes = self.captured.nodes
            most = 0
            for name in block.nodes:
                n = nodes[name]
                if not n.needs_grad or n.is_view or not n.outputs:
                    continue
                grads = sum(nodes[i].output_bytes for i in set(n.inputs) if nodes[i].needs_grad)
                most = max(most, n.output_bytes + grads)
            hit = self._memory_cache[key] = most * micro_batch / self.captured.batch_size
        return hit

    def saved_received_bytes(self, spec: StageSpec, micro_batch: int, tp: int) -> float:
        """Of what stage ``spec`` keeps for its backward per micro-batch, the tensors it receives from the
        stage before (made by an earlier stage, or a model input passed on), each storage once: torch's
        receive buffer holds them ([Note: what a step holds]). A recomputed block's checkpoint keeps its
        inputs, another block what its nodes save."""
        key = (tuple(spec.blocks), spec.recompute)
        total = self._received.get(key)
        if total is None:
            nodes, pgraph = self.captured.nodes, self.pgraph
            chosen = set(spec.recompute)
            inside = {n for b in spec.blocks for n in pgraph.blocks[b].nodes}
            received: dict[str, int] = {}
            for b in spec.blocks:
                block = pgraph.blocks[b]
                names = block.inputs if b in chosen else {i for n in block.nodes for i in nodes[n].saved_inputs}
                for name in names:
                    storage = pgraph.storage_of(name) if name in nodes else None
                    if storage is None or storage[0] in inside:
                        continue
                    received[storage[0]] = storage[1]
            total = self._received[key] = sum(received.values())
        return total * micro_batch / self.captured.batch_size / tp

    def stage_memory(
        self, s: int, stages: Sequence[StageSpec], costs: Sequence[BlockCost], mesh: Mesh, schedule: Schedule,
        crossing: Sequence[int], params: Iterable[str], split_params: Set[str], sharding: Mapping[str, str] = {},
    ) -> StageMemory:
        """Stage ``s``'s memory terms ([Note: what a step holds]); ``costs`` are its blocks' costs."""
        mbs, M, tp = schedule.micro_batch_size, schedule.microbatches, mesh.tp
        per_mb = mbs / self.captured.batch_size
        splits = schedule_spec(schedule.name).splits_backward
        spec = stages[s]
        blocks = [self.pgraph.blocks[b] for b in spec.blocks]
        last = s == len(stages) - 1
        if last:
            out = self.pgraph.output_bytes * per_mb
            loss = loss_memory(self.loss_kind(), int(out))
        else:
            out = crossing[s] * mbs / self.captured.batch_size / tp
            loss = LossMemory(0, 0)
        received = crossing[s - 1] * mbs / self.captured.batch_size / tp if s > 0 else 0.0
        # Each recomputed block (all of them or some) and attention core is checkpointed on its own, so
        # the stage keeps each one's inputs and its backward replays one at a time ([Note: recompute per
        # block] in recompute.py).
        saved = recompute_terms(spec, costs)[0]
        # torch's stage receives each micro-batch's input into a buffer of its own, made for all M at its
        # first forward and kept; a received tensor the stage saves for its backward is that buffer.
        if s > 0:
            saved -= min(saved, self.saved_received_bytes(spec, mbs, tp))
        # One block's backward at a time: its nodes' gradients beside its own replay; and on the last stage
        # the loss's saved tensor is freed by the loss's backward, before any block's ([Note: what a step holds]).
        during = backward_work(spec, costs, [self.node_backward_bytes(b, mbs) for b in blocks])
        backward = max(float(loss.backward_bytes), (0.0 if last else out) + during - loss.saved_bytes)
        table = self.captured.params
        level = dp_spec(self.training.dp_sharding)
        shard = mesh.dp if (level.uses_fsdp or level.shards_optimizer) and mesh.dp > 1 else 1
        numels = [table[p].numel // (tp if p in split_params else 1) for p in params if table[p].trainable]
        if shard > 1 and level.uses_fsdp:  # FSDP shards every parameter
            numels = [-(-n // shard) for n in numels]
        masters = numels
        # ZeRO-1 gives each rank whole parameters, a 1/dp share of them (the largest may be among them),
        # but the fp32 gradients of every master, all at once ([Note: the optimizer step's workspace]).
        zero1 = shard > 1 and not level.uses_fsdp
        impl = optimizer_impl("cpu" if self.cpu_kernels else "cuda")
        if zero1 and impl != "single":
            numels = [-(-n // shard) for n in numels]
        chunk = None if zero1 or self.training.dtype == "fp16" else MASTER_GRAD_CHUNK
        work = optimizer_workspace_bytes(self.optimizer, numels, impl, master_numels=masters, master_chunk=chunk)
        # torch's first stage runs its whole backward at W, the others keep W's output gradients from I; the
        # last one detaches its output (the logits) at I, which frees it as those gradients arrive
        pending = self.weight_grad_bytes(blocks, mbs, tp, sharding) if s > 0 and splits else 0.0
        if last and pending:
            pending = max(0.0, pending - out)
        return StageMemory(
            saved_bytes=saved,
            output_bytes=out,
            loss=loss,
            grad_buffer_bytes=0.0 if last else M * out,
            input_grad_bytes=received,
            backward_bytes=backward,
            optimizer_bytes=work,
            weight_grad_bytes=pending,
            input_buffer_bytes=M * received,
        )

    def weight_grad_bytes(self, blocks: Sequence[Block], micro_batch: int, tp: int, sharding: Mapping[str, str]) -> float:
        """What a split backward's ``I`` keeps for its ``W`` per micro-batch ([Note: zero-bubble memory] in
        schedules.py): the gradient of the output of every node that applies a trainable weight to an
        input that needs a gradient, on this device (a column-parallel output is a 1/tp shard)."""
        # Cached per block at the capture batch: under tp per sharding, without tp the sharding does not matter.
        cache = self._memo(sharding).weight_grad if tp > 1 else self._weight_grad_whole
        total = sum(self._per_block(cache, (b.index, tp), b, lambda b=b: self._weight_grad_block(b, tp, sharding))
                    for b in blocks)
        return total * micro_batch / self.captured.batch_size

    def _weight_grad_block(self, block: Block, tp: int, sharding: Mapping[str, str]) -> float:
        """``weight_grad_bytes`` of one block at the capture batch."""
        nodes, table = self.captured.nodes, self.captured.params
        total = 0.0
        for name in block.nodes:
            n = nodes[name]
            if not n.outputs or not any(p in table and table[p].trainable for p in n.params):
                continue
            if not any(nodes[i].needs_grad for i in n.inputs if i in nodes):
                continue
            # a local output split over tp (column's features, a sequence-split norm's tokens) is a
            # 1/tp shard; a row linear's is whole before its all-reduce or reduce-scatter
            spec = STRATEGIES.get(sharding.get(name, "replicate"))
            split = spec is not None and spec.produces in ("S", "Q") and not (
                spec.output_all_reduce or spec.output_reduce_scatter)
            shard = tp if tp > 1 and split else 1
            total += n.output_bytes / shard
        return total

    # --- stages -----------------------------------------------------------------------

    def grad_nodes(self, spec: StageSpec) -> int:
        """The graph nodes of the stage whose outputs need a gradient: the autograd nodes a split backward
        walks and hooks ([Note: software overheads] in cost_models/overheads.py)."""
        return sum(self.block_grad_nodes(self.pgraph.blocks[b]) for b in spec.blocks)

    def split_terms(self, blocks: Sequence[Block], costs: Sequence[BlockCost], micro_batch: int) -> SplitTerms:
        """What torch's split backward adds to a stage past the first, per micro-batch, beyond its backward
        run whole ([Note: the split backward per block] in profile/__init__.py): a block whose split was
        profiled by its measured ``SplitShare``, the rest by the calibrated per-node and per-parameter
        overheads ([Note: software overheads] in cost_models/overheads.py), each parameter tensor once."""
        params = self.captured.params
        extra_i = extra_w = share = 0.0
        unmeasured: set[str] = set()
        grad_nodes = 0
        for b, c in zip(blocks, costs):
            whole = c.time.backward_s - c.loss.backward_s
            m = self.cost_model.split_share(b.name, micro_batch)
            if m is None:
                unmeasured.update(p for p in b.params if params[p].trainable)
                grad_nodes += self.block_grad_nodes(b)
                continue
            trainable = any(params[p].trainable for p in b.params)
            # the measured weight share replaces WEIGHT_GRAD_SHARE's half; the split's excess goes to I and W
            # in it. A split measured faster than whole (GPT-2's 50,257-row head: 0.89) is priced as whole: the
            # search's lower bounds ([Note: pruning] in solver/search.py) count every backward whole.
            excess = (max(1.0, m.ratio) - 1) * whole
            share += m.weight * whole - (WEIGHT_GRAD_SHARE * whole if trainable else 0.0)
            extra_i += (1 - m.weight) * excess
            extra_w += m.weight * excess
        o = self.overheads
        return SplitTerms(extra_i + o.split_backward_node_s * grad_nodes,
                          extra_w + o.split_backward_param_s * len(unmeasured), share)

    def block_grad_nodes(self, block: Block) -> int:
        """The block's graph nodes whose outputs need a gradient (``grad_nodes``, one block)."""
        nodes = self.captured.nodes
        return sum(1 for name in block.nodes if nodes[name].needs_grad)

    def stage_costs(
        self, stages: Sequence[StageSpec], mesh: Mesh, schedule: Schedule, sharding: Mapping[str, str]
    ) -> list[StageCost]:
        """The simulator's input: one ``StageCost`` per (virtual) stage."""
        mbs = schedule.micro_batch_size
        pp = mesh.pp
        split_params = self.split_params(sharding) if mesh.tp > 1 else set()
        stage_of = [0] * len(self.pgraph.blocks)
        for s, spec in enumerate(stages):
            for b in spec.blocks:
                stage_of[b] = s
        cuts = self.pgraph.crossings(stage_of)
        crossing = [c.bytes for c in cuts]
        sched = schedule_spec(schedule.name)
        layout = sched.layout
        # [Note: measured overheads in a plan]: per action, the schedule's runtime's
        action = self.overheads.schedule_action(sched.multi_stage, layout)
        params = self.captured.params
        first_stage: dict[int, int] = {}  # pipeline rank -> its lowest stage, which carries the per-step overhead
        for s in range(len(stages)):
            first_stage.setdefault(stage_rank(s, pp, layout), s)
        tied = self.tied_sums(stages, mesh, layout, split_params)
        out = []
        for s, spec in enumerate(stages):
            blocks = [self.pgraph.blocks[b] for b in spec.blocks]
            costs = [self.block_cost(b, mbs, mesh.tp, sharding) for b in blocks]
            fwd = sum(c.time.forward_s for c in costs)
            bwd = sum(c.time.backward_s for c in costs)
            wgt = sum(
                WEIGHT_GRAD_SHARE * (c.time.backward_s - c.loss.backward_s)
                for b, c in zip(blocks, costs)
                if any(params[p].trainable for p in b.params)
            )
            _, replay, _ = recompute_terms(spec, costs)  # [Note: recompute per block] in recompute.py
            bwd += replay
            ck_f, ck_b = self.checkpoint_time(spec, costs)  # [Note: software overheads]
            fwd += ck_f
            bwd += ck_b
            names = {p for b in spec.blocks for p in self.pgraph.blocks[b].params}
            split_i = split_w = 0.0  # torch's split backward, past the first stage
            if s > 0 and sched.splits_backward:
                split = self.split_terms(blocks, costs, mbs)
                split_i, split_w = split.input_s, split.weight_s
                wgt += split.weight_share_s
                if sched.split_throughout:  # every backward is split: part of the backward
                    bwd += split_i + split_w
                    wgt += split_w
                    split_i = split_w = 0.0
            mem = self.stage_memory(s, stages, costs, mesh, schedule, crossing, sorted(names), split_params, sharding)
            transient = 0.0
            static, grad_bytes = self.resident_bytes(names, mesh.tp, mesh.dp, split_params,
                                                     mesh.dp_group(stage_rank(s, pp, layout)))
            fsdp = dp_spec(self.training.dp_sharding).uses_fsdp and mesh.dp > 1
            # DDP's gradients are its buckets' views, zeroed at the step's start; otherwise they are
            # dropped and made again by the stage's first backward ([Note: what a step holds]).
            ddp = mesh.dp > 1 and not fsdp
            # [Note: software overheads]: each backward into gradients the stage holds adds into them; a
            # step's additions, spread over its micro-batches
            accumulations = schedule.microbatches if ddp else schedule.microbatches - 1
            accumulate = self.overheads.accumulate_time(grad_bytes, accumulations) / schedule.microbatches
            bwd += accumulate
            wgt += accumulate
            if fsdp:  # weights gathered per micro-batch, gradients reduce-scattered ([Note: FSDP prefetch overlap])
                gathered, f_exp, b_exp, _ = self.fsdp_costs(spec.blocks, mesh, stage_rank(s, pp, layout),
                                                            split_params, fwd, bwd)
                transient += gathered
                fwd, bwd = fwd + f_exp, bwd + b_exp
            rank = mesh.rank(stage_rank(s, pp, layout))
            send = grad_send = 0.0
            if s + 1 < len(stages):
                nbytes = crossing[s] * mbs / self.captured.batch_size
                dest = mesh.rank(stage_rank(s + 1, pp, layout))
                send = grad_send = self.cost_model.p2p_time(nbytes / mesh.tp, rank, dest)
                if dest != rank:  # [Note: software overheads]: a transfer between ranks that compute, per its tensors
                    send += self.overheads.transfer_wait(cuts[s].forward)
                    grad_send += self.overheads.transfer_wait(cuts[s].backward)
            dp_reduce = 0.0
            if mesh.dp > 1 and not fsdp:
                grad = grad_bytes
                dp_reduce = self.cost_model.collective_time("all_reduce", grad, mesh.dp_group(stage_rank(s, pp, layout)))
            # [Note: measured overheads in a plan]: per action (above), and once per step after the reduction.
            after = self.optimizer_time(names, mesh.tp, mesh.dp, split_params, mesh.dp_group(stage_rank(s, pp, layout)))
            if s == first_stage[stage_rank(s, pp, layout)]:
                after += self.overheads.step_s
            out.append(
                StageCost(
                    forward_s=fwd + action,
                    backward_s=bwd + action,
                    send_s=send,
                    grad_send_s=grad_send,
                    activation_bytes=int(mem.held_bytes),
                    static_bytes=int(static + transient),
                    dp_reduce_s=dp_reduce,
                    backward_weight_s=min(wgt, bwd),
                    fresh_grad_bytes=0 if ddp or fsdp else int(grad_bytes),
                    buffer_bytes=int(mem.buffer_bytes),
                    input_grad_bytes=int(mem.input_grad_bytes),
                    backward_workspace_bytes=int(mem.backward_bytes),
                    optimizer_workspace_bytes=int(mem.optimizer_bytes),
                    weight_grad_bytes=int(mem.weight_grad_bytes),
                    split_input_s=split_i,
                    split_weight_s=split_w,
                    after_s=after,
                    tied_sums=tied[s],
                )
            )
        return out

    def tied_sums(self, stages: Sequence[StageSpec], mesh: Mesh, layout: str,
                  split_params: Set[str]) -> list[tuple[TiedSum, ...]]:
        """Per stage, the weights it shares with a stage of another pipeline rank, each with the
        all-reduce of its gradient among the owning ranks at one (dp, tp) coordinate, as the runtime
        sums them ([Note: tied weights' gradient sums] in simulate.py): the gradient's tp shard when
        the weight is split, its FSDP shard under ZeRO-2/3. A rank's stages share one copy, so a
        weight held by the stages of one rank only is summed nowhere."""
        pp = mesh.pp
        holders: dict[str, list[int]] = {}  # shared weight -> the stages that read it
        for s, spec in enumerate(stages):
            for p in sorted({p for b in spec.blocks for p in self.pgraph.blocks[b].params}):
                if self.param_readers().get(p, 0) > 1 and self.captured.params[p].trainable:
                    holders.setdefault(p, []).append(s)
        out: list[list[TiedSum]] = [[] for _ in stages]
        for p, ss in sorted(holders.items()):
            ranks = sorted({stage_rank(s, pp, layout) for s in ss})
            if len(ranks) < 2:
                continue
            # the gradient this rank holds: its tp shard, and under ZeRO-2/3 FSDP's shard of it (resident_bytes)
            grad = self.resident_bytes([p], mesh.tp, mesh.dp, split_params, mesh.dp_group(ranks[0]))[1]
            seconds = self.cost_model.collective_time("all_reduce", float(grad), [mesh.rank(r) for r in ranks])
            for s in ss:
                out[s].append(TiedSum(p, seconds))
        return [tuple(x) for x in out]

    # --- plans ------------------------------------------------------------------------

    def make_plan(
        self,
        stages: Sequence[StageSpec],
        mesh: Mesh,
        schedule: Schedule,
        *,
        sharding: Mapping[str, str] | None = None,
        method: str,
        status: str = "HEURISTIC",
        started: float | None = None,
        objective: float | None = None,
        bound: float | None = None,
    ) -> tuple[Plan, SimResult]:
        """Price ``stages`` and return the ``Plan`` with its predicted figures, and the simulation."""
        sharding = dict(sharding or {})
        self._check_stages(stages, mesh, schedule)
        costs = self.stage_costs(stages, mesh, schedule, sharding)
        # each pipeline rank's work scaled to the cores it gets ([Note: ranks sharing cores])
        sim, costs, shares = simulate_sharing(costs, schedule.name, schedule.microbatches, schedule.virtual_stages,
                                              self.training.overlap_dp, self.overheads.comm_overlap,
                                              self.overheads.oversubscribed, self.overheads.idle_core_use)
        plan = self._assemble(stages, mesh, schedule, sharding, costs, sim, shares, method, status, started, objective,
                              bound)
        return plan, sim

    def score(self, plan: Plan) -> tuple[Plan, SimResult]:
        """Re-price a plan (e.g. hand-written or loaded from JSON) on this evaluator's model and cluster."""
        plan.check_matches(self.captured.fingerprint)
        node_of_key = self.captured.node_of_key
        # [Note: what a stage holds]: the stages' nodes are their modules' node keys, or refused
        plan = plan.with_blocks({b.name: tuple(self.captured.nodes[n].key for n in b.nodes) for b in self.pgraph.blocks})
        unknown = [k for k in plan.sharding if k not in node_of_key]
        if unknown:
            import difflib

            near = difflib.get_close_matches(unknown[0], list(node_of_key), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PlanError(
                f"sharding names node {unknown[0]!r}{hint}, which is not a node key of {self.captured.name} "
                "(keys are module/op#occurrence, listed by autopart inspect --nodes-table)"
                + (f" ({len(unknown)} unknown in all)" if len(unknown) > 1 else "")
            )
        specs = [self.spec_of(st) for st in plan.stages]
        return self.make_plan(
            specs,
            plan.mesh,
            plan.schedule,
            sharding={node_of_key[k]: v for k, v in plan.sharding.items()},
            method=plan.solver.method,
            status=plan.solver.status,
            objective=plan.solver.objective,
            bound=plan.solver.bound,
        )

    def spec_of(self, stage: Stage) -> StageSpec:
        """A plan's stage as the evaluator prices it."""
        return StageSpec(tuple(self.pgraph.block_index(m) for m in stage.modules),
                         tuple(self.pgraph.block_index(m) for m in stage.recompute), stage.selective)

    def _check_stages(self, stages: Sequence[StageSpec], mesh: Mesh, schedule: Schedule) -> None:
        n = len(self.pgraph.blocks)
        want = mesh.pp * schedule.virtual_stages
        if len(stages) != want:
            raise PlanError(f"{len(stages)} stages given, but pp={mesh.pp} x virtual_stages={schedule.virtual_stages} = {want}")
        if mesh.world_size != self.cluster.world_size:
            raise PlanError(
                f"mesh {mesh} uses {mesh.world_size} devices but cluster {self.cluster.name!r} has "
                f"{self.cluster.world_size}; pick pp*tp*dp = {self.cluster.world_size}"
            )
        seen: list[int] = []
        for i, st in enumerate(stages):
            if not st.blocks:
                raise PlanError(f"stage {i} owns no blocks; every stage needs at least one (fewer stages, or more blocks)")
            seen.extend(st.blocks)
        if sorted(seen) != list(range(n)):
            missing = sorted(set(range(n)) - set(seen))
            dup = sorted({b for b in seen if seen.count(b) > 1})
            names = lambda ids: ", ".join(self.pgraph.blocks[b].name for b in ids[:5])  # noqa: E731
            detail = (f"missing {names(missing)}" if missing else "") + (f" duplicated {names(dup)}" if dup else "")
            raise PlanError(f"stages must own every block exactly once: {detail.strip()}")
        for i, st in enumerate(stages):
            for a, b in zip(st.blocks, st.blocks[1:]):
                if b < a:
                    raise PlanError(
                        f"stage {i} lists block {self.pgraph.blocks[b].name} after {self.pgraph.blocks[a].name}; "
                        "list each stage's blocks in model order"
                    )
        position = {b: i for i, st in enumerate(stages) for b in st.blocks}
        for e in self.pgraph.edges:
            if position[e.src] > position[e.dst]:
                raise PlanError(
                    f"block {self.pgraph.blocks[e.dst].name} reads {self.pgraph.blocks[e.src].name}, "
                    "which is placed in a later stage; stages must follow the graph order"
                )

    def components(
        self, stages: Sequence[StageSpec], mesh: Mesh, schedule: Schedule, sharding: Mapping[str, str],
        costs: Sequence[StageCost], sim: SimResult, shares: Sequence[float] = (),
    ) -> list[StageComponents]:
        """Split the simulated step into its components, per stage (see [Note: where idle time goes]).

        Work (forward, backward, recomputation, tp collectives) is the stage's
        own per micro-batch figures times ``M`` (backward with the additions into held gradients
        and a split backward's excess, which run inside its actions); idle time is what the simulator
        recorded before the stage's actions; the rank's exposed reduction is
        shared by its stages by size, and the rank's wait for the slowest rank
        at the end of the step goes to the bubble of its last action's stage.
        The components of a rank's stages add up to the step time. ``shares`` scales each pipeline rank's
        work as ``simulate`` did (``costs`` are the scaled ones; [Note: ranks sharing cores]).
        """
        pp, M = mesh.pp, schedule.microbatches
        K = len(stages)
        last_end = [0.0] * pp
        last_stage = list(range(pp))
        for e in sim.events:  # rank-major, each rank in execution order
            last_end[e.rank], last_stage[e.rank] = e.end_s, e.action.stage
        tail = [0.0] * K
        exposed_share = [0.0] * K
        tied_share = [0.0] * K  # a rank's tied weights' sums, on its lowest stage that holds one
        layout = schedule_spec(schedule.name).layout
        action_s = self.overheads.schedule_action(schedule_spec(schedule.name).multi_stage, layout)
        first: dict[int, int] = {}  # pipeline rank -> its lowest stage (the one charged the per-step overhead)
        fsdp = dp_spec(self.training.dp_sharding).uses_fsdp and mesh.dp > 1  # ZeRO-2/3 runs FSDP's units
        for s in range(K):
            first.setdefault(stage_rank(s, pp, layout), s)
        for r in range(pp):
            mine = [s for s in range(K) if stage_rank(s, pp, layout) == r]
            after = sum(costs[s].after_s for s in mine)  # optimizer step and per-step overhead, after the reduction
            summed = sim.tied_sum_s[r] if sim.tied_sum_s else 0.0  # [Note: tied weights' gradient sums]
            tail[last_stage[r]] = max(0.0, sim.step_time_s - last_end[r] - sim.dp_exposed_s[r] - summed - after)
            holding = [s for s in mine if costs[s].tied_sums]
            if holding:
                tied_share[holding[0]] = summed
            reduce_total = sum(costs[s].dp_reduce_s for s in mine)
            for s in mine:
                if reduce_total > 0:
                    exposed_share[s] = sim.dp_exposed_s[r] * costs[s].dp_reduce_s / reduce_total
        out = []
        for s, spec in enumerate(stages):
            work = [self.block_cost(self.pgraph.blocks[b], schedule.micro_batch_size, mesh.tp, sharding) for b in spec.blocks]
            cf = sum(c.compute.forward_s for c in work)
            cb = sum(c.compute.backward_s for c in work)
            tf = sum(c.tp_comm.forward_s for c in work)
            tb = sum(c.tp_comm.backward_s for c in work)
            replay = recompute_terms(spec, work)[1]
            ck_f, ck_b = self.checkpoint_time(spec, work)
            cf += ck_f  # the checkpoints' own cost: in the passes that pay it
            replay += ck_b
            k = shares[stage_rank(s, pp, layout)] if shares else 1.0
            cf, cb, tf, tb, replay, action = cf * k, cb * k, tf * k, tb * k, replay * k, action_s * k
            # What the stage's actions take beyond compute, tp, replay and the per-action overhead. Under
            # ZeRO-2/3: the exposed gathers and scatters and FSDP's per-unit software cost. Otherwise it is
            # work of the backward itself, the additions into held gradients and torch's split of it
            # (stage_costs), which a run measures as backward compute.
            rest_b = max(0.0, costs[s].backward_s - action - (cb + tb) - replay)
            extra_f = extra_b = 0.0
            if fsdp:
                extra_f = max(0.0, costs[s].forward_s - action - (cf + tf))
                extra_b = rest_b
            else:
                cb += rest_b
            opt = costs[s].after_s - (self.overheads.step_s if first[stage_rank(s, pp, layout)] == s else 0.0)
            out.append(
                StageComponents(
                    forward_s=M * cf,
                    backward_s=M * cb,
                    recompute_s=M * replay,
                    tp_comm_s=M * (tf + tb),
                    p2p_s=sim.transfer_wait_s[s],
                    dp_reduce_s=exposed_share[s],
                    dp_gather_s=M * (extra_f + extra_b),
                    bubble_s=sim.wait_s[s] - sim.transfer_wait_s[s] + tail[s],
                    optimizer_s=opt,
                    overhead_s=2 * M * action + costs[s].after_s - opt,
                    tied_sum_s=tied_share[s],
                    dp_gather_forward_s=M * extra_f,
                )
            )
        return out

    def _assemble(self, stages, mesh, schedule, sharding, costs, sim, shares, method, status, started, objective,
                  bound) -> Plan:
        cap = self.captured
        dev = self.cluster.device
        limit = self.memory_limit_bytes
        pp = mesh.pp
        layout = schedule_spec(schedule.name).layout
        parts = self.components(stages, mesh, schedule, sharding, costs, sim, shares)
        out_stages = []
        for s, (spec, c) in enumerate(zip(stages, costs)):
            r = stage_rank(s, pp, layout)
            blocks = [self.pgraph.blocks[b] for b in spec.blocks]
            count, _ = self.pgraph.params_bytes(spec.blocks)
            out_stages.append(
                Stage(
                    index=s,
                    modules=tuple(b.name for b in blocks),
                    nodes=tuple(cap.nodes[n].key for b in blocks for n in b.nodes),  # [Note: stable node keys]
                    params=count,
                    ranks=mesh.stage_ranks(r),
                    recompute=tuple(self.pgraph.blocks[b].name for b in spec.blocks if b in set(spec.recompute)),
                    selective=spec.selective,
                    predicted=StagePredicted(
                        forward_s=c.forward_s,
                        backward_s=c.backward_s,
                        send_s=c.send_s,
                        static_bytes=c.static_bytes,
                        activation_bytes=sim.peak_parts[r].activations,
                        memory_bytes=sim.peak_memory_bytes[r],
                        busy_s=(c.forward_s + c.backward_s) * schedule.microbatches,
                        dp_reduce_s=c.dp_reduce_s,
                        components=parts[s],
                        workspace_bytes=sim.peak_parts[r].workspace,
                    ),
                )
            )
        step = sim.step_time_s
        gb = self.training.global_batch
        model_flops = (cap.forward_flops + cap.backward_flops) / cap.batch_size * gb
        tflops = model_flops / step / mesh.world_size / 1e12 if step > 0 else 0.0
        peak = max(sim.peak_memory_bytes)
        predicted = Predicted(
            step_time_s=step,
            samples_per_s=gb / step if step > 0 else 0.0,
            tflops_per_device=tflops,
            mfu=tflops * 1e12 / dev.flops(self.training.dtype),
            bubble_fraction=sim.bubble_fraction,
            peak_memory_bytes=int(peak),
            memory_limit_bytes=limit,
            fits=peak * (1 + self.memory_margin) <= limit,
            memory_margin=self.memory_margin,
        )
        return Plan(
            model=ModelRef(cap.name, cap.param_count, cap.fingerprint, cap.input_shapes, vocab_chunks=cap.vocab_chunks),
            cluster=self.cluster.to_dict(),
            mesh=mesh,
            schedule=schedule,
            stages=tuple(out_stages),
            training=self.training,
            solver=SolverInfo(
                method=method,
                status=status,
                objective=objective if objective is not None else step,
                bound=bound,
                wall_s=(time.perf_counter() - started) if started is not None else 0.0,
            ),
            predicted=predicted,
            sharding={cap.nodes[k].key: v for k, v in sharding.items() if v != "replicate"} if mesh.tp > 1 else {},
        )


def recompute_terms(spec: StageSpec, costs: Sequence[BlockCost]) -> tuple[float, float, float]:
    """(activation bytes per micro-batch in flight, seconds replayed in the backward, bytes live once
    during the replay) of a stage whose blocks cost ``costs`` (in ``spec.blocks`` order), as
    [Note: recompute per block] in recompute.py writes them:

        act  = in(R, s) + sum_{b not in R} (sv_b - σ core_b)
        rec  = sum_{b in R} f_b  + σ sum_{b not in R} fc_b
        work = max(max_{b in R} sv_b, σ max_{b not in R} core_b)

    ``in(R, s)`` is what the checkpoints keep, each storage once (``kept_inputs_bytes``). ``work`` is the
    largest replay alone; the stage's backward workspace pairs each replay with its own block's node
    gradients (``backward_work``)."""
    chosen = set(spec.recompute)
    stage = set(spec.blocks)
    redo = [(b, c) for b, c in zip(spec.blocks, costs) if b in chosen]
    # [Note: a recomputed block's inputs] in recompute.py
    act = kept_inputs_bytes([b for b, _ in redo], [c for _, c in redo], stage)
    replay = work = 0.0
    for b, c in zip(spec.blocks, costs):
        if b in chosen:
            replay += c.time.forward_s - c.loss.forward_s  # the loss is not in the checkpoint
            work = max(work, c.saved_bytes)
        elif spec.selective:
            act += c.saved_bytes - c.core_bytes
            replay += c.core_forward_s
            work = max(work, c.core_bytes)
        else:
            act += c.saved_bytes
    return act, replay, work


def checkpoint_calls(spec: StageSpec, costs: Sequence[BlockCost], saving: Sequence[int]) -> tuple[int, int]:
    """(calls, nodes): how many ``torch.utils.checkpoint`` calls one micro-batch of the stage makes, one
    per recomputed block and with ``selective`` one per other block with an attention core ([Note:
    recompute in the runtime] in recompute.py), and the graph nodes inside them that save a tensor for
    their backward (``saving``: each block's, ``Evaluator.saving_nodes``; one per core). ``costs`` and
    ``saving`` are in ``spec.blocks`` order. Each call and each such node costs the checkpoint's own
    machinery ([Note: software overheads])."""
    chosen = set(spec.recompute)
    calls = nodes = 0
    for b, c, n in zip(spec.blocks, costs, saving, strict=True):
        if b in chosen:
            calls, nodes = calls + 1, nodes + n
        elif spec.selective and c.core_forward_s > 0:
            calls, nodes = calls + 1, nodes + 1
    return calls, nodes


def backward_work(spec: StageSpec, costs: Sequence[BlockCost], node_bytes: Sequence[float]) -> float:
    """The most a stage's backward holds at once beyond what its micro-batch keeps: the blocks back-propagate
    one at a time, each with its own node's gradients (``node_bytes``, in ``spec.blocks`` order) beside its
    own replay ([Note: recompute per block] in recompute.py):

        max_b (nd_b + [b in R] sv_b + σ [b not in R] core_b)

    A replay and a node's gradients of two different blocks are never live together."""
    chosen = set(spec.recompute)
    most = 0.0
    for b, c, nd in zip(spec.blocks, costs, node_bytes):
        replay = c.saved_bytes if b in chosen else (c.core_bytes if spec.selective else 0.0)
        most = max(most, nd + replay)
    return most
