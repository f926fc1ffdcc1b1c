"""The Plan: the one artifact every planner produces and the runtime consumes.

Baselines, the ILP and a user's hand-written plan all produce a ``Plan``; the
simulator scores it, ``explain``/``diff`` read it, and the runtime runs it
without knowing who made it. It is frozen, serializes to JSON with a
``version`` (never pickle), and records what it was made for (model
fingerprint, cluster) so that it is refused for anything else.

Glossary: **stage** is a pipeline stage (with interleaving, a virtual stage:
``pp * virtual_stages`` of them, stage ``s`` on pipeline rank ``s % pp``);
**axis** is a mesh axis (``pp``, ``tp``, ``dp``); **micro-batch** is one slice
of the global batch. With the V-shaped schedules (``zbv``, ``dualpipev``) rank
``r`` holds stages ``r`` and ``2 * pp - 1 - r`` instead ([Note: stage layouts]
in schedules.py). The JSON schema is documented in ``docs/plan.md``.

[Note: what a stage holds]
A stage lists its ``modules`` (blocks, by name) and its ``nodes`` (FX nodes). The modules
are the source of truth: the simulator prices blocks, and the runtime derives the nodes it
runs from the modules (``Plan.with_blocks``, called by ``planner.check_plan`` on the model).
A stage's ``nodes`` are either empty (a hand-written plan: filled in) or exactly the nodes
of its modules; anything else is refused, naming the stage, the module and a node, so that
a plan is never simulated as one split and run as another.
"""

from __future__ import annotations

import functools
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import PlanError
from .dp_sharding import DP_SHARDINGS, check_dp_sharding
from .schedules import REGISTRY as SCHEDULE_REGISTRY, SCHEDULES, check_recompute, check_schedule, stage_rank
from .tp_strategies import STRATEGY_NAMES

__all__ = [
    "PLAN_VERSION",
    "STRATEGIES",
    "Mesh",
    "Schedule",
    "StageComponents",
    "StagePredicted",
    "Stage",
    "Predicted",
    "SolverInfo",
    "ModelSource",
    "ModelRef",
    "Training",
    "Plan",
]

PLAN_VERSION = 7
# Versions this autopart reads. 2 added stages[].predicted.components and named nodes by key (so a
# version-1 plan is re-planned); 3 added model.source (how to rebuild the model, so that ``autopart
# run --plan`` needs nothing else). A version-2 plan loads with no source: ``autopart run`` then
# needs --model/--config/--seq-len again, and says so. 4 replaced training.zero1 (true/false) by
# training.dp_sharding (none, zero1, zero2, zero3, hsdp: dp_sharding.py); an older plan's zero1 loads as
# dp_sharding "zero1" or "none". 5 replaced stages[].recompute (true/false) by the blocks that recompute
# (a list of module names; true still means every block of the stage, false none) and added
# stages[].selective ([Note: recompute per block] in recompute.py). 6 added the components tied_sum_s and
# dp_gather_forward_s (written only when nonzero). 7 added model.vocab_chunks (written only when not 1:
# [Note: vocabulary chunks] in vocab_split.py).
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7)
SCHEDULE_NAMES = SCHEDULES  # the registry in schedules.py is the one list
# Per-node tensor-sharding strategies the runtime can realize: the registry in tp_strategies.py is
# the one list (see docs/plan.md).
STRATEGIES = STRATEGY_NAMES


