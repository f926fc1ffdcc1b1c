"""Build one rank of a large plan on ``meta`` under PyTorch's fake process group, and check it.

Part of the run phase (... -> Plan -> rewrite -> **run**), as a dry run: a
plan for 512 GPUs is checked on a laptop. :func:`build_rank` pretends to be
rank ``r`` of the plan's world (``torch.testing``'s fake process group, as
meta-pytorch/autoparallel tests its own sharding), cuts the model with the
runtime's own ``split_model``, shards the rank's stages with the runtime's
``TensorParallelModule`` over a real ``DeviceMesh``, and builds the plan's
optimizer (``precision.py``) with its state, all on ``meta``: no weights, no
devices. The result, :class:`RankBuild`, lists each parameter's local and
global shape and its DTensor placement, and the bytes the rank would hold
against the plan's prediction (:meth:`RankBuild.problems`).

[Note: what a meta build checks]
It runs the code a GPU rank runs up to the first step (export, split,
tensor-parallel sharding, optimizer state) and checks: every parameter's
shard, wrapped as a DTensor over the tp mesh, has the model's full shape;
each stage holds as many trainable parameters as the plan says; and the
rank's weights + gradients + optimizer state (+ buffers) equal, to the byte,
what the planner charged for them: ``Evaluator.resident_bytes`` of the
stage's parameters, the term of each stage's predicted ``static_bytes``
(recomputed here from the captured model, the one function that priced the
plan). A stage that recomputes adds one block's activations for the replay
to its ``static_bytes``; for such ranks the rest of ``static_bytes`` is that
workspace and must not be negative. DDP and the pipeline
schedule are not built: they hold no parameter state (DDP's gradient buckets
are the gradients, see ``gradient_as_bucket_view`` in runtime/model.py) and need
live peers.

Each build starts and ends its own fake process group, so call it once per
process (the benchmark and the tests use a fresh subprocess per rank:
the fake group's ``new_group`` bookkeeping is per process).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
import torch
import torch.distributed as dist

from .errors import AutopartError
from .plan import Plan
from .precision import MasterWeightOptimizer, PrecisionPolicy, ResidentBytes, optimizer_step, resident_bytes

__all__ = ["MetaBuildError", "ParamBuild", "RankBuild", "build_rank", "build_rank_isolated", "chosen_ranks", "summary"]


class MetaBuildError(AutopartError):
    """A rank of the plan cannot be built (rank outside the world, a plan the dry run does not model)."""


@dataclass(frozen=True, slots=True)
class ParamBuild:
    """One parameter as rank ``r`` holds it."""

    name: str  # the model's parameter name
    local_shape: tuple[int, ...]  # the shard this rank allocates
    global_shape: tuple[int, ...]  # the DTensor's shape over the tp mesh (the model's full shape when right)
    full_shape: tuple[int, ...]  # the parameter's shape in the model
    placement: str  # "R" (replicated) or "S(d)" (sharded on dim d) over the tp axis, as DTensor prints them
    dtype: str


@dataclass(frozen=True, slots=True)
class RankBuild:
    """What :func:`build_rank` built for one rank, and the plan's prediction for it."""

    rank: int
    coords: tuple[int, int, int]  # (pp, dp, tp) index of the rank on the mesh
    stages: tuple[int, ...]  # the plan's stages this rank runs
    params: tuple[ParamBuild, ...]
    held: ResidentBytes  # weights, gradients, optimizer state and buffers as built
    predicted_resident_bytes: int  # what the planner charged for the stages' parameters (Evaluator.resident_bytes)
    predicted_static_bytes: int  # the plan's static_bytes summed over the rank's stages (+ recompute workspace)
    stage_params: tuple[tuple[int, int, int], ...]  # (stage, trainable params built at full shape, plan's stage.params)
    recompute_workspace: bool  # a stage recomputes: its static_bytes also hold activations (see the Note)
    optimizer: str
    build_s: float  # wall time of the build (after imports)
    cpu_s: float  # CPU time of this process for the build
    max_rss_bytes: int  # the process's peak resident memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RankBuild":
        d = dict(d)
        d["coords"] = tuple(d["coords"])
        d["stages"] = tuple(d["stages"])
        d["stage_params"] = tuple(tuple(x) for x in d["stage_params"])
        d["held"] = ResidentBytes(**d["held"])
        d["params"] = tuple(ParamBuild(**{k: tuple(v) if k.endswith("shape") else v for k, v in p.items()})
                            for p in d["params"])
        return cls(**d)

    def problems(self) -> list[str]:
        """Each disagreement with the plan, one line each; empty when the rank is as planned."""
        out = []
        for p in self.params:
            if p.global_shape != p.full_shape:
                out.append(f"rank {self.rank}: {p.name} shard {p.local_shape} as {p.placement} is {p.global_shape}, "
                           f"but the model's parameter is {p.full_shape}")
        for stage, built, planned in self.stage_params:
            if built != planned:
                out.append(f"rank {self.rank}: stage {stage} holds {built} trainable parameters, the plan says {planned}")
        if self.held.total != self.predicted_resident_bytes:
            out.append(f"rank {self.rank}: holds {self.held.total} bytes ({self.held}), the plan charged "
                       f"{self.predicted_resident_bytes} for its parameters")
        workspace = self.predicted_static_bytes - self.predicted_resident_bytes
        if workspace < 0 or (workspace > 0) != self.recompute_workspace:
            out.append(f"rank {self.rank}: the plan's static_bytes {self.predicted_static_bytes} less its parameter "
                       f"bytes {self.predicted_resident_bytes} leave {workspace}, but recompute is "
                       f"{self.recompute_workspace}")
        return out


