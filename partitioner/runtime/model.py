"""The distributed model of one plan on this rank: its stage modules, their schedule, and the step.

``ParallelModel`` cuts the model into the plan's stages (rewrite.py), shards
them over ``tp`` (DTensor), wraps them for ``dp`` (DDP, ZeRO-1, or FSDP2 for
ZeRO-2/3; fsdp.py) and for recomputation, and drives them with torch's
pipelining schedule. ``step`` is one optimizer step and can measure it
(measure.py). Checkpoints are state.py's; ``auto_parallelize`` (entry.py)
and ``autopart run`` (loop.py) build it.

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
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_unflatten

from cost_models import MASTER_GRAD_CHUNK

from ..cluster import Cluster
from ..devices import rank_device
from ..dp_sharding import spec as dp_spec
from ..errors import PlanError
from ..fsdp import shard_stage
from ..materialize import has_meta_tensors, materialize, release
from ..measure import DdpTimer, RankMemory, RankTime, StepClock, StorageMeter, rank_time, tp_profile
from ..plan import Plan
from ..recompute import checkpoint_in_graph, recompute_regions
from ..precision import MasterWeightOptimizer, PrecisionPolicy, adamw_factory, loss_inputs, make_scaler, optimizer_step
from ..rewrite import SplitModel, TensorParallelModule, get_tensor, microbatch_inputs, set_tensor, split_model
from ..schedules import rank_stages, spec as schedule_spec, stage_rank
from ..watchdog import DistributedError, Watchdog, backend_timeout_s
from .state import (OptimizerFactory, load_checkpoint, load_rank_state, local_tensor, rank_state, save_checkpoint,
                    zero1_optimizer)

__all__ = ["ParallelModel", "StepEvent", "timed_stage_class"]


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


def timed_stage_class() -> type:
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


def _in_graph_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """The loss of a plan whose graph computes it (the vocabulary in chunks): the last stage's output."""
    return out


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

        from ..capture import model_fingerprint

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
        self.fsdp = dp_spec(plan.training.dp_sharding).uses_fsdp and mesh.dp > 1
        layout = schedule_spec(plan.schedule.name).layout
        self.stage_indices = rank_stages(self.pp_index, mesh.pp, plan.schedule.virtual_stages, layout)
        self.model_name = plan.model.name
        self.fingerprint = plan.model.fingerprint
        # With the vocabulary in chunks the graph computes the loss itself, from the targets as its last
        # input ([Note: vocabulary chunks] in vocab_split.py): the last stage's output is that loss.
        self._targets_in_graph = plan.model.vocab_chunks > 1
        self._loss_fn = _in_graph_loss if self._targets_in_graph else loss_fn
        sched = plan.schedule
        self.micro_batch_size = sched.micro_batch_size
        on_meta = has_meta_tensors(model)
        self.split: SplitModel = split_model(model, plan, microbatch_inputs(example_inputs, sched.micro_batch_size),
                                             device=self.device if on_meta else None)
        if on_meta:
            self._materialize_own(model, init_seed)

        # Stage modules: tp shards, then DDP over dp.
        stage_cls = timed_stage_class()
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
            if mesh.tp > 1:
                regions = recompute_regions(prog.module, st)  # [Note: recompute in the runtime] in recompute.py
                mod = TensorParallelModule(prog, self.mesh["tp"], regions)
                self.split_dims.update(mod.split_dim)
                if on_meta:  # the whole tensors were only needed to cut this rank's shard from
                    release(model, mod.split_dim)
            mod.to(self.device)
            self.modules[s] = mod
            if st.recomputes and mesh.tp == 1:  # before FSDP, which must not recompile its units
                checkpoint_in_graph(prog.module, st)  # ([Note: recompute in the runtime])
            run = mod
            if self.fsdp:  # ZeRO-2/3, HSDP: blocks and stage root as FSDP2 units over dp ([Note: FSDP units])
                run = shard_stage(mod, plan.stages[s].modules, self._fsdp_mesh(), dp_spec(plan.training.dp_sharding))
            # Split-backward schedules compute weight gradients with autograd.grad, which DDP's
            # hooks never see: their replicas average gradients in step() instead.
            if mesh.dp > 1 and not self._split_backward and not self.fsdp and any(p.requires_grad for p in mod.parameters()):
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
        # The default is the AdamW the plan priced ([Note: the optimizer step's workspace] in cost_models/memory.py).
        factory = optimizer or adamw_factory(self.device)
        make = factory
        zero1 = plan.training.dp_sharding == "zero1" and mesh.dp > 1
        if zero1:
            dp_group = self.mesh["dp"].get_group()
            make = lambda ps: zero1_optimizer(factory, list(ps), dp_group)  # noqa: E731
        # The plan's precision: fp32 masters for adam-mixed, fp16 loss scaling ([Note: mixed precision as priced]).
        self.precision = PrecisionPolicy.from_training(plan.training.dtype, plan.training.optimizer)
        params = list(self.params.values())
        # The masters' fp32 gradients a chunk at a time, but for ZeRO-1 (its step broadcasts every parameter) and a
        # user's optimizer (which may read every gradient at once, e.g. to clip them by their global norm).
        chunk = MASTER_GRAD_CHUNK if optimizer is None and not zero1 else None
        self.optimizer = (MasterWeightOptimizer(params, make, chunk_elements=chunk) if self.precision.master_dtype
                          else make(params))
        self.scaler = make_scaler(self.precision, self.device)
        self.schedule = self._make_schedule()
        self.watchdog = Watchdog(self.rank, self._stages_of, timeout_s)
        for st in self.stages:
            st.watchdog = self.watchdog
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

            from ..dp_sharding import hsdp_shard

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
            self.watchdog.progress("compute")
            value = self._loss_fn(tree_unflatten(flat, spec), target)
            self.watchdog.progress("wait")
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
        if self._targets_in_graph:
            inputs = (*inputs, target)
        local_inputs = [self._replica_slice(x, f"input {i}") for i, x in enumerate(inputs)]
        local_target = self._replica_slice(target, "target")
        origin = time.perf_counter()
        self.events: list[StepEvent] = []
        for st in self.stages:
            st.events = self.events if record else None
            st.origin = origin
        self.watchdog.busy = self.watchdog.in_step = True
        self.watchdog.progress("wait")
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
                    dist.all_reduce(local_tensor(grad), group=group)  # FSDP: each owner's same dp shard
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
            raise self.watchdog.failed(exc) from exc
        finally:
            measuring.close()
            self.watchdog.busy = self.watchdog.in_step = False
            self.watchdog.progress("idle")
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
                dist.all_reduce(local_tensor(p.grad), group=dp_group)
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

    def global_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (this rank's part of parameter ``name``, or a state of the same shape) as a DTensor of the
        whole tensor: a tp shard over the ``tp`` mesh; FSDP's dp shard of a tp shard over the ``(tp, dp)``
        mesh ([Note: FSDP shards of tp shards]); anything else as it is (FSDP's shards already are)."""
        dim = self.split_dims.get(name)
        if dim is None or t.dim() == 0:
            return t
        from torch.distributed.tensor import DTensor, Shard

        if isinstance(t, DTensor):
            shape = list(t.shape)
            shape[dim] *= self.plan.mesh.tp
            stride = torch.empty(shape, device="meta").stride()
            return DTensor.from_local(t.to_local(), self._tp_fsdp_mesh(), [Shard(dim), *t.placements],
                                      run_check=False, shape=torch.Size(shape), stride=stride)
        return DTensor.from_local(t, self.mesh["tp"], [Shard(dim)], run_check=False)

    def local_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``global_view``: a saved tensor of parameter ``name``'s shape in this rank's layout."""
        from torch.distributed.tensor import DTensor

        if name not in self.split_dims or not isinstance(t, DTensor):
            return t  # whole, or FSDP's own layout (loaded as the live tensor is)
        p = self.params[name]
        if isinstance(p, DTensor):
            return DTensor.from_local(t.to_local(), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        return t.to_local()

    def _tp_fsdp_mesh(self) -> Any:
        """The mesh on which FSDP's dp shard of a tp shard is one DTensor of the whole tensor.

        [Note: FSDP shards of tp shards]
        Under ZeRO-2/3 (and HSDP) with tp > 1 a parameter is FSDP's DTensor over the dp mesh of this
        rank's *tp shard* (the tp shards are plain tensors: ``TensorParallelModule``), so FSDP cut
        dim 0 of a piece tp had already cut along ``dim``. On a mesh ordered ``(tp, *FSDP's dims)``
        the placements ``[Shard(dim), *FSDP's]`` say exactly that (a DTensor shards mesh dimension
        by mesh dimension, the first outermost), also where ``dim`` is 0 and FSDP's chunks lie inside
        tp's. The mesh reorders the plan's ranks, ``(pp, dp, tp)``, to ``(pp, tp, dp)`` (``dp`` as
        HSDP's ``(dp_rep, dp_shard)`` where it is 2-D). Built on first use: all ranks save and load.
        """
        if getattr(self, "_tp_fsdp", None) is None:
            from torch.distributed.device_mesh import DeviceMesh

            fsdp = self._fsdp_mesh()
            names = tuple(fsdp.mesh_dim_names)
            mesh = self.plan.mesh
            ranks = torch.arange(mesh.world_size).reshape(mesh.pp, *fsdp.mesh.shape, mesh.tp).movedim(-1, 1)
            full = DeviceMesh(self.device.type, ranks, mesh_dim_names=("pp", "tp", *names))
            self._tp_fsdp = full[("tp", *names)]
        return self._tp_fsdp

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
            d = self.global_view(name, t)
            out[name] = d.full_tensor() if d is not t else t.clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Parameters and optimizer state keyed by the model's parameter names, split tensors as DTensors of the
        whole tensor ([Note: checkpoint layout] in state.py). Collective: every rank calls it."""
        if self.fsdp and self.plan.mesh.tp > 1:
            self._tp_fsdp_mesh()  # made by every rank, also one whose stages hold no tp shard
        return rank_state(self.params, self.optimizer, self.global_view)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the parameters and optimizer state from ``state`` (as ``state_dict`` returns it)."""
        load_rank_state(self.params, self.optimizer, state, self.local_view)

    # --- checkpoints (state.py) ------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write a ``torch.distributed.checkpoint`` directory keyed by the model's parameter names."""
        save_checkpoint(self, path, overwrite=overwrite)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint saved under any plan of the same model; nothing changes if it fails."""
        load_checkpoint(self, path)

    def close(self) -> None:
        """Stop the watchdog and mark this rank done (peers stop watching it)."""
        self.watchdog.close()
