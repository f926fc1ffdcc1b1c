"""Optimizer state and checkpoints of a ``ParallelModel``, keyed by the model's own parameter names.

``save_checkpoint`` writes a ``torch.distributed.checkpoint`` directory of
this rank's parameters and optimizer state, keyed by the original
parameter names and with split tensors as DTensors of their whole shape, so
a run saved under one plan loads under another (pp=2 into tp=2, say);
``load_checkpoint`` reads it back, all ranks or none. The checksums and
the manifest are checkpoint.py's ([Note: checkpoint checksums]).

[Note: checkpoint layout]
The optimizer's state is read and written by torch's
``torch.distributed.checkpoint.state_dict`` (``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` with ``flatten_optimizer_state_dict``, the
option torch provides for resharding across pipeline layouts), over a
module that holds this rank's parameters at their original names
(:func:`param_module`): a stage module names them otherwise
(``graph_module.`` under tensor parallelism, several stages per rank under
the interleaved schedules). A checkpoint (layout 2) holds:

- ``model.<name>``: each parameter;
- ``optim.state.<name>.<key>``: the optimizer's state (``exp_avg``, ``step``,
  ``momentum_buffer``, ...), torch's flattened keys;
- ``optim.param_groups.<name>.<setting>``: each parameter's group settings
  (``lr``, ``betas``, ``weight_decay``, ...), so a learning rate changed
  during training is restored too;
- ``master.<name>``: the fp32 master weights, under ``adam-mixed`` with a
  low-precision model ([Note: mixed precision as priced] in precision.py).

Tensors of a parameter's shape are saved as DTensors of the whole tensor:
tensor-parallel shards over the ``tp`` mesh, FSDP's shards (ZeRO-2/3, HSDP)
as FSDP made them, and FSDP's shards of tp shards over a ``(tp, dp)`` mesh
(``ParallelModel.global_view``), so ``torch.distributed.checkpoint``
reshards them into any other plan.

Two optimizers of the runtime are not ``torch.optim.Optimizer`` s over the
model's parameters, and torch's ``get_optimizer_state_dict`` refuses both
(torch 2.13, tried): ``ZeroRedundancyOptimizer`` (ZeRO-1) raises unless its
state was first consolidated whole onto one rank (``consolidate_state_dict``,
which undoes the sharding it exists for), and ``MasterWeightOptimizer``
is no ``Optimizer`` and its inner one steps fp32 copies that are not the
model's parameters (a ``KeyError``). So torch's functions are given the
optimizer that really steps (:func:`stepped`): under ZeRO-1 the wrapped
per-rank optimizer (``.optim``, which steps only this rank's share, so each
dp rank saves the state of its share and ``torch.distributed.checkpoint``
joins them), and under master weights the inner optimizer over a module of
the masters at the parameters' names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, read_manifest, verify, write_manifest
from ..plan import Plan
from ..precision import MasterWeightOptimizer
from ..watchdog import Watchdog

__all__ = ["Checkpointable", "OptimizerFactory", "STATE_LAYOUT", "load_checkpoint", "load_rank_state",
           "local_tensor", "param_module", "rank_state", "save_checkpoint", "stepped", "zero1_optimizer"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
View = Callable[[str, torch.Tensor], torch.Tensor]  # (parameter name, tensor of its shape) -> the tensor to save/load

STATE_LAYOUT = 2  # the keys of [Note: checkpoint layout]; 1 was hand-flattened (``optim.<name>.<key>``)


class Checkpointable(Protocol):
    """What a checkpoint reads of the model it saves or loads (``ParallelModel`` is one)."""

    rank: int
    plan: Plan
    optimizer: Any
    watchdog: Watchdog
    model_name: str
    fingerprint: str
    steps_done: int

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


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


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def param_module(params: Mapping[str, torch.nn.Parameter]) -> torch.nn.Module:
    """A module holding ``params`` at their names (``a.b.weight`` as parameter ``weight`` of child ``b`` of
    child ``a``), for torch's ``get/set_*_state_dict``, which name state by a module's parameter names
    ([Note: checkpoint layout]). The tensors are ``params``' own: nothing is copied."""
    root = torch.nn.Module()
    for name, p in params.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                mod.add_module(part, child)
            mod = child
        mod.register_parameter(leaf, p)
    return root


