"""Run a ``Plan``: distributed training steps on PyTorch's own engines.

The last phase of autopart (capture -> blocks -> solve -> Plan -> rewrite ->
**run**). ``auto_parallelize`` plans (or takes a plan), lets
``partitioner.rewrite`` cut the model into stage modules, and runs them:
``torch.distributed.pipelining`` stages and schedules over the ``pp`` axis of
a ``DeviceMesh``, DTensor over ``tp`` (see rewrite.py) and DDP over ``dp``.
``ParallelModel.step`` is one optimizer step; ``save``/``load`` are
``torch.distributed.checkpoint`` keyed by the model's own parameter names, so
a run resumes under another plan.

Glossary as in plan.py: a **stage** is a pipeline stage, a **rank** a
process, an **axis** one of ``pp``, ``tp``, ``dp``.

[Note: tied weights across stages]
GPT-2 reads ``transformer.wte.weight`` in its embedding (stage 0) and in its
LM head (the last stage). Each stage holds its own copy, made from the same
tensor, so they start equal. The model's gradient for the tied weight is the
sum of the two uses, so after the pipeline's backward each owning pipeline
rank all-reduces (sums) its copy's gradient with the other owners, at the
same ``dp``/``tp`` coordinate; both copies then take the same optimizer step
from the same state and stay equal. Data-parallel averaging (DDP) happens
before the sum, which is the same thing because both are linear.

[Note: static stage shapes]
Every stage's input and output shapes are known from the export at the
micro-batch shape, so the stages are built in ``PipelineStage``'s static mode.
In its dynamic mode the first step exchanges shape metadata between ranks,
and with several stages per rank (interleaving) we saw int64 position ids
arrive holding a boolean mask of the same byte size. Static mode has no such
exchange, and costs nothing.

[Note: failing ranks] lives in watchdog.py: a rank that raises, dies or hangs stops the
job within ``timeout_s``, and the first line names it and its stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_unflatten

from .cluster import Cluster
from .devices import init_distributed, rank_device
from .errors import AutopartError, PlanError
from .dp_sharding import spec as dp_spec
from .plan import Plan
from .precision import MasterWeightOptimizer, PrecisionPolicy, loss_inputs, make_scaler, optimizer_step
from .schedules import rank_stages, spec as schedule_spec, stage_rank
from .materialize import has_meta_tensors, materialize, release
from .measure import DdpTimer, RankMemory, RankTime, StepClock, StorageMeter, rank_time, tp_profile
from .checkpoint import CHECKPOINT_META, CheckpointError, read_manifest, verify, write_manifest
from .watchdog import DistributedError, RankFailedError, Watchdog, backend_timeout_s
from .fsdp import shard_stage
from .recompute import checkpoint_in_graph, recompute_regions
from .rewrite import SplitModel, TensorParallelModule, get_tensor, set_tensor, microbatch_inputs, split_model

__all__ = ["DistributedError", "RankFailedError", "CheckpointError", "StepEvent", "ParallelModel", "RecomputedStage",
           "auto_parallelize", "run_plan"]

@dataclass(frozen=True, slots=True)
class StepEvent:
    """One stage's forward or backward of one micro-batch, timed from the start of the step."""

    rank: int  # global rank that ran it
    stage: int  # stage index in the plan
    kind: str  # "F" (forward), "B" (backward), or "I"/"W" (its input/weight-gradient halves)
    microbatch: int
    start_s: float
    end_s: float
    cpu_s: float = 0.0  # CPU time this rank's thread spent in it (other work on shared cores does not count)


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def auto_parallelize(
    model: torch.nn.Module,
    cluster: Cluster | None = None,
    *,
    example_inputs: Sequence[Any],
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    plan: Plan | None = None,
    optimizer: OptimizerFactory | None = None,
    pp: int | None = None,
    tp: int | None = None,
    dp: int | None = None,
    microbatches: int | None = None,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    global_batch: int | None = None,
    method: str = "ilp",
    time_limit_s: float = 30.0,
    timeout_s: float = 20.0,
    init_seed: int = 0,
    zero1: bool = False,
    recompute: bool | None = None,
    dp_sharding: str | None = None,
) -> "ParallelModel":
    """Plan (unless ``plan`` is given) and build the distributed model on this rank. Run under torchrun.

    ``example_inputs`` are the model's positional inputs (any batch size);
    ``loss_fn(output, target)`` takes the model's own output and returns a
    mean loss. ``optimizer`` builds the optimizer from an iterable of
    parameters (default AdamW, lr 1e-3). With ``plan=None``, rank 0 plans with
    ``method`` and the pins (``pp``, ``tp``, ...) for ``cluster`` (default
    ``Cluster.local(world_size)``) and broadcasts the plan. ``timeout_s``
    bounds how long a dead peer goes unnoticed (see [Note: failing ranks]).

    ``zero1=True`` plans with the optimizer state sharded over ``dp`` and runs
    it so (``ZeroRedundancyOptimizer``); a given ``plan`` says so in
    ``training.dp_sharding``; ``dp_sharding`` names the least the planner
    must shard (``zero2``, ``zero3``: FSDP2, see fsdp.py). ``recompute=True`` (``False``) pins every stage to
    (not to) replay its forward in backward; ``None`` lets the planner choose
    per stage ([Note: recomputation as priced]).

    A model built on ``meta`` (e.g. ``load_model(..., device="meta")``) is
    materialized stage by stage: each rank allocates and initializes only the
    tensors its own stages read (its tp shards of them), deterministically
    from ``init_seed`` (see [Note: deterministic initialization] in
    materialize.py); ``materialize(model, device)`` builds the same weights in
    one process.
    """
    if plan is not None:  # before the process group: a bad plan is refused the same way everywhere
        from .planner import check_plan

        plan = check_plan(plan, model, example_inputs)
    rank, world = _init_process_group(cluster, timeout_s)
    if plan is None:
        cluster = cluster or Cluster.local(world)
        plan = _plan_on_rank0(
            model, example_inputs, cluster, rank,
            dict(method=method, pp=pp, tp=tp, dp=dp, microbatches=microbatches, schedule=schedule, zero1=zero1,
                 dp_sharding=dp_sharding,
                 virtual_stages=virtual_stages, recompute=recompute, time_limit_s=time_limit_s,
                 global_batch=global_batch or _batch_of(example_inputs)),
        )
    return ParallelModel(model, plan, example_inputs, loss_fn, optimizer, timeout_s, init_seed)


