"""Checkpoint integrity: every byte-level corruption of a checkpoint is refused, naming the file.

A real ``torch.distributed.checkpoint`` directory (written in this process, two shard files)
with autopart's manifest; each case corrupts a copy and ``checkpoint.verify``, what
``ParallelModel.load`` runs on rank 0 before loading anything, must refuse it in one line
naming the file. tests/test_runtime.py loads a corrupted checkpoint through a real 2-rank
``ParallelModel.load`` ([Note: checkpoint checksums] in partitioner/checkpoint.py).
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
    state["optim.layer0.weight.momentum_buffer"] = torch.randn(64, 64, generator=g)
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