def stepped(params: Mapping[str, torch.nn.Parameter], optimizer: Any) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    """The tensors ``optimizer`` steps, by the model's names, and the ``torch.optim.Optimizer`` that steps
    this rank's share of them: the masters and the inner optimizer under ``MasterWeightOptimizer``,
    the wrapped per-rank optimizer under ZeRO-1 ([Note: checkpoint layout])."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    tensors = dict(params)
    if isinstance(optimizer, MasterWeightOptimizer):
        master = {id(p): m for p, m in zip(optimizer.params, optimizer.masters)}
        tensors = {name: master[id(p)] for name, p in params.items()}
        optimizer = optimizer.inner
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer = optimizer.optim
    return tensors, optimizer


def _owner(rest: str, names: Mapping[str, Any]) -> str | None:
    """The parameter name that ``rest`` (``<name>.<key>``, the key possibly dotted) starts with."""
    parts = rest.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        if name in names:
            return name
    return None


def _has_params(optimizer: torch.optim.Optimizer) -> bool:
    return any(g["params"] for g in optimizer.param_groups)


def rank_state(params: Mapping[str, torch.nn.Parameter], optimizer: Any, view: View) -> dict[str, Any]:
    """This rank's parameters and optimizer state as the flat dict a checkpoint stores ([Note: checkpoint
    layout]); ``view`` turns a tensor of a parameter's shape into what is saved (its global DTensor)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    if not params:  # a rank whose stages train nothing
        return {}
    sd: dict[str, Any] = {f"model.{k}": view(k, v) for k, v in get_model_state_dict(param_module(params)).items()}
    tensors, optim = stepped(params, optimizer)
    module = param_module(tensors)
    if isinstance(optimizer, MasterWeightOptimizer):
        sd.update({f"master.{k}": view(k, v) for k, v in get_model_state_dict(module).items()})
    if not _has_params(optim):  # a dp rank whose ZeRO-1 share is empty: no state of its own
        return sd
    flat = get_optimizer_state_dict(module, optim, options=StateDictOptions(flatten_optimizer_state_dict=True))
    for key, value in flat.items():
        if isinstance(value, torch.Tensor) and key.startswith("state."):
            name = _owner(key[len("state."):], tensors)
            if name is not None and value.shape == tensors[name].shape:
                value = view(name, value)
        sd[f"optim.{key}"] = value
    return sd


def load_rank_state(params: Mapping[str, torch.nn.Parameter], optimizer: Any, state: Mapping[str, Any], view: View) -> None:
    """Set this rank's parameters and optimizer state from ``state`` (keys as :func:`rank_state` makes them;
    ``view`` turns a saved tensor back into this rank's layout of it) with torch's ``set_*_state_dict``."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def section(prefix: str, names: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
            if key in names:  # model.<name>, master.<name>
                name: str | None = key
            elif key.startswith("state."):  # optim.state.<name>.<key>
                name = _owner(key[len("state."):], names)
            else:  # optim.param_groups.<name>.<setting>: no tensor of the parameter's shape
                name = None
            out[key] = view(name, value) if name is not None and isinstance(value, torch.Tensor) else value
        return out

    if not params:
        return
    set_model_state_dict(param_module(params), section("model.", params))
    tensors, optim = stepped(params, optimizer)
    module = param_module(tensors)
    if isinstance(optimizer, MasterWeightOptimizer):
        set_model_state_dict(module, section("master.", tensors))
        with torch.no_grad():
            for p, m in zip(optimizer.params, optimizer.masters):
                p.copy_(m)  # the parameters are the masters rounded ([Note: mixed precision as priced])
    if _has_params(optim):
        set_optimizer_state_dict(module, optim, section("optim.", tensors),
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))
    outer = optimizer.inner if isinstance(optimizer, MasterWeightOptimizer) else optimizer
    if isinstance(outer, ZeroRedundancyOptimizer):  # its groups' settings are copied into .optim's at each step
        for group, loaded in zip(outer.param_groups, outer.optim.param_groups):
            group.update({k: v for k, v in loaded.items() if k != "params"})


def _empty_like(t: Any) -> Any:
    """A tensor to load ``t``'s saved value into (a DTensor of the same global shape and layout)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return DTensor.from_local(torch.empty_like(t.to_local()), t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    return torch.empty_like(t) if isinstance(t, torch.Tensor) else t


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
                        plan_mesh=str(m.plan.mesh), optimizer=type(m.optimizer).__name__, state_layout=STATE_LAYOUT)
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
    staged = {k: _empty_like(v) for k, v in m.state_dict().items()}
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
        m.load_state_dict(staged)
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
    layout = meta.get("state_layout", 1)
    if layout != STATE_LAYOUT:
        return (f"checkpoint {path} has state layout {layout} (optimizer state keyed "
                f"{'optim.<name>.<key>, before torch.distributed.checkpoint.state_dict' if layout == 1 else 'by a newer autopart'}); "
                f"this autopart reads layout {STATE_LAYOUT}: load it with the autopart that wrote it and save it again")
    try:
        from torch.distributed.checkpoint import FileSystemReader

        keys = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as exc:
        return f"checkpoint {path}: .metadata is corrupt ({type(exc).__name__}); save the checkpoint again"
    missing = sorted(k for k in m.state_dict() if k not in keys)
    if missing:
        return f"checkpoint {path} lacks {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; it was saved with another optimizer or model"
    return None