def chosen_ranks(plan: Plan) -> tuple[int, int, int]:
    """Rank 0, a middle rank (inside the middle pipeline stage, off the tp/dp origin) and the last rank."""
    mesh = plan.mesh
    mid = mesh.rank(mesh.pp // 2, mesh.dp // 2, mesh.tp // 2 + (1 if mesh.tp > 2 else 0) if mesh.tp > 1 else 0)
    return 0, mid, mesh.world_size - 1


def build_rank(plan: Plan, model_spec: str, rank: int, *, config: dict | None = None) -> RankBuild:
    """Build rank ``rank`` of ``plan`` on meta under the fake process group; see [Note: what a meta build checks]."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .capture import model_fingerprint
    from .rewrite import TensorParallelModule, microbatch_inputs, split_model
    from .zoo import load_model

    mesh = plan.mesh
    if not 0 <= rank < mesh.world_size:
        raise MetaBuildError(f"rank {rank} is outside the plan's world of {mesh.world_size} ranks ({mesh}); pick 0..{mesh.world_size - 1}")
    if plan.training.dp_sharding != "none" and mesh.dp > 1:
        raise MetaBuildError(f"a meta build does not model training.dp_sharding {plan.training.dp_sharding!r} (its "
                             "steps need live dp peers); check the plan with --dp-sharding none")
    if dist.is_initialized():
        raise MetaBuildError("a process group is already running; build each rank in a fresh process")
    t0, c0 = time.perf_counter(), time.process_time()
    dtype = "fp32" if plan.training.dtype == "tf32" else plan.training.dtype
    shapes = plan.model.input_shapes
    seq_len = shapes[0][1] if shapes and len(shapes[0]) > 1 else None
    loaded = load_model(model_spec, seq_len=seq_len, dtype=dtype, config=config or {}, device="meta")
    model = loaded.model.train()
    plan.check_matches(model_fingerprint(model))
    predicted_resident = _planned_resident_bytes(plan, loaded, rank)
    full = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=mesh.world_size)
    try:
        device_mesh = init_device_mesh("cpu", (mesh.pp, mesh.dp, mesh.tp), mesh_dim_names=("pp", "dp", "tp"))
        pp_index = rank // (mesh.dp * mesh.tp)
        coords = (pp_index, (rank // mesh.tp) % mesh.dp, rank % mesh.tp)
        stage_indices = tuple(s for s in range(len(plan.stages)) if s % mesh.pp == pp_index)
        split = split_model(model, plan, microbatch_inputs(loaded.example_inputs, plan.schedule.micro_batch_size))
        modules: dict[int, torch.nn.Module] = {}
        split_dims: dict[str, int] = {}
        for s in stage_indices:
            mod: torch.nn.Module = split.stages[s].module
            if mesh.tp > 1:
                mod = TensorParallelModule(split.stages[s], device_mesh["tp"])
                split_dims.update(mod.split_dim)
            modules[s] = mod
        # As ParallelModel does: a tied weight used by two of this rank's stages is one tensor.
        params: dict[str, torch.nn.Parameter] = {}
        stage_params = []
        for s in stage_indices:
            built = 0
            for name, p in modules[s].named_parameters():
                name = name.removeprefix("graph_module.")
                if p.requires_grad:
                    params.setdefault(name, p)
                    built += p.numel() * (mesh.tp if name in split_dims else 1)
            stage_params.append((s, built, plan.stages[s].params))
        layout = []
        for name, p in params.items():
            dim = split_dims.get(name)
            placement = Replicate() if dim is None else Shard(dim)
            dt = DTensor.from_local(p.detach(), device_mesh["tp"], [placement], run_check=False)
            layout.append(ParamBuild(name, tuple(p.shape), tuple(dt.shape), full.get(name, ()), str(placement),
                                     str(p.dtype).removeprefix("torch.")))
        policy = PrecisionPolicy.from_training(plan.training.dtype, plan.training.optimizer)
        make = (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)) if plan.training.optimizer == "sgd" else (
            lambda ps: torch.optim.AdamW(ps, lr=1e-3))
        plist = list(params.values())
        optimizer = MasterWeightOptimizer(plist, make) if policy.master_dtype else make(plist)
        for p in plist:  # the gradients a backward leaves, so that the step creates every state tensor
            p.grad = torch.zeros_like(p)
        optimizer_step(optimizer)
        buffers = [b for m in modules.values() for b in m.buffers()]
        held = resident_bytes(plist, optimizer, buffers)
    finally:
        dist.destroy_process_group()
    return RankBuild(
        rank=rank, coords=coords, stages=stage_indices, params=tuple(layout), held=held,
        predicted_resident_bytes=predicted_resident,
        predicted_static_bytes=sum(plan.stages[s].predicted.static_bytes for s in stage_indices
                                   if plan.stages[s].predicted is not None),
        stage_params=tuple(stage_params),
        recompute_workspace=any(plan.stages[s].recomputes for s in stage_indices),
        optimizer=type(optimizer).__name__,
        build_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def _planned_resident_bytes(plan: Plan, loaded: object, rank: int) -> int:
    """The planner's charge for the parameters of ``rank``'s stages, by the function that priced the plan."""
    from .cluster import Cluster
    from .planner import prepare
    from .sharding import sharded_params

    ev = prepare(loaded.model, loaded.example_inputs, Cluster.from_dict(plan.cluster), training=plan.training,
                 name=loaded.name, batch_size=loaded.batch_size, example_kwargs=loaded.example_kwargs)
    mesh = plan.mesh
    node_of_key = ev.captured.node_of_key  # a plan names nodes by stable key ([Note: stable node keys] in capture.py)
    sharding = {node_of_key[k]: v for k, v in plan.sharding.items() if k in node_of_key}
    split = sharded_params(ev.captured, sharding) if mesh.tp > 1 else set()
    pp_index = rank // (mesh.dp * mesh.tp)
    total = 0
    for st in plan.stages:
        if st.index % mesh.pp != pp_index:
            continue
        names = {p for m in st.modules for p in ev.pgraph.blocks[ev.pgraph.block_index(m)].params}
        total += ev.resident_bytes(names, mesh.tp, mesh.dp, split)[0]
    return total


def summary(build: RankBuild) -> str:
    """One line per rank for the benchmark and the CLI."""
    shards = sum(1 for p in build.params if p.placement.startswith("S"))
    gib = 1 << 30
    return (f"rank {build.rank} (pp {build.coords[0]}, dp {build.coords[1]}, tp {build.coords[2]}; "
            f"stages {', '.join(map(str, build.stages))}): {len(build.params)} params ({shards} sharded), "
            f"holds {build.held.total} B ({build.held.total / gib:.3f} GiB), planned {build.predicted_resident_bytes} B"
            f"{' + recompute workspace' if build.recompute_workspace else ''}; built in {build.build_s:.1f} s "
            f"({build.cpu_s:.1f} s CPU)")


def build_rank_isolated(plan_path: str | os.PathLike[str], model_spec: str, rank: int, timeout_s: float = 900.0) -> RankBuild:
    """:func:`build_rank` in a fresh Python process (one fake process group per process); raises
    ``MetaBuildError`` with the child's last error line if it fails."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # the child pretends to be its rank through the fake group, not through torchrun
    proc = subprocess.run([sys.executable, "-m", "partitioner.meta_build", str(plan_path), model_spec, str(rank)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MetaBuildError(f"building rank {rank} of {plan_path} failed: {last}")
    return RankBuild.from_dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _main(argv: list[str]) -> int:
    """``python -m partitioner.meta_build PLAN MODEL RANK``: one rank's RankBuild as one JSON line."""
    if len(argv) != 3:
        print("usage: python -m partitioner.meta_build PLAN.json MODEL RANK", file=sys.stderr)
        return 2
    try:
        build = build_rank(Plan.load(argv[0]), argv[1], int(argv[2]))
    except (AutopartError, ValueError) as exc:
        print(f"autopart: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(build.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