def _init_process_group(cluster: Cluster | None, timeout_s: float = 20.0) -> tuple[int, int]:
    """Start (or join) the job's process group on this rank's own device (see devices.py)."""
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise DistributedError(
                f"no process group and {', '.join(missing)} not set: launch with "
                "`torchrun --nproc-per-node N your_script.py` (or call torch.distributed.init_process_group first)"
            )
        # The watchdog names a failed or hung rank after timeout_s; the backend's own timeout is
        # the backstop behind it ([Note: failing ranks]).
        init_distributed(prefer="cpu" if cluster is not None and cluster.name.startswith("local-cpu") else None,
                         timeout_s=backend_timeout_s(timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _batch_of(inputs: Sequence[Any]) -> int:
    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    if first is None:
        raise PlanError("example_inputs hold no tensor with a batch dimension; pass global_batch=")
    return int(first.shape[0])


def _dtype_key(model: torch.nn.Module) -> str:
    dt = next((p.dtype for p in model.parameters()), torch.float32)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, "fp32")


def _plan_on_rank0(
    model: torch.nn.Module, inputs: Sequence[Any], cluster: Cluster, rank: int, pins: Mapping[str, Any]
) -> Plan:
    """Rank 0 plans and broadcasts the JSON (a time-limited search need not agree across ranks)."""
    payload: list[Any] = [None]
    if rank == 0:
        from .planner import plan_parallelism

        try:
            batch1 = microbatch_inputs(inputs, 1)
            result = plan_parallelism(model, batch1, cluster, dtype=_dtype_key(model), **pins)
            payload[0] = ("plan", result.plan.to_json(indent=None))
        except AutopartError as exc:
            payload[0] = ("error", str(exc))
    dist.broadcast_object_list(payload, src=0)
    kind, text = payload[0]
    if kind == "error":
        raise PlanError(f"planning on rank 0 failed: {text}")
    return Plan.from_json(text)


# --------------------------------------------------------------------------------------
# The distributed model
# --------------------------------------------------------------------------------------


def _stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class _TimedStage(PipelineStage):
        """A PipelineStage that records its forward and backward times when ``events`` is a list."""

        events: list[StepEvent] | None = None
        origin: float = 0.0
        watchdog: Watchdog | None = None  # told of each forward and backward ([Note: failing ranks])

        def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            self._progress("compute")
            out = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
            self._progress("wait")  # not in a finally: a failure leaves the phase at "compute"
            self._record("F", fwd_chunk_id, t0, c0)
            return out

        def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            self._progress("compute")
            out = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
            self._progress("wait")
            full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
            self._record("B" if full else "I", bwd_chunk_id, t0, c0)  # I: input gradients only
            return out

        def backward_weight_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            self._progress("compute")
            out = super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)
            self._progress("wait")
            self._record("W", bwd_chunk_id, t0, c0)
            return out

        def _progress(self, phase: str) -> None:
            if self.watchdog is not None:
                self.watchdog.progress(phase)

        def _record(self, kind: str, mb: int, t0: float, c0: float) -> None:
            if self.events is not None:
                t1, c1 = time.perf_counter(), time.thread_time()
                self.events.append(StepEvent(dist.get_rank(), self.stage_index, kind, mb, t0 - self.origin,
                                             t1 - self.origin, c1 - c0))

    return _TimedStage


