"""Which backend and device each rank uses: one rank per local device, NCCL on CUDA, gloo on CPU.

Part of the run phase (... -> Plan -> rewrite -> **run**). Every entry point
that starts or joins a process group (``auto_parallelize``, ``autopart run``,
``autopart calibrate``) asks :func:`init_distributed` here, and every tensor
the runtime creates goes to the ``RankDevice.device`` it returns, never to a
bare ``"cuda"`` (which is GPU 0 for every rank of a node).

[Note: one rank per device]
torchrun starts ``LOCAL_WORLD_SIZE`` processes per node and numbers them
``LOCAL_RANK`` 0..n-1. On a CUDA machine rank ``LOCAL_RANK`` owns GPU
``LOCAL_RANK`` and talks NCCL; ``torch.cuda.set_device`` makes it the current
device, so NCCL's communicators and the caching allocator use it too. A node
with more local ranks than GPUs would put two ranks on one GPU (NCCL refuses
that, or memory runs out at a confusing place), so it is refused here, with
the fix. Without CUDA, or with ``AUTOPART_DEVICE=cpu``, every rank runs on
the CPU and talks gloo. ``select_device`` is a pure function of the
environment and the device count, so it is tested on a machine without GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from .errors import AutopartError

__all__ = ["DeviceError", "RankDevice", "select_device", "init_distributed", "leave_distributed", "rank_device", "DEVICE_ENV"]

DEVICE_ENV = "AUTOPART_DEVICE"  # "cpu" forces gloo on CPU; "cuda" requires GPUs


class DeviceError(AutopartError):
    """A rank cannot get a device of its own (more local ranks than GPUs, a bad AUTOPART_DEVICE)."""


@dataclass(frozen=True, slots=True)
class RankDevice:
    """The backend and device of one rank."""

    backend: str  # "nccl" (CUDA) or "gloo" (CPU); under a group started elsewhere, its backend (e.g. "fake")
    device: torch.device  # cuda:LOCAL_RANK or cpu
    local_rank: int  # this rank's index on its node (torchrun's LOCAL_RANK)
    local_world_size: int  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)

    def __post_init__(self) -> None:
        if not 0 <= self.local_rank < self.local_world_size:
            raise DeviceError(
                f"LOCAL_RANK={self.local_rank} is outside 0..{self.local_world_size - 1} (LOCAL_WORLD_SIZE="
                f"{self.local_world_size}); launch with torchrun, which sets both"
            )

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DeviceError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun, which sets it") from None


def select_device(
    env: Mapping[str, str] | None = None, *, cuda_devices: int | None = None, prefer: str | None = None
) -> RankDevice:
    """This rank's backend and device from torchrun's environment (see [Note: one rank per device]).

    ``env`` defaults to ``os.environ``; ``cuda_devices`` to the CUDA devices
    visible here (0 without CUDA). ``prefer`` ("cpu" or "cuda") overrides
    ``AUTOPART_DEVICE``; "cpu" gives gloo on CPU even where GPUs exist.
    """
    env = os.environ if env is None else env
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    want = prefer if prefer is not None else env.get(DEVICE_ENV, "") or None
    if want not in (None, "cpu", "cuda"):
        raise DeviceError(f"{DEVICE_ENV}={want!r} is not 'cpu' or 'cuda'; unset it to use the GPUs when there are any")
    world = _env_int(env, "WORLD_SIZE", 1)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank % max(1, local_world))
    if want == "cpu" or (want is None and cuda_devices == 0):
        return RankDevice("gloo", torch.device("cpu"), local_rank, local_world)
    if cuda_devices == 0:
        raise DeviceError(f"{DEVICE_ENV}=cuda but this machine has no CUDA device; unset it to run on CPU with gloo")
    if local_world > cuda_devices:
        raise DeviceError(
            f"this node runs {local_world} ranks (LOCAL_WORLD_SIZE) but has {cuda_devices} CUDA device"
            f"{'s' if cuda_devices > 1 else ''}; launch torchrun --nproc-per-node {cuda_devices} (one rank per GPU), "
            f"or set {DEVICE_ENV}=cpu to run on CPU with gloo"
        )
    return RankDevice("nccl", torch.device("cuda", local_rank), local_rank, local_world)


def init_distributed(prefer: str | None = None, timeout_s: float = 300.0) -> RankDevice:
    """Select this rank's device, make it current, and start the default process group (or join it).

    Under an already initialized group, returns the device its backend implies
    (see :func:`rank_device`) and starts nothing.
    """
    if dist.is_initialized():
        return rank_device()
    chosen = select_device(prefer=prefer)
    if chosen.is_cuda:
        torch.cuda.set_device(chosen.device)
    dist.init_process_group(chosen.backend, timeout=timedelta(seconds=timeout_s))
    return chosen


def leave_distributed(synchronize: bool = True) -> None:
    """Destroy the default process group; with ``synchronize`` (every rank got here; not on an error path,
    where a peer may never come) after a last barrier that leaves gloo no work to free at exit.

    [Note: the last barrier] gloo's barrier() is a work item its run-loop thread finishes and frees, and
    with it the job's last collectives (all_gather_object's tensors, which Python owns): freed after the
    interpreter began to exit, the thread cannot take the GIL and the rank aborts ("terminate called
    without an active exception", after a run had written its results: 1 run in 5-24 here, caught in gdb
    in ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref). A monitored
    barrier runs on the calling thread and holds no earlier work.
    """
    if not dist.is_initialized():
        return
    if synchronize:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier()
        else:
            dist.barrier()
    dist.destroy_process_group()


def rank_device() -> RankDevice:
    """The device of this rank under the initialized default group: cuda:LOCAL_RANK for NCCL, else cpu.

    Sets the current CUDA device for NCCL, so that a group a user started
    without ``torch.cuda.set_device`` still gives each rank its own GPU.
    """
    if not dist.is_initialized():
        raise DeviceError("no process group: call init_distributed() first, or launch with torchrun")
    backend = dist.get_backend()
    if backend == "nccl":
        chosen = select_device(prefer="cuda")
        torch.cuda.set_device(chosen.device)
        return chosen
    env = os.environ
    world = _env_int(env, "LOCAL_WORLD_SIZE", dist.get_world_size())
    return RankDevice(backend, torch.device("cpu"), _env_int(env, "LOCAL_RANK", dist.get_rank() % world), world)
