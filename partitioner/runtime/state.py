"""Optimizer state and checkpoints of a ``ParallelModel``, keyed by the model's own parameter names.

``save_checkpoint`` writes a ``torch.distributed.checkpoint`` directory of
this rank's parameters and optimizer state, keyed by the original
parameter names and with tensor-parallel shards as DTensors, so a run
saved under one plan loads under another (pp=2 into tp=2, say);
``load_checkpoint`` reads it back, all ranks or none. The checksums and
the manifest are checkpoint.py's ([Note: checkpoint checksums]).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, read_manifest, verify, write_manifest
from ..plan import Plan
from ..watchdog import Watchdog

__all__ = ["Checkpointable", "OptimizerFactory", "init_optimizer_state", "load_checkpoint", "local_tensor",
           "optimizer_state", "save_checkpoint", "zero1_optimizer"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class Checkpointable(Protocol):
    """What a checkpoint reads of the model it saves or loads (``ParallelModel`` is one)."""

    rank: int
    plan: Plan
    optimizer: torch.optim.Optimizer
    watchdog: Watchdog
    model_name: str
    fingerprint: str
    steps_done: int

    def state_dict(self) -> dict[str, Any]: ...


def zero1_optimizer(factory: OptimizerFactory, params: list[torch.nn.Parameter], dp_group: Any) -> torch.optim.Optimizer:
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


def optimizer_state(optim: torch.optim.Optimizer) -> Mapping[Any, Any]:
    """Per-parameter optimizer state; under ZeRO-1 only this rank's share (the wrapped optimizer's)."""
    return getattr(optim, "optim", optim).state


def init_optimizer_state(optim: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (a step with zero gradients and zero learning rate), so that
    a checkpoint has somewhere to load into. Leaves the parameters unchanged."""
    if optimizer_state(optim):
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


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return DTensor.from_local(torch.empty_like(t.to_local()), t.device_mesh, t.placements, run_check=False)
    return torch.empty_like(t)


def save_checkpoint(m: Checkpointable, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write a ``torch.distributed.checkpoint`` directory keyed by the model's parameter names."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    exists = [path.exists() and any(path.iterdir())] if path.is_dir() else [path.exists()]
    dist.broadcast_object_list(exists, src=0)
    if exists[0] and not overwrite:
        raise CheckpointError(f"checkpoint path {path} exists and is not empty; pass overwrite=True or pick a new path")
    m.watchdog.busy = True
    try:
        dcp.save(m.state_dict(), checkpoint_id=str(path))
        dist.barrier()  # every rank's shard is written before rank 0 checksums them
        if m.rank == 0:
            meta = dict(model=m.model_name, fingerprint=m.fingerprint, steps=m.steps_done,
                        plan_mesh=str(m.plan.mesh), optimizer=type(m.optimizer).__name__)
            write_manifest(path, meta)  # [Note: checkpoint checksums] in checkpoint.py
        dist.barrier()
    finally:
        m.watchdog.busy = False

def load_checkpoint(m: Checkpointable, path: str | os.PathLike[str]) -> None:
    """Load a checkpoint saved under any plan of the same model; nothing changes if it fails."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    problem = _check_checkpoint(m, path)
    verdicts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, problem)
    bad = next((v for v in verdicts if v), None)
    if bad:
        raise CheckpointError(bad)
    init_optimizer_state(m.optimizer)
    live = m.state_dict()
    staged = {k: _empty_like(v) for k, v in live.items()}
    m.watchdog.busy = True
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
                local_tensor(dst).copy_(local_tensor(v))
    finally:
        m.watchdog.busy = False
    m.steps_done = int(read_manifest(path).get("steps", 0))

def _check_checkpoint(m: Checkpointable, path: Path) -> str | None:
    """One line saying what is wrong with the checkpoint at ``path``, or None. Rank 0 verifies
    every file's and tensor's checksum ([Note: checkpoint checksums] in checkpoint.py)."""
    try:
        meta = verify(path) if m.rank == 0 else read_manifest(path)
    except CheckpointError as exc:
        return str(exc)
    fingerprint = meta["fingerprint"]
    if fingerprint != m.fingerprint:
        return (
            f"checkpoint {path} is of model {meta.get('model')!r} (fingerprint {fingerprint}), not of this "
            f"model {m.model_name!r} ({m.fingerprint}); load a checkpoint of this model"
        )
    try:
        from torch.distributed.checkpoint import FileSystemReader

        keys = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as exc:
        return f"checkpoint {path}: .metadata is corrupt ({type(exc).__name__}); save the checkpoint again"
    missing = sorted(k for k in m.state_dict() if k not in keys)
    if missing:
        return f"checkpoint {path} lacks {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; it was saved with another optimizer or model"
    return None