class RecomputedStage(torch.nn.Module):
    """A stage module whose forward keeps only its inputs for backward and replays itself there.

    [Note: recomputation as priced]
    A plan stage with ``recompute`` is priced (evaluate.py) as replaying its
    forward in backward (``recompute_s``) and holding, per micro-batch in
    flight, its inputs instead of every saved activation. This wrapper
    realizes that with ``torch.utils.checkpoint`` in its non-reentrant form,
    which works under DDP and DTensor. The split-backward schedules are
    refused with it (``ParallelModel``): torch's ``stage_backward_input``
    failed through the checkpoint in tests. The replay covers the whole stage in one piece: the plan has one
    ``recompute`` flag per stage, and its memory model (one block's saved
    tensors as the transient) is a lower bound of the replay's peak, which
    holds the whole stage's saved tensors of one micro-batch during its
    backward.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, *args, use_reentrant=False)


class ParallelModel:
    """The model of one plan, on this rank: its stages, their optimizer, and the step.

    Built by :func:`auto_parallelize`. Every rank of the job holds one and
    calls ``step`` with the same global batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan,
        example_inputs: Sequence[Any],
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        optimizer: OptimizerFactory | None,
        timeout_s: float = 20.0,
        init_seed: int = 0,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from .capture import model_fingerprint

        self.plan = plan
        self.rank = dist.get_rank()
        world = dist.get_world_size()
        mesh = plan.mesh
        if world != mesh.world_size:
            raise DistributedError(
                f"plan mesh {mesh} needs {mesh.world_size} ranks but this job has {world}; "
                f"launch torchrun --nproc-per-node {mesh.world_size}, or re-plan for {world} ranks (--cluster local-cpu:{world}; Cluster.local({world}) in Python)"
            )
        plan.check_consistent()
        plan.check_matches(model_fingerprint(model))
        self.device = rank_device().device  # cuda:LOCAL_RANK, never a bare "cuda" ([Note: one rank per device])
        self.mesh = init_device_mesh(self.device.type, (mesh.pp, mesh.dp, mesh.tp), mesh_dim_names=("pp", "dp", "tp"))
        self.pp_index = self.rank // (mesh.dp * mesh.tp)
        self.dp_index = (self.rank // mesh.tp) % mesh.dp
        self.tp_index = self.rank % mesh.tp
        n_stages = len(plan.stages)
        self._split_backward = schedule_spec(plan.schedule.name).splits_backward
        if self._split_backward and any(st.recomputes for st in plan.stages):
            raise PlanError(
                f"plan: schedule {plan.schedule.name!r} splits the backward, which torch's stage_backward_input "
                "cannot run through a recomputed stage yet; re-plan with --no-recompute or another schedule"
            )
        self._fsdp = dp_spec(plan.training.dp_sharding).uses_fsdp and mesh.dp > 1
        layout = schedule_spec(plan.schedule.name).layout
        self.stage_indices = rank_stages(self.pp_index, mesh.pp, plan.schedule.virtual_stages, layout)
        self.model_name = plan.model.name
        self.fingerprint = plan.model.fingerprint
        self._loss_fn = loss_fn
        sched = plan.schedule
        self.micro_batch_size = sched.micro_batch_size
        on_meta = has_meta_tensors(model)
        self.split: SplitModel = split_model(model, plan, microbatch_inputs(example_inputs, sched.micro_batch_size),
                                             device=self.device if on_meta else None)
        if on_meta:
            self._materialize_own(model, init_seed)

        # Stage modules: tp shards, then DDP over dp.
        stage_cls = _stage_class()
        self._ddp_timer = DdpTimer()
        self.times: RankTime | None = None  # the last recorded step's time components (step(record=True))
        self.memory: RankMemory | None = None  # the last step's memory by category (step(track_memory=True))
        self.modules: dict[int, torch.nn.Module] = {}
        self.stages: list[Any] = []
        self.split_dims: dict[str, int] = {}
        for s in self.stage_indices:
            prog = self.split.stages[s]
            mod: torch.nn.Module = prog.module
            st = plan.stages[s]
            whole = len(st.recompute) == len(st.modules) and not st.selective  # [Note: recomputation as priced]
            if mesh.tp > 1:
                regions = () if whole else recompute_regions(prog.module, st)  # [Note: recompute in the runtime]
                mod = TensorParallelModule(prog, self.mesh["tp"], regions)
                self.split_dims.update(mod.split_dim)
                if on_meta:  # the whole tensors were only needed to cut this rank's shard from
                    release(model, mod.split_dim)
            mod.to(self.device)
            self.modules[s] = mod
            run = mod
            if self._fsdp:  # ZeRO-2/3, HSDP: blocks and stage root as FSDP2 units over dp ([Note: FSDP units])
                run = shard_stage(mod, plan.stages[s].modules, self._fsdp_mesh(), dp_spec(plan.training.dp_sharding))
            if st.recomputes and not whole and mesh.tp == 1:  # after FSDP's folding ([Note: recompute in the runtime])
                checkpoint_in_graph(prog.module, st)
            if st.recompute and whole:  # [Note: recomputation as priced]; around FSDP's units, which regather
                run = RecomputedStage(run)
            # Split-backward schedules compute weight gradients with autograd.grad, which DDP's
            # hooks never see: their replicas average gradients in step() instead.
            if mesh.dp > 1 and not self._split_backward and not self._fsdp and any(p.requires_grad for p in mod.parameters()):
                from torch.nn.parallel import DistributedDataParallel

                # Gradients as views of DDP's buckets: no second copy, as the memory model counts them.
                run = DistributedDataParallel(run, process_group=self.mesh["dp"].get_group(),
                                              gradient_as_bucket_view=True)
                self._ddp_timer.register(run, s, self.mesh["dp"].get_group())  # [Note: measured time components]
            # Static shapes: the stages never exchange metadata at run time (see [Note: static stage shapes]).
            examples = [
                tuple(
                    torch.empty(shape, dtype=dtype, device=self.device).requires_grad_(dtype.is_floating_point and grad)
                    for shape, dtype in specs
                )
                for specs, grad in ((prog.input_specs, s > 0), (prog.output_specs, True))
            ]
            self.stages.append(
                stage_cls(run, s, n_stages, self.device, input_args=examples[0], output_args=examples[1],
                          group=self.mesh["pp"].get_group())
            )
        self.params: dict[str, torch.nn.Parameter] = {}
        for s in self.stage_indices:
            for name, p in self.modules[s].named_parameters():
                name = name.removeprefix("graph_module.")
                if p.requires_grad:
                    # Two stages of one rank share the tensor ([Note: tied weights across stages]).
                    self.params.setdefault(name, p)
        self._tied = self._tied_groups()
        factory = optimizer or (lambda ps: torch.optim.AdamW(ps, lr=1e-3))
        make = factory
        if plan.training.dp_sharding == "zero1" and mesh.dp > 1:
            dp_group = self.mesh["dp"].get_group()
            make = lambda ps: _zero1(factory, list(ps), dp_group)  # noqa: E731
        # The plan's precision: fp32 masters for adam-mixed, fp16 loss scaling ([Note: mixed precision as priced]).
        self.precision = PrecisionPolicy.from_training(plan.training.dtype, plan.training.optimizer)
        params = list(self.params.values())
        self.optimizer = MasterWeightOptimizer(params, make) if self.precision.master_dtype else make(params)
        self.scaler = make_scaler(self.precision, self.device)
        self.schedule = self._make_schedule()
        self._watchdog = Watchdog(self.rank, self._stages_of, timeout_s)
        for st in self.stages:
            st.watchdog = self._watchdog
        self._set_timeouts(timeout_s)
        self.steps_done = 0

    # --- building -------------------------------------------------------------------

    def _fsdp_mesh(self) -> Any:
        """The mesh FSDP shards over: the dp axis, or for HSDP a 2-D ``(dp_rep, dp_shard)`` mesh whose
        shard dimension is the dp ranks of one node of the plan's cluster (dp_sharding.hsdp_shard)."""
        if not dp_spec(self.plan.training.dp_sharding).within_node:
            return self.mesh["dp"]
        if getattr(self, "_hsdp_mesh", None) is None:
            from torch.distributed.device_mesh import init_device_mesh

            from .dp_sharding import hsdp_shard

            mesh = self.plan.mesh
            cluster = Cluster.from_dict(dict(self.plan.cluster))
            shard = hsdp_shard(mesh.dp_group(0), cluster.node_of)
            full = init_device_mesh(self.device.type, (mesh.pp, mesh.dp // shard, shard, mesh.tp),
                                    mesh_dim_names=("pp", "dp_rep", "dp_shard", "tp"))
            self._hsdp_mesh = full["dp_rep", "dp_shard"]
        return self._hsdp_mesh

    def _stages_of(self, rank: int) -> str:
        return self.plan.stages_label(rank)

    def _set_timeouts(self, timeout_s: float) -> None:
        """The backend's own timeout on every group of the mesh, behind the watchdog (a backstop;
        gloo's point-to-point receives do not honour it: [Note: failing ranks] in watchdog.py)."""
        from torch.distributed.distributed_c10d import _set_pg_timeout

        timeout = timedelta(seconds=backend_timeout_s(timeout_s))
        groups = [None] + [self.mesh[axis].get_group() for axis in ("pp", "dp", "tp")]
        for group in groups:
            try:
                _set_pg_timeout(timeout, group)
            except Exception:  # a backend without a settable timeout keeps its default
                pass

    def _materialize_own(self, model: torch.nn.Module, seed: int) -> None:
        """Give real values to the tensors this rank's stages read, and only those ([Note: deterministic
        initialization] in materialize.py); rebind the stage modules to them."""
        own = {
            name
            for s in self.stage_indices
            for name, _ in [*self.split.stages[s].module.named_parameters(), *self.split.stages[s].module.named_buffers()]
        }
        materialize(model, self.device, own, seed=seed)
        for s in self.stage_indices:
            stage_module = self.split.stages[s].module
            for name in [n for n, _ in stage_module.named_parameters()] + [n for n, _ in stage_module.named_buffers()]:
                set_tensor(stage_module, name, get_tensor(model, name), model)

    def _make_schedule(self) -> Any:
        """torch's schedule object for the plan's schedule, from the registry (schedules.py).

        ``scale_grads=False``: torch would divide each stage's gradients by the
        number of micro-batches, and a tied weight whose two stages share this
        rank (the V-shaped schedules put stage 0 and the last stage together)
        would be divided twice. ``step`` divides each parameter once instead.
        """
        import torch.distributed.pipelining as pipelining

        sched = self.plan.schedule
        entry = schedule_spec(sched.name)
        spec = self.split.out_spec

        def loss(out: Any, target: torch.Tensor) -> torch.Tensor:
            flat = loss_inputs(list(out) if isinstance(out, (tuple, list)) else [out], self.precision)
            self._watchdog.progress("compute")
            value = self._loss_fn(tree_unflatten(flat, spec), target)
            self._watchdog.progress("wait")
            return value if self.scaler is None else self.scaler.scale(value)  # fp16: scaled backward

        cls = getattr(pipelining, entry.torch_class)
        stages = self.stages if entry.multi_stage else self.stages[0]
        return cls(stages, sched.microbatches, loss_fn=loss, scale_grads=False)

    def _tied_groups(self) -> list[tuple[str, Any]]:
        """(param, process group) for each tied weight whose owners span pipeline ranks.

        Every rank creates every group, in the same order (``new_group`` is collective)."""
        mesh = self.plan.mesh
        mine: list[tuple[str, Any]] = []
        for name in sorted(self.split.shared):
            layout = schedule_spec(self.plan.schedule.name).layout
            owners = sorted({stage_rank(s, mesh.pp, layout) for s in self.split.shared[name]})
            if len(owners) < 2:
                continue
            for d in range(mesh.dp):
                for t in range(mesh.tp):
                    ranks = [mesh.rank(o, d, t) for o in owners]
                    group = dist.new_group(ranks)
                    if self.rank in ranks:
                        mine.append((name, group))
        return mine

    # --- training -------------------------------------------------------------------

    def step(self, *inputs: torch.Tensor, target: torch.Tensor, record: bool = False,
             track_memory: bool = False) -> float:
        """One optimizer step on the global batch ``inputs``/``target`` (the same on every rank).

        Returns the step's mean loss on every rank. With ``record=True`` the
        stages' forward/backward times land in ``self.events`` and the step's
        time by component in ``self.times``; with ``track_memory=True`` the
        step's peak memory by category lands in ``self.memory`` (measure.py;
        tracking slows the step down, so time a step without it).
        """
        local_inputs = [self._replica_slice(x, f"input {i}") for i, x in enumerate(inputs)]
        local_target = self._replica_slice(target, "target")
        origin = time.perf_counter()
        self.events: list[StepEvent] = []
        for st in self.stages:
            st.events = self.events if record else None
            st.origin = origin
        self._watchdog.busy = self._watchdog.in_step = True
        self._watchdog.progress("wait")
        clock = StepClock()
        self._ddp_timer.reset(record)
        measuring = contextlib.ExitStack()  # the memory meter and the collectives' profiler, when asked for
        try:
            # DDP's gradients are views of its buckets: zeroed, not dropped, so that the micro-batches
            # accumulate into the buckets. Dropped, the accumulation outside DDP's last micro-batch
            # makes a second copy of every gradient, which the memory model does not count (measured:
            # the temporaries of a dp run, docs/runtime.md).
            self.optimizer.zero_grad(set_to_none=not self._ddp_timer.registered)
            meter = measuring.enter_context(self._memory_meter(track_memory))
            tp_intervals = measuring.enter_context(tp_profile(record and self.plan.mesh.tp > 1))
            losses: list[torch.Tensor] = []
            self.schedule.step(*local_inputs, target=local_target, losses=losses, return_outputs=False)
            clock.lap()
            self._finish_gradients()
            clock.lap("finish")
            for name, group in self._tied:
                grad = self.params[name].grad
                if grad is not None:
                    dist.all_reduce(_local(grad), group=group)  # FSDP: each owner's same dp shard
            clock.lap("other")
            scale = 1.0 if self.scaler is None else self.scaler.get_scale()
            optimizer_step(self.optimizer, self.scaler)
            clock.lap("optimizer")
            # The loss's all-reduce is where a rank that finished early waits for the others: it counts
            # as waiting ([Note: measured time components]), so it is no lap of its own.
            mean = torch.stack([l.detach().float() for l in losses]).mean() / scale if losses else torch.zeros(())
            mean = mean.to(self.device)
            dist.all_reduce(mean)
            step_s = time.perf_counter() - origin  # before the meter and profiler wind down
        except Exception as exc:
            # Our own failure is published at once; a communication error names the peer that
            # failed first ([Note: failing ranks] in watchdog.py).
            raise self._watchdog.failed(exc) from exc
        finally:
            measuring.close()
            self._watchdog.busy = self._watchdog.in_step = False
            self._watchdog.progress("idle")
        self.steps_done += 1
        if record:
            self.times = rank_time(self.rank, self.stage_indices, self.events, origin, step_s, clock.spans,
                                   self._ddp_timer, tp_intervals)
        if track_memory:
            self.memory = self._rank_memory(meter)
        return float(mean) / (self.plan.mesh.dp * self.plan.mesh.tp)

    def _memory_meter(self, track: bool) -> Any:
        if not track:
            return contextlib.nullcontext()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return StorageMeter(list(self.modules.values()), self.optimizer)

    def _rank_memory(self, meter: StorageMeter) -> RankMemory:
        """This rank's measured memory over the step ``meter`` watched, with the plan's prediction for it."""
        peak, at_peak, resident = meter.result(list(self.modules.values()), self.optimizer)
        source = "dispatch"
        if self.device.type == "cuda":
            peak, source = int(torch.cuda.max_memory_allocated(self.device)), "cuda.max_memory_allocated"
        predicted = [self.plan.stages[s].predicted for s in self.stage_indices]
        known = all(p is not None for p in predicted)
        return RankMemory(
            rank=self.rank, stages=tuple(self.stage_indices), source=source, peak_bytes=peak, at_peak=at_peak,
            resident=resident,
            predicted_static_bytes=sum(p.static_bytes for p in predicted) if known else -1,
            # Activations and the peak are per pipeline rank already (StagePredicted).
            predicted_activation_bytes=max(p.activation_bytes for p in predicted) if known else -1,
            predicted_peak_bytes=max(p.memory_bytes for p in predicted) if known else -1,
        )

    def _finish_gradients(self) -> None:
        """Mean over micro-batches (see ``_make_schedule``), and over replicas where DDP did not run."""
        scale = self.plan.schedule.microbatches
        replicas = self.plan.mesh.dp if self._split_backward else 1
        dp_group = self.mesh["dp"].get_group() if replicas > 1 else None
        for p in {id(p): p for p in self.params.values()}.values():  # a tensor under two names: once
            if p.grad is None:
                continue
            if dp_group is not None:
                dist.all_reduce(_local(p.grad), group=dp_group)
            p.grad.div_(scale * replicas)

    def _replica_slice(self, x: torch.Tensor, what: str) -> torch.Tensor:
        gb = self.plan.training.global_batch
        per = gb // self.plan.mesh.dp
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise DistributedError(f"step(): {what} must be a tensor with a batch dimension")
        if x.shape[0] == gb:
            return x[self.dp_index * per : (self.dp_index + 1) * per].to(self.device)
        if x.shape[0] == per and self.plan.mesh.dp > 1:
            return x.to(self.device)  # already this replica's share
        raise DistributedError(
            f"step(): {what} has batch {x.shape[0]} but the plan's training.global_batch is {gb} "
            f"(or {per} per data-parallel replica); pass the batch the plan was made for"
        )

    # --- parameters by their original names ----------------------------------------

    def _dtensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a local shard of parameter ``name``, or a state of the same shape) as a global view."""
        dim = self.split_dims.get(name)
        if dim is None or t.dim() == 0:
            return t
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(t, self.mesh["tp"], [Shard(dim)], run_check=False)

    def full_tensors(self, what: str = "param") -> dict[str, torch.Tensor]:
        """This rank's parameters (``what="param"``) or gradients (``"grad"``) at full shape, by original name.

        Collective over the tp axis, and over dp under ZeRO-2/3 (shards are gathered)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name in sorted(self.params):
            p = self.params[name]
            t = p.detach() if what == "param" else p.grad
            if t is None:
                continue
            if isinstance(t, DTensor):  # ZeRO-2/3: this tp rank's shard, itself sharded over dp
                t = t.full_tensor()
            d = self._dtensor(name, t)
            out[name] = d.full_tensor() if d is not t else t.clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Parameters and optimizer state keyed by the model's parameter names (DTensors where split)."""
        sd: dict[str, Any] = {f"model.{n}": self._dtensor(n, p.detach()) for n, p in self.params.items()}
        for name, p in self.params.items():
            for key, value in _state_of(self.optimizer).get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    sd[f"optim.{name}.{key}"] = self._dtensor(name, value) if value.shape == p.shape else value
        return sd

    # --- checkpoints ----------------------------------------------------------------

    def _refuse_fsdp_checkpoint(self, what: str) -> None:
        """Checkpoints of FSDP shards of tp shards are not written or read yet: refuse in one line. (Under
        FSDP alone the parameters are DTensors over dp, which torch.distributed.checkpoint reshards.)"""
        if self._fsdp and self.plan.mesh.tp > 1:
            raise CheckpointError(
                f"cannot {what} a checkpoint under training.dp_sharding {self.plan.training.dp_sharding!r} with "
                f"tp={self.plan.mesh.tp} yet (FSDP shards of tensor-parallel shards); use a plan with tp=1 or "
                "--dp-sharding none or zero1"
            )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write a ``torch.distributed.checkpoint`` directory keyed by the model's parameter names."""
        import torch.distributed.checkpoint as dcp

        self._refuse_fsdp_checkpoint("save")
        path = Path(path)
        exists = [path.exists() and any(path.iterdir())] if path.is_dir() else [path.exists()]
        dist.broadcast_object_list(exists, src=0)
        if exists[0] and not overwrite:
            raise CheckpointError(f"checkpoint path {path} exists and is not empty; pass overwrite=True or pick a new path")
        self._watchdog.busy = True
        try:
            dcp.save(self.state_dict(), checkpoint_id=str(path))
            dist.barrier()  # every rank's shard is written before rank 0 checksums them
            if self.rank == 0:
                meta = dict(model=self.model_name, fingerprint=self.fingerprint, steps=self.steps_done,
                            plan_mesh=str(self.plan.mesh), optimizer=type(self.optimizer).__name__)
                write_manifest(path, meta)  # [Note: checkpoint checksums] in checkpoint.py
            dist.barrier()
        finally:
            self._watchdog.busy = False

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint saved under any plan of the same model; nothing changes if it fails."""
        import torch.distributed.checkpoint as dcp

        self._refuse_fsdp_checkpoint("load")
        path = Path(path)
        problem = self._check_checkpoint(path)
        verdicts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, problem)
        bad = next((v for v in verdicts if v), None)
        if bad:
            raise CheckpointError(bad)
        _init_optimizer_state(self.optimizer)
        live = self.state_dict()
        staged = {k: _empty_like(v) for k, v in live.items()}
        self._watchdog.busy = True
        try:
            from torch.distributed.checkpoint.api import CheckpointException

            try:
                dcp.load(staged, checkpoint_id=str(path))
                ok = [None]
            except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
                ok = [f"checkpoint {path} could not be read ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                      "it is corrupt or incomplete: save it again"]
            verdicts = [None] * dist.get_world_size()
            dist.all_gather_object(verdicts, ok[0])
            bad = next((v for v in verdicts if v), None)
            if bad:
                raise CheckpointError(bad)
            with torch.no_grad():
                for k, v in staged.items():
                    dst = live[k]
                    _local(dst).copy_(_local(v))
        finally:
            self._watchdog.busy = False
        self.steps_done = int(read_manifest(path).get("steps", 0))

    def _check_checkpoint(self, path: Path) -> str | None:
        """One line saying what is wrong with the checkpoint at ``path``, or None. Rank 0 verifies
        every file's and tensor's checksum ([Note: checkpoint checksums] in checkpoint.py)."""
        try:
            meta = verify(path) if self.rank == 0 else read_manifest(path)
        except CheckpointError as exc:
            return str(exc)
        fingerprint = meta["fingerprint"]
        if fingerprint != self.fingerprint:
            return (
                f"checkpoint {path} is of model {meta.get('model')!r} (fingerprint {fingerprint}), not of this "
                f"model {self.model_name!r} ({self.fingerprint}); load a checkpoint of this model"
            )
        try:
            from torch.distributed.checkpoint import FileSystemReader

            keys = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        except Exception as exc:
            return f"checkpoint {path}: .metadata is corrupt ({type(exc).__name__}); save the checkpoint again"
        missing = sorted(k for k in self.state_dict() if k not in keys)
        if missing:
            return f"checkpoint {path} lacks {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; it was saved with another optimizer or model"
        return None

    def close(self) -> None:
        """Stop the watchdog and mark this rank done (peers stop watching it)."""
        self._watchdog.close()


def _zero1(factory: OptimizerFactory, params: list[torch.nn.Parameter], dp_group: Any) -> torch.optim.Optimizer:
    """The plan's ``training.dp_sharding`` ``zero1``: the optimizer ``factory`` makes, its state sharded over the dp
    group by ``ZeroRedundancyOptimizer`` (each dp rank steps its share of the parameters and
    broadcasts them). The optimizer's class and settings are read from one it builds on a probe."""
    import inspect

    from torch.distributed.optim import ZeroRedundancyOptimizer

    probe = factory([torch.nn.Parameter(torch.zeros(1))])
    cls = type(probe)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in probe.defaults.items() if k in accepted and k != "params"}
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=dp_group, **defaults)


