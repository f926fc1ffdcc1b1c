"""Checkpoint integrity: every byte-level corruption of a checkpoint is refused, naming the file.

A real ``torch.distributed.checkpoint`` directory (written in this process, two shard files)
with autopart's manifest; each case corrupts a copy and ``checkpoint.verify``, what
``ParallelModel.load`` runs on rank 0 before loading anything, must refuse it in one line
naming the file. tests/test_runtime.py loads a corrupted checkpoint through a real 2-rank
``ParallelModel.load`` ([Note: checkpoint checksums] in partitioner/checkpoint.py). The last test
checks the state's keys ([Note: checkpoint layout] in partitioner/runtime/state.py) in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch

from partitioner.checkpoint import CHECKPOINT_META, CheckpointError, verify, write_manifest


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch.distributed.checkpoint as dcp

    path = tmp_path_factory.mktemp("ckpt") / "good"
    g = torch.Generator().manual_seed(0)
    state = {f"model.layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(4)}
    state["optim.state.layer0.weight.momentum_buffer"] = torch.randn(64, 64, generator=g)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), thread_count=2))
    write_manifest(path, dict(model="test", fingerprint="f" * 16, steps=3))
    return path


def _shards(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.suffix == ".distcp")


def _edit(f: Path, fn: Callable[[bytearray], bytearray]) -> None:
    f.write_bytes(bytes(fn(bytearray(f.read_bytes()))))


def _put(offset_of: Callable[[int], int], data: Callable[[int], bytes]) -> Callable[[bytearray], bytearray]:
    def fn(raw: bytearray) -> bytearray:
        at = offset_of(len(raw))
        new = data(len(raw))
        raw[at : at + len(new)] = new
        return raw
    return fn


def _flip_bit(raw: bytearray) -> bytearray:
    raw[len(raw) - 700] ^= 0x10  # inside the last tensor's bytes
    return raw


def _swap(path: Path) -> None:
    a, b = _shards(path)[:2]
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _edit_manifest(path: Path) -> None:
    meta = json.loads((path / CHECKPOINT_META).read_text())
    name = next(iter(meta["files"]))
    meta["files"][name] = "0" * 64
    (path / CHECKPOINT_META).write_text(json.dumps(meta))


# case: (what it does to the copy, the file the error must name)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated to a third": (lambda p: _edit(_shards(p)[0], lambda r: r[: len(r) // 3]), "__0_0.distcp"),
    "last byte cut": (lambda p: _edit(_shards(p)[1], lambda r: r[:-1]), "__0_1.distcp"),
    "zero-filled, size kept": (lambda p: _edit(_shards(p)[0], lambda r: bytearray(len(r))), "__0_0.distcp"),
    "random 4 KiB at the start": (lambda p: _edit(_shards(p)[0], _put(lambda n: 0, lambda n: os.urandom(4096))), "__0_0.distcp"),
    "random 4 KiB in the middle": (lambda p: _edit(_shards(p)[1], _put(lambda n: n // 2, lambda n: os.urandom(4096))), "__0_1.distcp"),
    "random 256 B near the end": (lambda p: _edit(_shards(p)[0], _put(lambda n: n - 300, lambda n: os.urandom(256))), "__0_0.distcp"),
    "one bit flipped in a weight": (lambda p: _edit(_shards(p)[1], _flip_bit), "__0_1.distcp"),
    "two shards swapped": (_swap, "__0_0.distcp"),
    "shard deleted": (lambda p: _shards(p)[1].unlink(), "__0_1.distcp"),
    "a shard added": (lambda p: shutil.copy(_shards(p)[0], p / "__1_0.distcp"), "__1_0.distcp"),
    ".metadata byte changed": (lambda p: _edit(p / ".metadata", _put(lambda n: n // 2, lambda n: b"\x00\xff")), ".metadata"),
    ".metadata truncated": (lambda p: _edit(p / ".metadata", lambda r: r[: len(r) // 2]), ".metadata"),
    "manifest checksum edited": (_edit_manifest, CHECKPOINT_META),
    "manifest not UTF-8": (lambda p: (p / CHECKPOINT_META).write_bytes(b"\xff\xfe{"), CHECKPOINT_META),
}


def test_the_saved_checkpoint_verifies(saved: Path) -> None:
    meta = verify(saved)
    assert meta["steps"] == 3 and len(meta["files"]) == 3 and len(meta["tensors"]) == 5


@pytest.mark.parametrize("case", list(CASES))
def test_corruption_is_refused_naming_the_file(case: str, saved: Path, tmp_path: Path) -> None:
    corrupt, names = CASES[case]
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy)
    corrupt(copy)
    with pytest.raises(CheckpointError) as err:
        verify(copy)
    msg = str(err.value)
    assert names in msg and str(copy) in msg and "\n" not in msg, msg


def test_changed_bytes_name_the_tensor(saved: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy)
    _edit(_shards(copy)[1], _flip_bit)
    with pytest.raises(CheckpointError, match=r"file __0_1\.distcp .*\(tensor [\w.]+ changed\)"):
        verify(copy)


def test_state_is_torchs_flattened_state_dict_keyed_by_the_models_names() -> None:
    """[Note: checkpoint layout] in partitioner/runtime/state.py: AdamW over fp32 masters of a bf16 model, read
    with torch's get_optimizer_state_dict, keyed by the model's names; set into a differently initialized model
    and optimizer, the next step is the same."""
    from partitioner.precision import MasterWeightOptimizer, optimizer_step
    from partitioner.runtime.state import load_rank_state, rank_state

    def build(seed: int) -> tuple[torch.nn.Module, MasterWeightOptimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
        return model, MasterWeightOptimizer(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-2))

    def step(model: torch.nn.Module, opt: MasterWeightOptimizer, seed: int) -> None:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        model(x).float().pow(2).mean().backward()
        optimizer_step(opt)
        opt.zero_grad()

    same = lambda name, t: t  # noqa: E731  (one process: every tensor is whole)
    model, opt = build(0)
    for s in range(2):
        step(model, opt, s)
    opt.param_groups[0]["lr"] = 5e-3
    params = dict(model.named_parameters())
    state = rank_state(params, opt, same)
    assert {k for k in state if k.endswith(".0.weight") or ".0.weight." in k} == {
        "model.0.weight", "master.0.weight", "optim.state.0.weight.step", "optim.state.0.weight.exp_avg",
        "optim.state.0.weight.exp_avg_sq", *(f"optim.param_groups.0.weight.{k}" for k in opt.param_groups[0] if k != "params")}
    assert state["master.0.weight"].dtype == torch.float32 and state["model.0.weight"].dtype == torch.bfloat16
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    other, other_opt = build(1)
    load_rank_state(dict(other.named_parameters()), other_opt, saved, same)
    assert other_opt.param_groups[0]["lr"] == 5e-3
    for k, v in rank_state(dict(other.named_parameters()), other_opt, same).items():
        assert torch.equal(v, saved[k]) if isinstance(v, torch.Tensor) else v == saved[k], k
    step(model, opt, 2)
    step(other, other_opt, 2)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
