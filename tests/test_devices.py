"""One rank per device: backend and device selection from torchrun's environment, and under the fake process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from partitioner.devices import DeviceError, init_distributed, leave_distributed, rank_device, select_device


def _env(rank: int, world: int, local_world: int, **extra: str) -> dict[str, str]:
    return dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % local_world),
                LOCAL_WORLD_SIZE=str(local_world), **extra)


@pytest.mark.parametrize("rank", [0, 5, 13, 15])
def test_each_rank_of_a_two_node_job_gets_its_own_gpu_and_nccl(rank):
    chosen = select_device(_env(rank, 16, 8), cuda_devices=8)
    assert chosen.backend == "nccl"
    assert chosen.device == torch.device("cuda", rank % 8)  # never a bare "cuda"
    assert chosen.device.index is not None and chosen.local_world_size == 8


def test_without_gpus_every_rank_runs_gloo_on_cpu():
    for rank in range(4):
        chosen = select_device(_env(rank, 4, 4), cuda_devices=0)
        assert (chosen.backend, chosen.device, chosen.local_rank) == ("gloo", torch.device("cpu"), rank)


def test_autopart_device_cpu_forces_gloo_where_gpus_exist():
    chosen = select_device(_env(1, 2, 2, AUTOPART_DEVICE="cpu"), cuda_devices=8)
    assert (chosen.backend, chosen.device.type) == ("gloo", "cpu")
    assert select_device(_env(1, 2, 2), cuda_devices=8, prefer="cpu").backend == "gloo"


def test_more_local_ranks_than_gpus_is_a_one_line_error_with_the_fix():
    with pytest.raises(DeviceError) as err:
        select_device(_env(3, 8, 8), cuda_devices=4)
    msg = str(err.value)
    assert "\n" not in msg and "8 ranks" in msg and "4 CUDA devices" in msg and "--nproc-per-node 4" in msg


@pytest.mark.parametrize("env, fragment", [
    (dict(AUTOPART_DEVICE="tpu"), "AUTOPART_DEVICE='tpu'"),
    (dict(AUTOPART_DEVICE="cuda"), "no CUDA device"),
    (dict(LOCAL_RANK="x"), "LOCAL_RANK='x'"),
    (dict(LOCAL_RANK="4", LOCAL_WORLD_SIZE="4"), "LOCAL_RANK=4 is outside 0..3"),
])
def test_bad_environment_names_the_variable(env, fragment):
    with pytest.raises(DeviceError) as err:
        select_device(env, cuda_devices=0)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_under_the_fake_process_group_each_rank_resolves_its_own_device(monkeypatch):
    """The fake process group stands in for rank r of a 2-node job: the group's backend decides the device
    (not NCCL: cpu), while the same environment on a GPU node gives cuda:LOCAL_RANK."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    for rank in (0, 9, 15):
        for k, v in _env(rank, 16, 8).items():
            monkeypatch.setenv(k, v)
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=16)
        try:
            assert init_distributed() == rank_device()  # joins the running group, starts nothing
            mine = rank_device()
            assert (mine.backend, mine.device, mine.local_rank) == ("fake", torch.device("cpu"), rank % 8)
            assert select_device(cuda_devices=8).device == torch.device("cuda", rank % 8)
            assert dist.get_rank() == rank and dist.get_world_size() == 16
        finally:
            dist.destroy_process_group()
    with pytest.raises(DeviceError, match="no process group"):
        rank_device()


def test_leaving_a_gloo_group_barriers_then_destroys_it_and_is_a_no_op_without_one():
    """A one-rank gloo group (a real one): left after its last barrier, the default group is gone, and a
    second leave (an error path's, after a success path's) does nothing."""
    assert not dist.is_initialized()
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    dist.all_gather_object([None], {"a": 1})  # the kind of last collective [Note: the last barrier] is about
    leave_distributed()
    assert not dist.is_initialized()
    leave_distributed()
    leave_distributed(synchronize=False)
    assert not dist.is_initialized()


def test_calibrate_entry_point_reports_a_missing_gpu_in_one_line(tmp_path):
    """``autopart calibrate`` takes its device from devices.py: AUTOPART_DEVICE=cuda on a machine without
    one stops before any measuring, with the variable named."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: AUTOPART_DEVICE=cuda is valid here")
    env = dict(os.environ, AUTOPART_DEVICE="cuda", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]), **_env(0, 1, 1))
    r = subprocess.run([sys.executable, "-m", "partitioner", "calibrate", "--out", str(tmp_path / "c.toml")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "AUTOPART_DEVICE=cuda but this machine has no CUDA device" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "c.toml").exists()