def _state_of(optim: torch.optim.Optimizer) -> Mapping[Any, Any]:
    """Per-parameter optimizer state; under ZeRO-1 only this rank's share (the wrapped optimizer's)."""
    return getattr(optim, "optim", optim).state


def _init_optimizer_state(optim: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (a step with zero gradients and zero learning rate), so that
    a checkpoint has somewhere to load into. Leaves the parameters unchanged."""
    if _state_of(optim):
        return
    params = [p for g in optim.param_groups for p in g["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g.get("lr") for g in optim.param_groups]
    for g in optim.param_groups:
        if "lr" in g:
            g["lr"] = 0.0
    optim.step()
    for g, lr in zip(optim.param_groups, lrs):
        if lr is not None:
            g["lr"] = lr
    optim.zero_grad(set_to_none=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return DTensor.from_local(torch.empty_like(t.to_local()), t.device_mesh, t.placements, run_check=False)
    return torch.empty_like(t)


# --------------------------------------------------------------------------------------
# autopart run
# --------------------------------------------------------------------------------------


def run_plan(
    plan_path: str | os.PathLike[str],
    model_spec: str | None = None,
    *,
    config: Sequence[str] = (),
    seq_len: int | None = None,
    steps: int = 10,
    warmup: int = 1,
    json_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    data: str | os.PathLike[str] | None = None,
    force: bool = False,
    timeout_s: float = 20.0,
    measure: bool | None = None,
) -> int:
    """``autopart run``: train ``plan_path`` under torchrun on a fixed synthetic corpus (or the token
    file ``data``); print and record step times and losses.

    The model is the one the plan records (``model.source``); ``model_spec``, ``config`` and
    ``seq_len`` replace its parts when given (a plan without a source needs ``model_spec``).
    ``json_path`` must not exist unless ``force`` (checked before any work, as every output path).
    The ``--json`` file (rank 0) is ``{"plan", "world_size", "data", "step_times_s", "losses", "events",
    "peak_memory_bytes"}``; ``events`` are every rank's ``StepEvent`` records of the last measured step
    (docs/runtime.md). The plan is checked against the model before the process group starts
    (``planner.check_plan``). With ``measure`` (the default when ``json_path`` is given), the first step's memory is tracked by
    category and two untimed steps follow the timed ones, one recording the time components and one
    tracking steady-state memory (measure.py); the ``--json`` file adds ``plan_data`` (the plan),
    ``memory`` (each rank's ``RankMemory``, the step of the higher peak) and ``times`` (``RankTime``).
    """
    from .capture import model_fingerprint
    from .corpus import TokenCorpus
    from .outputs import check_output_file
    from .planner import check_plan
    from .zoo import DTYPES_TORCH, load_model, parse_config_overrides

    plan = Plan.load(plan_path)
    # Before any step: a run must never train for minutes and then lose its record (or overwrite one).
    check_output_file(json_path, force, "--json", "run.json")
    measure = json_path is not None if measure is None else measure
    plan.check_consistent()
    source = plan.model_source(model_spec, parse_config_overrides(config), seq_len)
    if source.seq_len is None and plan.model.source is None:  # a version-2 plan: its inputs' shape says
        shapes = plan.model.input_shapes
        if shapes and len(shapes[0]) > 1:
            source = replace(source, seq_len=shapes[0][1])
    dtype = next((k for k, v in DTYPES_TORCH.items() if k == plan.training.dtype), "fp32")
    # Built on meta: each rank materializes only its own stages' weights (seeded), see auto_parallelize.
    loaded = load_model(source.spec, seq_len=source.seq_len, dtype=dtype if dtype != "tf32" else "fp32",
                        config=source.config, device="meta")
    plan.check_matches(model_fingerprint(loaded.model), given=source)  # before the process group: one clear line
    model_spec = source.spec
    model = loaded.model.train()
    plan = check_plan(plan, model, loaded.example_inputs)
    # A language model: token ids in, logits out (a ModelOutput's .logits, or the tensor itself).
    token_ids = all(not x.dtype.is_floating_point for x in loaded.example_inputs if isinstance(x, torch.Tensor))
    if data is not None and not token_ids:
        raise DistributedError(f"--data {data}: model {model_spec} does not take token ids; --data is for language models")
    if not dist.is_initialized() and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
        n = plan.mesh.world_size
        raise DistributedError(f"autopart run trains on {n} ranks: pass --nproc-per-node {n}, or run it under "
                               f"torchrun --nproc-per-node {n} -m partitioner run ...")
    rank, world = _init_process_group(None, timeout_s)

    def loss_fn(out: Any, y: torch.Tensor) -> torch.Tensor:
        out = getattr(out, "logits", out)
        if token_ids:
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return torch.nn.functional.mse_loss(out, y)

    # The optimizer the plan priced (its memory): SGD for "sgd", AdamW for the Adam variants.
    opt: OptimizerFactory | None = (lambda ps: torch.optim.SGD(ps, lr=1e-3)) if plan.training.optimizer == "sgd" else None
    pm = ParallelModel(model, plan, loaded.example_inputs, loss_fn, opt, timeout_s=timeout_s, init_seed=seed)
    # The output's shape per micro-batch, from the split (a meta model cannot run a forward).
    last = pm.split.stages[-1].output_specs
    probe = tree_unflatten([torch.empty(shape, dtype=dt, device="meta") for shape, dt in last], pm.split.out_spec)
    out = getattr(probe, "logits", probe)
    if not isinstance(out, torch.Tensor):
        pm.close()
        raise DistributedError(f"model {model_spec}: its output is neither a tensor nor has .logits; autopart run cannot make a loss for it")
    gb = plan.training.global_batch
    gen = torch.Generator().manual_seed(seed + 1)
    corpus: TokenCorpus | None = None
    if token_ids:  # a fixed corpus the model can learn from (see partitioner/corpus.py)
        ids_shape = loaded.example_inputs[0].shape
        window = int(ids_shape[1]) if len(ids_shape) > 1 else 1
        try:
            corpus = TokenCorpus.make(out.shape[-1], window, data, seed=seed)
        except AutopartError:
            pm.close()
            raise
        data_source = corpus.source
    else:  # a fixed set of regression batches, cycled
        fixed = [
            (tuple(torch.randn((gb, *x.shape[1:]), generator=gen, dtype=x.dtype) for x in loaded.example_inputs),
             torch.randn((gb, *out.shape[1:]), generator=gen, dtype=out.dtype))
            for _ in range(4)
        ]
        data_source = "synthetic regression (4 fixed batches, cycled)"

    def batch(step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if corpus is None:
            return fixed[step % len(fixed)]
        ids, target = corpus.batch(step, gb, window)
        # Further inputs (rare for a language model) keep random values of their shape.
        rest = [torch.randint(0, out.shape[-1], (gb, *x.shape[1:]), generator=gen) for x in loaded.example_inputs[1:]]
        return (ids, *rest), target

    times: list[float] = []
    losses: list[float] = []
    total = warmup + steps
    memory: list[Any] = []  # this rank's RankMemory of the first step and of a steady one
    try:
        for i in range(total):
            inputs, target = batch(i)
            dist.barrier()
            t0 = time.perf_counter()
            first = measure and i == 0 and warmup > 0  # the optimizer's state is made in it: a peak of its own
            loss = pm.step(*inputs, target=target, record=i == total - 1 and not measure, track_memory=first)
            dt = time.perf_counter() - t0
            memory += [pm.memory] if first else []
            if i >= warmup:
                times.append(dt)
                losses.append(loss)
            if rank == 0:
                label = "warmup" if i < warmup else f"step {i - warmup + 1}/{steps}"
                print(f"{label:>12}  {dt * 1e3:9.1f} ms  loss {loss:.4f}", flush=True)
        if measure:  # two more steps, untimed: components (profiled under tp) and steady-state memory
            for kind in ("track_memory", "record"):
                inputs, target = batch(total)
                dist.barrier()
                pm.step(*inputs, target=target, **{kind: True})
                memory += [pm.memory] if kind == "track_memory" else []
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [asdict(e) for e in pm.events])
        measured: list[Any] = [None] * world  # [Note: measured time components] in measure.py
        if measure:
            mine = dict(memory=asdict(max(memory, key=lambda m: m.peak_bytes)), time=asdict(pm.times))
            dist.all_gather_object(measured, mine)
        # Each rank's peak allocated device memory (CUDA only; the CPU allocator keeps no such count).
        peak = int(torch.cuda.max_memory_allocated(pm.device)) if pm.device.type == "cuda" else None
        peaks: list[Any] = [None] * world
        dist.all_gather_object(peaks, peak)
    finally:
        pm.close()
    if rank == 0:
        mean = sum(times) / len(times)
        print(f"{plan.model.name} · mesh {plan.mesh} · {plan.schedule.name}: mean step {mean * 1e3:.1f} ms "
              f"over {steps} steps ({gb / mean:.1f} samples/s)")
        if json_path is not None:
            record = dict(plan=str(plan_path), world_size=world, data=data_source, step_times_s=times, losses=losses,
                          events=[e for rank_events in gathered for e in rank_events], peak_memory_bytes=peaks)
            if measure:  # what `autopart explain --measured` reads: the plan itself and each rank's measurements
                record.update(plan_data=plan.to_dict(), memory=[m["memory"] for m in measured],
                              times=[m["time"] for m in measured])
            tmp = Path(str(json_path) + ".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(json_path)
            print(f"wrote {json_path}")
    dist.barrier()
    dist.destroy_process_group()
    return 0
