"""Checkpoint integrity for the runtime: what ``ParallelModel.save`` records and ``load`` verifies.

Part of the run phase (partitioner/runtime/). The tensors themselves are written and read by
``torch.distributed.checkpoint`` (keyed by the model's parameter names, so a checkpoint
saved under one plan loads under another); this module adds the manifest ``autopart.json``
that makes a changed byte visible before anything is loaded.

[Note: checkpoint checksums]
``torch.distributed.checkpoint`` checks structure (its ``.metadata`` must unpickle, a key
must exist) but not content: 4 KiB of random bytes written inside a shard, its size kept,
load silently and the loss turns NaN a few steps later. So at save, once every rank has
written its files, rank 0 records in ``autopart.json``:

- the SHA-256 of every file of the checkpoint (``.metadata`` and each ``.distcp`` shard);
- for every stored tensor (or tensor chunk) the file, byte range and SHA-256 of its bytes,
  read from ``.metadata``'s storage index, so that an error names the tensor that changed;
- the SHA-256 of the manifest itself, so an edited manifest is refused too.

``verify`` recomputes them and refuses, in one line naming the file (and the tensor where
one is hit), a checkpoint with any changed, missing, added or swapped file. Reading every
byte once more at load is the price; it is small beside reading the tensors themselves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from .errors import AutopartError

__all__ = ["CHECKPOINT_META", "CheckpointError", "write_manifest", "verify", "read_manifest"]

CHECKPOINT_META = "autopart.json"
MANIFEST_VERSION = 1


class CheckpointError(AutopartError):
    """A checkpoint is missing, corrupt, or for another model."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_ranges(path: Path) -> dict[str, dict[str, Any]]:
    """Every stored tensor chunk of the checkpoint: ``{name: {file, offset, length}}`` from ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata()
    out = {}
    for index, info in meta.storage_data.items():
        offset = list(index.offset) if index.offset is not None else []
        name = index.fqn + (f"[chunk at {','.join(map(str, offset))}]" if any(offset) else "")
        out[name] = dict(file=str(info.relative_path), offset=int(info.offset), length=int(info.length))
    return out


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(json.dumps(body, sort_keys=True).encode())


def write_manifest(path: str | Path, meta: Mapping[str, Any]) -> None:
    """Record ``meta`` and the checksums of the checkpoint at ``path`` in ``autopart.json``
    ([Note: checkpoint checksums]). Call once, on one rank, after every rank has written."""
    path = Path(path)
    files = {f.name: _file_sha256(f) for f in sorted(path.iterdir()) if f.is_file() and f.name != CHECKPOINT_META}
    tensors = _tensor_ranges(path)
    for name, where in tensors.items():
        with (path / where["file"]).open("rb") as f:
            f.seek(where["offset"])
            where["sha256"] = _sha256(f.read(where["length"]))
    manifest = dict(meta, manifest_version=MANIFEST_VERSION, files=files, tensors=tensors)
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    tmp = path / (CHECKPOINT_META + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path / CHECKPOINT_META)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """``autopart.json`` of the checkpoint at ``path``, its own checksum verified."""
    path = Path(path)
    meta_file = path / CHECKPOINT_META
    if not path.is_dir() or not (path / ".metadata").is_file() or not meta_file.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a directory written by ParallelModel.save, "
                              f"with .metadata and {CHECKPOINT_META})")
    try:
        manifest = json.loads(meta_file.read_bytes().decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
        fingerprint, files, tensors = manifest["fingerprint"], manifest["files"], manifest["tensors"]
        if not isinstance(fingerprint, str) or not isinstance(files, dict) or not isinstance(tensors, dict):
            raise ValueError("wrong types")
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"checkpoint {path}: file {CHECKPOINT_META} is corrupt; the checkpoint cannot be "
                              "trusted: restore it, or save again") from None
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CheckpointError(f"checkpoint {path}: file {CHECKPOINT_META} was changed after the save (its SHA-256 "
                              "does not match); the checkpoint cannot be trusted: restore it, or save again")
    return manifest


def verify(path: str | Path) -> dict[str, Any]:
    """Refuse a checkpoint whose bytes are not the ones saved; return its manifest.

    Raises ``CheckpointError`` naming the file, and the first tensor whose bytes changed."""
    path = Path(path)
    manifest = read_manifest(path)
    files: Mapping[str, str] = manifest["files"]
    present = {f.name for f in path.iterdir() if f.is_file() and f.name != CHECKPOINT_META and not f.name.endswith(".tmp")}
    for name in sorted(set(files) - present):
        raise CheckpointError(f"checkpoint {path}: file {name} is missing; the checkpoint is incomplete: "
                              "restore the file, or save again")
    for name in sorted(present - set(files)):
        raise CheckpointError(f"checkpoint {path}: file {name} was not part of the save; remove it, or save again")
    for name, digest in sorted(files.items()):
        if _file_sha256(path / name) == digest:
            continue
        hit = ""
        for tensor, where in manifest["tensors"].items():
            if where.get("file") != name:
                continue
            with (path / name).open("rb") as f:
                f.seek(int(where["offset"]))
                if _sha256(f.read(int(where["length"]))) != where.get("sha256"):
                    hit = f" (tensor {tensor} changed)"
                    break
        raise CheckpointError(f"checkpoint {path}: file {name} does not match the SHA-256 recorded at save{hit}; "
                              "it is corrupt: restore it, or save again")
    return manifest