def _check_int(where: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PlanError(f"{where} must be an integer >= {minimum}, got {value!r}")


def _check_type(where: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
    if not ok:
        raise PlanError(f"{where} must be {what}, got {value!r:.80}")


def _check_items(where: str, items: Any, kind: type, what: str, minimum: int | None = None) -> None:
    _check_type(where, items, tuple, "an array")
    for i, v in enumerate(items):
        _check_type(f"{where}[{i}]", v, kind, what)
        if minimum is not None and v < minimum:
            raise PlanError(f"{where}[{i}] must be >= {minimum}, got {v!r}")


@functools.lru_cache(maxsize=1 << 16)
def _dp_group(tp: int, dp: int, stage: int, t: int) -> tuple[int, ...]:
    """``Mesh.dp_group``: the search asks for the same groups millions of times (GPT-3: dp up to 512)."""
    return tuple((stage * dp + d) * tp + t for d in range(dp))


@dataclass(frozen=True, slots=True)
class Mesh:
    """The device mesh: pipeline x tensor x data parallel degrees."""

    pp: int = 1  # pipeline stages (physical)
    tp: int = 1  # tensor-parallel degree
    dp: int = 1  # data-parallel replicas

    def __post_init__(self) -> None:
        for axis in ("pp", "tp", "dp"):
            _check_int(f"mesh.{axis}", getattr(self, axis))

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def rank(self, stage: int, dp: int = 0, tp: int = 0) -> int:
        """Global rank; tensor-parallel fastest (see [Note: mesh rank order] in cost_models/analytic.py)."""
        return (stage * self.dp + dp) * self.tp + tp

    def stage_ranks(self, stage: int) -> tuple[int, ...]:
        return tuple(self.rank(stage, d, t) for d in range(self.dp) for t in range(self.tp))

    def tp_group(self, stage: int, dp: int = 0) -> tuple[int, ...]:
        return tuple(self.rank(stage, dp, t) for t in range(self.tp))

    def dp_group(self, stage: int, tp: int = 0) -> tuple[int, ...]:
        return _dp_group(self.tp, self.dp, stage, tp)

    def __str__(self) -> str:
        return f"pp={self.pp},tp={self.tp},dp={self.dp}"

    @classmethod
    def parse(cls, text: str) -> dict[str, int]:
        """Parse ``pp=8,tp=8,dp=8`` (any subset) into a dict of pins."""
        pins: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in ("pp", "tp", "dp"):
                raise PlanError(f"--mesh: {part!r} is not axis=N with axis one of pp, tp, dp (e.g. pp=8,tp=8)")
            try:
                pins[key] = int(val)
            except ValueError:
                raise PlanError(f"--mesh: {key}={val!r} is not an integer") from None
            _check_int(f"--mesh {key}", pins[key])
        return pins


@dataclass(frozen=True, slots=True)
class Schedule:
    """The pipeline schedule and how the global batch is cut into micro-batches."""

    name: str = "1f1b"  # gpipe | 1f1b | interleaved | zb | zbv | dualpipev (schedules.py)
    microbatches: int = 1  # micro-batches per step, per data-parallel replica
    micro_batch_size: int = 1  # samples per micro-batch
    virtual_stages: int = 1  # stages per pipeline rank (interleaved, zb: any; zbv, dualpipev: 2)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in SCHEDULE_NAMES:
            raise PlanError(f"schedule.name {self.name!r} is not one of {', '.join(SCHEDULE_NAMES)}")
        _check_int("schedule.microbatches", self.microbatches)
        _check_int("schedule.micro_batch_size", self.micro_batch_size)
        _check_int("schedule.virtual_stages", self.virtual_stages)
        need = SCHEDULE_REGISTRY[self.name].virtual_stages
        if need is not None and self.virtual_stages != need:
            fix = "schedule 'interleaved' or 'zb' for several stages per rank" if need == 1 else f"virtual_stages {need}"
            raise PlanError(
                f"schedule.virtual_stages={self.virtual_stages} does not suit schedule {self.name!r}, "
                f"which runs {need} stage(s) per rank: use {fix}"
            )


@dataclass(frozen=True, slots=True)
class StageComponents:
    """Where one step's time goes on a stage, in seconds per step, as the simulator predicts it.

    The components of the stages of one pipeline rank add up to the plan's step
    time (with one stage per rank, each stage's do). See [Note: where idle
    time goes] in simulate.py. The optimizer step and the runtime's overheads
    are priced only on a cluster that ``autopart calibrate`` measured
    ([Note: software overheads] in cost_models/overheads.py); elsewhere they
    are 0 and left out of the plan's JSON.
    """

    forward_s: float  # forward compute, all micro-batches
    backward_s: float  # backward compute, all micro-batches (recomputation not included)
    recompute_s: float  # the forward replayed in backward (compute and its tp collectives)
    tp_comm_s: float  # tensor-parallel collectives of forward and backward
    p2p_s: float  # idle while an activation or gradient this stage waits for is in transit
    dp_reduce_s: float  # the rank's exposed data-parallel reduction, shared by its stages by size
    bubble_s: float  # idle waiting for other ranks (the pipeline bubble, and the wait for the slowest rank)
    # ZeRO-2/3: the weights' all-gathers and the gradients' reduce-scatters not hidden behind compute
    # (version 4; [Note: FSDP prefetch overlap] in evaluate.py)
    dp_gather_s: float = 0.0
    optimizer_s: float = 0.0  # the optimizer step (ZeRO-1: its parameter broadcast included)
    overhead_s: float = 0.0  # the runtime's per-action and per-step costs (schedule, sends posted, loss all-reduce)
    # the all-reduce of weights shared with another pipeline rank (GPT-2's embedding and head), the wait for
    # the other owners included ([Note: tied weights' gradient sums] in simulate.py)
    tied_sum_s: float = 0.0
    # the part of ``dp_gather_s`` in the forward passes (FSDP's forward all-gathers and per-unit work): the
    # runtime times it inside the forward, the rest inside the backward (explain --measured)
    dp_gather_forward_s: float = 0.0

    @property
    def dp_gather_backward_s(self) -> float:
        return self.dp_gather_s - self.dp_gather_forward_s

    def total_s(self) -> float:
        return (
            self.forward_s + self.backward_s + self.recompute_s + self.tp_comm_s
            + self.p2p_s + self.dp_reduce_s + self.bubble_s + self.dp_gather_s
            + self.optimizer_s + self.overhead_s + self.tied_sum_s
        )

    def to_dict(self) -> dict[str, float]:
        """The fields; the measured-overhead ones and the tied weights' sums only when priced (so plans
        without them keep their JSON)."""
        d = asdict(self)
        for name in ("optimizer_s", "overhead_s", "tied_sum_s", "dp_gather_forward_s"):
            if d[name] == 0.0:
                del d[name]
        return d


@dataclass(frozen=True, slots=True)
class StagePredicted:
    """The simulator's figures for one stage (per device of that stage)."""

    forward_s: float  # one micro-batch forward, including tensor-parallel collectives
    backward_s: float  # one micro-batch backward, including recomputation
    send_s: float  # point-to-point time of its output to the next stage, per micro-batch
    static_bytes: int  # parameters + gradients + optimizer state (+ one block's recompute workspace if recomputing)
    # The two below are per device of the stage's pipeline rank: with interleaving
    # a rank holds several stages, and its memory covers all of them.
    activation_bytes: int  # activations of in-flight micro-batches on the rank, at its memory peak
    memory_bytes: int  # peak memory of the rank (simulate.py, [Note: memory over the step])
    busy_s: float  # compute time of this stage over one step
    dp_reduce_s: float  # data-parallel gradient reduction time
    components: StageComponents | None = None  # the step time split by component (version 2)
    # Per device of the rank, at its memory peak: buffers, kept input gradients and the running
    # backward's or optimizer step's workspace (evaluate.py, [Note: what a step holds]).
    workspace_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage: what it owns and where it runs."""

    index: int
    modules: tuple[str, ...]  # block names (module FQNs) in order
    nodes: tuple[str, ...]  # FX node names it owns
    params: int  # trainable parameters it holds (tied weights counted in each stage that uses them)
    ranks: tuple[int, ...]  # global ranks that run it (tp x dp of them)
    # The blocks (of ``modules``) that replay their whole forward in the backward, keeping only their
    # inputs (version 5; before, a bool for all or none: [Note: recompute per block] in recompute.py)
    recompute: tuple[str, ...] = ()
    selective: bool = False  # every other block replays its attention core (Megatron's selective recompute)
    predicted: StagePredicted | None = None

    def __post_init__(self) -> None:
        where = f"stages[{self.index}]"
        _check_int(f"{where}.index" if isinstance(self.index, int) else "stages[].index", self.index, 0)
        _check_items(f"{where}.modules", self.modules, str, "a module name (string)")
        _check_items(f"{where}.nodes", self.nodes, str, "a node name (string)")
        _check_int(f"{where}.params", self.params, 0)
        _check_items(f"{where}.ranks", self.ranks, int, "a rank (integer)", minimum=0)
        _check_items(f"{where}.recompute", self.recompute, str, "a module name (string)")
        _check_type(f"{where}.selective", self.selective, bool, "true or false")
        stray = [m for m in self.recompute if m not in self.modules]
        if stray:
            raise PlanError(f"{where}.recompute names {stray[0]!r}, which is not one of the stage's modules; "
                            "list only modules of this stage (or true for all of them)")
        if len(set(self.recompute)) != len(self.recompute):
            raise PlanError(f"{where}.recompute lists a module twice; list each once")

    @property
    def recomputes(self) -> bool:
        """Whether the stage replays any forward work in its backward (whole blocks or attention cores)."""
        return bool(self.recompute) or self.selective


@dataclass(frozen=True, slots=True)
class Predicted:
    """Whole-step figures predicted by the simulator."""

    step_time_s: float
    samples_per_s: float
    tflops_per_device: float  # achieved model TFLOP/s per device (forward + backward, no recompute)
    mfu: float  # tflops_per_device / device peak for the plan's dtype
    bubble_fraction: float
    peak_memory_bytes: int  # the largest per-device peak over all stages
    memory_limit_bytes: int  # device memory less the reserve
    fits: bool  # peak_memory_bytes * (1 + memory_margin) <= memory_limit_bytes
    # The memory model's measured worst underestimate, added to the peak when checking fit
    # (cost_models/memory.py, [Note: the memory margin]); 0 in plans made before it.
    memory_margin: float = 0.0


@dataclass(frozen=True, slots=True)
class SolverInfo:
    """Provenance of the plan's choices."""

    method: str  # uniform | params | pipedream | megatron | ilp | manual
    status: str  # e.g. OPTIMAL, FEASIBLE, HEURISTIC, MANUAL
    objective: float | None = None  # the planner's objective (predicted step time, s)
    bound: float | None = None  # best proven lower bound on the objective, if any
    wall_s: float = 0.0  # planning wall time
    # Where the plan came from: "ilp" (the stage ILP's own solve), or the name of the seed
    # (a baseline's plan the search started from) that no solve beat. None: not recorded.
    origin: str | None = None
    seed_step_s: float | None = None  # the best seed's predicted step time (the ILP only), s

    def __post_init__(self) -> None:
        _check_type("solver.method", self.method, str, "a string")
        _check_type("solver.status", self.status, str, "a string")
        for key in ("objective", "bound", "seed_step_s"):
            value = getattr(self, key)
            if value is not None:
                _check_type(f"solver.{key}", value, (int, float), "a number or null")
        _check_type("solver.wall_s", self.wall_s, (int, float), "a number")
        if self.origin is not None:
            _check_type("solver.origin", self.origin, str, "a string or null")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """How to rebuild the model from the command line: what ``autopart run --plan`` needs and nothing else.

    The compute dtype is ``training.dtype``. A model passed from Python (``auto_parallelize``) has no
    source; the plan then records ``null``.
    """

    spec: str  # --model: a zoo name, hf:ClassName or py:module:function
    config: Mapping[str, Any] = field(default_factory=dict)  # --config overrides, typed (n_layer: 4)
    seq_len: int | None = None  # the sequence length the model was built with (None: not a sequence model)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec:
            raise PlanError(f"model.source.spec must be a model name such as 'gpt2', got {self.spec!r}")
        if not isinstance(self.config, Mapping):
            raise PlanError(f"model.source.config must be an object of config overrides, got {self.config!r}")
        if self.seq_len is not None:
            _check_int("model.source.seq_len", self.seq_len)

    def flags(self) -> list[str]:
        """The command-line flags that rebuild this model: ``--model gpt2 --config n_layer=4 --seq-len 128``."""
        out = ["--model", self.spec]
        if self.config:
            out += ["--config", *(f"{k}={_flag_value(v)}" for k, v in self.config.items())]
        if self.seq_len is not None:
            out += ["--seq-len", str(self.seq_len)]
        return out

    def differences(self, other: "ModelSource") -> list[str]:
        """Each flag where ``other`` (what the user gave) differs from this (the plan's), with both values."""
        out = []
        if other.spec != self.spec:
            out.append(f"--model {other.spec} (the plan: {self.spec})")
        for key in sorted(set(self.config) | set(other.config)):
            mine, theirs = self.config.get(key), other.config.get(key)
            if mine != theirs:
                given = f"{key}={_flag_value(theirs)}" if key in other.config else f"no {key}"
                planned = f"{key}={_flag_value(mine)}" if key in self.config else f"no {key}"
                out.append(f"--config {given} (the plan: {planned})")
        if other.seq_len is not None and other.seq_len != self.seq_len:
            out.append(f"--seq-len {other.seq_len} (the plan: {self.seq_len})")
        return out


def _flag_value(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What the plan was made for."""

    name: str
    params: int  # trainable parameters, tied ones once
    fingerprint: str  # see capture.model_fingerprint
    input_shapes: tuple[tuple[int, ...], ...] = ()  # shapes of the captured example inputs
    source: ModelSource | None = None  # how to rebuild it (CLI plans); None for a model given from Python
    vocab_chunks: int = 1  # the head's vocabulary split in this many blocks ([Note: vocabulary chunks] in vocab_split.py)

    def __post_init__(self) -> None:
        _check_type("model.name", self.name, str, "a string")
        _check_int("model.vocab_chunks", self.vocab_chunks, 1)
        _check_int("model.params", self.params, 0)
        _check_type("model.fingerprint", self.fingerprint, str, "a string")
        _check_type("model.input_shapes", self.input_shapes, tuple, "an array of shapes")
        for i, shape in enumerate(self.input_shapes):
            _check_items(f"model.input_shapes[{i}]", shape, int, "a size (integer)", minimum=0)
        if self.source is not None:
            _check_type("model.source", self.source, ModelSource, "an object (spec, config, seq_len) or null")


@dataclass(frozen=True, slots=True)
class Training:
    """The training set-up the plan was priced for."""

    global_batch: int  # samples per optimizer step
    dtype: str = "bf16"  # compute dtype (a key of the device's peak FLOP/s)
    optimizer: str = "adam-mixed"  # a key of cost_models.OPTIMIZERS
    dp_sharding: str = "none"  # what is sharded over dp: none (DDP), zero1, zero2, zero3, hsdp (dp_sharding.py)
    memory_reserve: float = 0.1  # fraction of device memory kept free (allocator, workspace)
    overlap_dp: bool = True  # overlap the gradient all-reduce with the last backward

    def __post_init__(self) -> None:
        _check_int("training.global_batch", self.global_batch)
        _check_type("training.dtype", self.dtype, str, "a string such as \"bf16\"")
        _check_type("training.optimizer", self.optimizer, str, "a string such as \"adam-mixed\"")
        if not isinstance(self.dp_sharding, str) or self.dp_sharding not in DP_SHARDINGS:
            raise PlanError(f"training.dp_sharding {self.dp_sharding!r} is not one of {', '.join(DP_SHARDINGS)}")
        _check_type("training.overlap_dp", self.overlap_dp, bool, "true or false")
        _check_type("training.memory_reserve", self.memory_reserve, (int, float), "a number")
        if not 0.0 <= self.memory_reserve < 1.0:
            raise PlanError(f"training.memory_reserve must be in [0, 1), got {self.memory_reserve}")


@dataclass(frozen=True)
class Plan:
    """A complete partition plan. See docs/plan.md for its JSON form."""

    model: ModelRef
    cluster: Mapping[str, Any]  # Cluster.to_dict() of the cluster it targets
    mesh: Mesh
    schedule: Schedule
    stages: tuple[Stage, ...]
    training: Training
    solver: SolverInfo
    predicted: Predicted | None = None
    sharding: Mapping[str, str] = field(default_factory=dict)  # node -> strategy; absent nodes replicate
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        sched = self.schedule
        check_schedule(sched.name, self.mesh.pp, sched.microbatches, sched.virtual_stages)
        check_recompute(sched.name, any(st.recomputes for st in self.stages))
        if self.mesh.dp > 1:
            check_dp_sharding(self.training.dp_sharding, sched.name, SCHEDULE_REGISTRY[sched.name].splits_backward,
                              any(st.recomputes for st in self.stages))
        expected = self.mesh.pp * self.schedule.virtual_stages
        if len(self.stages) != expected:
            raise PlanError(
                f"plan has {len(self.stages)} stages but mesh.pp={self.mesh.pp} x "
                f"schedule.virtual_stages={self.schedule.virtual_stages} = {expected}"
            )
        for i, st in enumerate(self.stages):
            if st.index != i:
                raise PlanError(f"stages[{i}].index is {st.index}; stages must be listed in order 0..{expected - 1}")
            if not st.modules:
                raise PlanError(f"stage {i} owns no modules; every stage needs at least one block")
        _check_type("cluster", self.cluster, Mapping, "an object (a cluster's to_dict())")
        for node, strat in self.sharding.items():
            if not isinstance(strat, str) or strat not in STRATEGIES:
                raise PlanError(f"sharding[{node!r}] = {strat!r} is not one of {', '.join(STRATEGIES)}")
        samples = self.schedule.microbatches * self.schedule.micro_batch_size * self.mesh.dp
        if samples != self.training.global_batch:
            raise PlanError(
                f"schedule.microbatches ({self.schedule.microbatches}) x micro_batch_size "
                f"({self.schedule.micro_batch_size}) x mesh.dp ({self.mesh.dp}) = {samples} samples, "
                f"but training.global_batch is {self.training.global_batch}"
            )

    # --- checks -----------------------------------------------------------------------

    def check_matches(
        self, fingerprint: str, cluster: Mapping[str, Any] | None = None, given: ModelSource | None = None
    ) -> None:
        """Refuse this plan for a different model (or cluster) than it was made for.

        ``given``: how the caller built the model (its command-line flags); the error then names
        the flags that differ from the plan's ``model.source``.
        """
        if fingerprint != self.model.fingerprint:
            src = self.model.source
            diffs = src.differences(given) if src is not None and given is not None else []
            if diffs:
                raise PlanError(
                    f"this plan was made for model {self.model.name!r} built with `{' '.join(src.flags())}`, "
                    f"but these flags differ: {'; '.join(diffs)}; drop them (the plan rebuilds its own model) "
                    "or re-plan with `autopart plan` for this model"
                )
            raise PlanError(
                f"this plan was made for model {self.model.name!r} (fingerprint {self.model.fingerprint}), "
                f"not for this one (fingerprint {fingerprint}); re-plan with `autopart plan` for this model"
            )
        if cluster is not None:
            mine, theirs = dict(self.cluster), dict(cluster)
            if mine != theirs:
                diff = _differing_fields(mine, theirs)
                raise PlanError(
                    f"this plan was made for cluster {mine.get('name')!r} and differs from "
                    f"{theirs.get('name')!r} in: {', '.join(diff)}; re-plan for this cluster"
                )

    def stage_ranks(self, index: int) -> tuple[int, ...]:
        """The global ranks that run stage ``index``: its pipeline rank under the schedule's stage
        layout ([Note: stage layouts] in schedules.py), times the mesh's tp x dp."""
        layout = SCHEDULE_REGISTRY[self.schedule.name].layout
        return self.mesh.stage_ranks(stage_rank(index, self.mesh.pp, layout))

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        """The stages global ``rank`` runs, in model order (the inverse of ``stage_ranks``)."""
        return tuple(st.index for st in self.stages if rank in self.stage_ranks(st.index))

    def stages_label(self, rank: int) -> str:
        """``"stage 1"`` or ``"stages 0, 2"``: how errors name what ``rank`` runs."""
        stages = self.rank_stages(rank)
        return f"stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))}"

    def check_consistent(self) -> None:
        """Refuse a plan at odds with itself; see [Note: what a stage holds].

        Checks what can be checked without the model: no module or node is held by two
        stages, the stages' ``ranks`` are the mesh's (or empty), and every node in
        ``sharding`` is held by a stage (when the stages list their nodes)."""
        owner: dict[str, int] = {}
        node_owner: dict[str, int] = {}
        for st in self.stages:
            for m in st.modules:
                if m in owner:
                    raise PlanError(f"module {m} is listed by stage {owner[m]} and stage {st.index}; "
                                    "a module belongs to one stage: remove it from one of them")
                owner[m] = st.index
            for n in st.nodes:
                if n in node_owner:
                    raise PlanError(f"node {n} is listed by stage {node_owner[n]} and stage {st.index}; "
                                    "a node belongs to one stage: remove it from one of them")
                node_owner[n] = st.index
            want = self.stage_ranks(st.index)
            if st.ranks and tuple(st.ranks) != want:
                raise PlanError(f"stages[{st.index}].ranks is {list(st.ranks)} but mesh {self.mesh} with schedule "
                                f"{self.schedule.name} runs stage {st.index} on ranks {list(want)}; fix the ranks "
                                "(or give [] to have them filled in)")
        if node_owner:
            stray = sorted(n for n in self.sharding if n not in node_owner)
            if stray:
                raise PlanError(f"sharding.nodes names {stray[0]!r}, which no stage holds"
                                + (f" ({len(stray)} such nodes)" if len(stray) > 1 else "")
                                + "; remove it or add it to a stage")

    def with_blocks(self, blocks: Mapping[str, Sequence[str]]) -> "Plan":
        """This plan checked against the model's blocks (``{block name: its nodes}``, in model
        order) and with every stage's ``nodes`` and ``ranks`` filled in from its ``modules``.

        The stages' ``modules`` are the one source of truth ([Note: what a stage holds]): a
        stage's ``nodes`` must be empty (to be filled in) or exactly its modules' nodes, so a
        plan is simulated and run as the same split or refused, naming the stage and module."""
        import difflib
        from dataclasses import replace

        self.check_consistent()
        node_block = {n: b for b, ns in blocks.items() for n in ns}
        held: dict[str, int] = {}
        stages = []
        for st in self.stages:
            for m in st.modules:
                if m not in blocks:
                    near = difflib.get_close_matches(m, list(blocks), n=1)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    raise PlanError(f"stages[{st.index}].modules names {m!r}{hint}, which is not a block of this "
                                    "model (see `autopart inspect`); fix the name or re-plan")
                held[m] = st.index
            want = [n for m in st.modules for n in blocks[m]]
            if st.nodes and set(st.nodes) != set(want):
                extra = [n for n in st.nodes if n not in set(want)]
                lacking = [n for n in want if n not in set(st.nodes)]
                if extra:
                    n = extra[0]
                    where = (f"of module {node_block[n]}, which stage {st.index} does not list" if n in node_block
                             else "that this model's graph does not have")
                    raise PlanError(f"stages[{st.index}].nodes holds node {n!r} {where}; stages[].modules and "
                                    "stages[].nodes disagree: edit both, or give nodes [] to have them derived from modules")
                n = lacking[0]
                raise PlanError(f"stages[{st.index}] lists module {node_block[n]} but not its node {n!r}"
                                f"{f' (and {len(lacking) - 1} more)' if len(lacking) > 1 else ''}; stages[].modules "
                                "and stages[].nodes disagree: edit both, or give nodes [] to have them derived from modules")
            stages.append(replace(st, nodes=tuple(want), ranks=self.stage_ranks(st.index)))
        unheld = [b for b in blocks if b not in held]
        if unheld:
            raise PlanError(f"no stage holds module {unheld[0]}"
                            f"{f' (nor {len(unheld) - 1} more)' if len(unheld) > 1 else ''}; "
                            "every block must be in exactly one stage's modules")
        order = {b: i for i, b in enumerate(blocks)}
        for st in self.stages:
            for a, b in zip(st.modules, st.modules[1:]):
                if order[b] < order[a]:
                    raise PlanError(f"stages[{st.index}] lists module {b} after {a}; list each stage's modules in model order")
        last = [max(order[m] for m in st.modules) for st in self.stages]
        first = [min(order[m] for m in st.modules) for st in self.stages]
        for i in range(1, len(self.stages)):
            if first[i] < last[i - 1]:
                raise PlanError(f"stage {i} holds module {list(blocks)[first[i]]}, which comes before stage {i - 1}'s "
                                f"{list(blocks)[last[i - 1]]}; stages must follow the model order")
        return replace(self, stages=tuple(stages))

    def model_source(
        self, spec: str | None = None, config: Mapping[str, Any] | None = None, seq_len: int | None = None
    ) -> ModelSource:
        """The model to build for this plan: its recorded ``model.source``, with any part the caller gives
        (``--model``, ``--config`` keys, ``--seq-len``) in place of the plan's."""
        src = self.model.source
        if src is None:
            if spec is None:
                raise PlanError(
                    f"this plan (version {self.version}, model {self.model.name!r}) does not record how to build its "
                    "model; pass --model (and the --config/--seq-len it was planned with), or re-plan with "
                    "`autopart plan ... --json` to get a plan that does"
                )
            return ModelSource(spec, dict(config or {}), seq_len)
        return ModelSource(
            spec if spec is not None else src.spec,
            {**src.config, **(config or {})},
            seq_len if seq_len is not None else src.seq_len,
        )

    def with_source(self, source: ModelSource | None) -> "Plan":
        """This plan, recording ``source`` as how its model is built (in the current schema version)."""
        return replace(self, model=replace(self.model, source=source), version=PLAN_VERSION)

    # --- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        model = asdict(self.model)
        if model["vocab_chunks"] == 1:  # the head whole: not written (version 7)
            del model["vocab_chunks"]
        d = {
            "version": self.version,
            "model": model,
            "cluster": dict(self.cluster),
            "mesh": asdict(self.mesh),
            "schedule": asdict(self.schedule),
            "training": asdict(self.training),
            "stages": [_stage_dict(s) for s in self.stages],
            "sharding": {"default": "replicate", "nodes": dict(self.sharding)},
            "predicted": asdict(self.predicted) if self.predicted else None,
            "solver": asdict(self.solver),
        }
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically: a crash never leaves half a plan behind."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:
            raise PlanError(f"{where} is nested too deeply to be a plan; give a plan file written by autopart") from None
        try:
            return cls.from_dict(data)
        except RecursionError:
            raise PlanError(f"{where} is nested too deeply to be a plan; give a plan file written by autopart") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PlanError(f"cannot read plan file {str(path)!r}: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"plan file {str(path)!r} is not UTF-8 text (byte {exc.start}); give a plan JSON file") from None
        try:
            return cls.from_json(text, "the file")
        except PlanError as exc:  # name the file: `diff a.json b.json` must say which one is bad
            raise PlanError(f"plan file {str(path)!r}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping):
            raise PlanError("plan JSON must be an object")
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise PlanError(f"plan JSON has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_TOP_KEYS)}")
        version = data.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise PlanError(
                f"plan version {version!r} is not supported; this autopart reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: re-plan with this autopart's `autopart plan`"
            )
        try:
            sharding = _typed("sharding", data.get("sharding") or {}, dict)
            extra = sorted(set(sharding) - {"default", "nodes"})
            if extra:
                raise PlanError(f"plan field sharding has unknown key(s) {', '.join(extra)}; allowed: default, nodes")
            default = sharding.get("default", "replicate")
            if default != "replicate":
                raise PlanError(f"sharding.default must be 'replicate', got {default!r}")
            stages = []
            for i, s in enumerate(_required(data, "stages", list)):
                s = _stage_recompute(dict(_typed(f"stages[{i}]", s, dict)), f"stages[{i}]")
                pred = s.pop("predicted", None)
                stages.append(
                    Stage(
                        **_fields(Stage, s, f"stages[{i}]", tuples=("modules", "nodes", "ranks", "recompute")),
                        predicted=_stage_predicted(pred, f"stages[{i}].predicted") if pred else None,
                    )
                )
            model = _fields(ModelRef, _required(data, "model", dict), "model")
            shapes = _typed("model.input_shapes", model.get("input_shapes", []), list)
            model["input_shapes"] = tuple(tuple(_typed(f"model.input_shapes[{i}]", s, list)) for i, s in enumerate(shapes))
            if model.get("source") is not None:
                model["source"] = ModelSource(**_fields(ModelSource, model["source"], "model.source"))
            pred = data.get("predicted")
            return cls(
                version=version,
                model=ModelRef(**model),
                cluster=_required(data, "cluster", dict),
                mesh=Mesh(**_fields(Mesh, _required(data, "mesh", dict), "mesh")),
                schedule=Schedule(**_fields(Schedule, _required(data, "schedule", dict), "schedule")),
                training=Training(**_fields(Training, _training(_required(data, "training", dict), version), "training")),
                stages=tuple(stages),
                sharding=dict(_typed("sharding.nodes", sharding.get("nodes", {}), dict)),
                predicted=Predicted(**_fields(Predicted, pred, "predicted")) if pred else None,
                solver=SolverInfo(**_fields(SolverInfo, _required(data, "solver", dict), "solver")),
            )
        except TypeError as exc:  # a field of the wrong type deep inside a dataclass
            raise PlanError(f"plan JSON has a field of the wrong type: {exc}") from None


_TOP_KEYS = ("version", "model", "cluster", "mesh", "schedule", "training", "stages", "sharding", "predicted", "solver")


def _differing_fields(mine: Mapping[str, Any], theirs: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths (``device.memory_gib``) of the cluster fields where two cluster dicts differ."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differing_fields(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _training(data: Mapping[str, Any], version: int) -> Mapping[str, Any]:
    """``training`` of a plan of ``version`` in this version's keys: before 4, ``zero1`` (true/false)
    was the only sharding level."""
    if version >= 4 or "zero1" not in data:
        return data
    out = {k: v for k, v in data.items() if k != "zero1"}
    _check_type("training.zero1", data["zero1"], bool, "true or false")
    out["dp_sharding"] = "zero1" if data["zero1"] else "none"
    return out


def _stage_dict(stage: Stage) -> dict[str, Any]:
    """``asdict(stage)``, its components written by ``StageComponents.to_dict``."""
    d = asdict(stage)
    if stage.predicted is not None and stage.predicted.components is not None:
        d["predicted"]["components"] = stage.predicted.components.to_dict()
    return d


def _stage_recompute(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``stages[i]`` with ``recompute`` as a list of module names: ``true`` (every plan before version 5,
    and still accepted by hand) means all the stage's modules, ``false`` none."""
    flag = data.get("recompute")
    if isinstance(flag, bool):
        modules = data.get("modules")
        data["recompute"] = list(modules) if flag and isinstance(modules, list) else []
    return data


def _stage_predicted(data: Any, where: str) -> StagePredicted:
    pred = _fields(StagePredicted, data, where)
    comps = pred.pop("components", None)
    return StagePredicted(
        **pred,
        components=StageComponents(**_fields(StageComponents, comps, f"{where}.components")) if comps else None,
    )


def _typed(where: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise PlanError(f"plan field {where} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _required(data: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in data:
        raise PlanError(f"plan JSON is missing the required key {key!r}")
    return _typed(key, data[key], kind)


def _fields(cls: type, data: Mapping[str, Any] | None, where: str, tuples: Sequence[str] = ()) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from ``data``: unknown keys and missing required ones are errors."""
    data = _typed(where, data, dict)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PlanError(f"plan field {where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING and f.name != "predicted"
    ]
    if missing:
        raise PlanError(f"plan field {where} is missing {', '.join(missing)}")
    out = {k: v for k, v in data.items() if k != "predicted" or cls is not Stage}
    for t in tuples:
        if t in out:
            if not isinstance(out[t], list):
                raise PlanError(f"plan field {where}.{t} must be an array, got {out[t]!r:.80}")
            out[t] = tuple(out[t])
    return out
