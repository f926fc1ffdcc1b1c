"""The profile cache: measurements in an SQLite file; see [Note: the profile cache] in the package."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any


from cost_models import MeasuredOp, Sample

from .values import CACHE_FORMAT, Measurement, ProfileError


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``$AUTOPART_CACHE``, else ``$XDG_CACHE_HOME/autopart/profile.sqlite``, else ``~/.cache/...``."""
    if os.environ.get("AUTOPART_CACHE"):
        return Path(os.environ["AUTOPART_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "autopart" / "profile.sqlite"


class ProfileCache:
    """Measurements on disk; see [Note: the profile cache]."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.corrupt = 0  # entries found corrupt (and dropped) since opening
        self.moved_aside: Path | None = None  # where an unreadable file went
        if self.path.is_dir():
            raise ProfileError(f"--cache {self.path} is a directory; give a file path such as {self.path / 'profile.sqlite'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProfileError(f"--cache {self.path}: cannot create its directory ({exc.strerror})") from None
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path)
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, kind TEXT, device TEXT, torch TEXT, "
                "dtype TEXT, payload TEXT, checksum TEXT)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            row = db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('format', ?)", (str(CACHE_FORMAT),))
                db.commit()
            elif row[0] != str(CACHE_FORMAT):
                raise sqlite3.DatabaseError(f"cache format {row[0]}, expected {CACHE_FORMAT}")
            return db
        except sqlite3.DatabaseError:
            try:
                db.close()
            except Exception:
                pass
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            self.moved_aside = aside
            return self._open()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ProfileCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _checksum(payload: str) -> str:
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def get(self, key: str) -> Measurement | None:
        row = self._db.execute("SELECT payload, checksum FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        payload, checksum = row
        try:
            if not isinstance(payload, str) or self._checksum(payload) != checksum:
                raise ValueError("checksum mismatch")
            return Measurement.from_dict(json.loads(payload))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.corrupt += 1
            self._db.execute("DELETE FROM entries WHERE key = ?", (key,))
            self._db.commit()
            return None

    def put(self, key: str, kind: str, device: str, torch_version: str, dtype: str, m: Measurement) -> None:
        payload = json.dumps(m.to_dict(), sort_keys=True)
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, kind, device, torch_version, dtype, payload, self._checksum(payload)),
        )

    def put_sample(self, key: str, device: str, torch_version: str, dtype: str, op: str, m: MeasuredOp) -> None:
        """A node's in-block time, for fitting the calibrated model."""
        payload = json.dumps(dict(op=op, forward_s=m.forward_s, backward_s=m.backward_s, forward_flops=m.forward_flops,
                                  backward_flops=m.backward_flops, bytes_moved=m.bytes_moved, param_bytes=m.param_bytes),
                             sort_keys=True)
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, 'sample', ?, ?, ?, ?, ?)",
            (key, device, torch_version, dtype, payload, self._checksum(payload)),
        )

    def commit(self) -> None:
        self._db.commit()

    def samples(self, device: str, torch_version: str) -> list[Sample]:
        """Every valid in-block node time of ``device`` under ``torch_version``, for fitting."""
        out = []
        rows = self._db.execute(
            "SELECT dtype, payload, checksum FROM entries WHERE kind = 'sample' AND device = ? AND torch = ?",
            (device, torch_version),
        ).fetchall()
        for dtype, payload, checksum in rows:
            try:
                if self._checksum(payload) != checksum:
                    raise ValueError("checksum mismatch")
                d = json.loads(payload)
                nums = [float(d[k]) for k in ("forward_flops", "backward_flops", "bytes_moved", "forward_s", "backward_s",
                                              "param_bytes")]
                if not all(math.isfinite(x) and x >= 0 for x in nums) or not isinstance(d["op"], str):
                    raise ValueError("bad sample")
            except (ValueError, KeyError, TypeError, json.JSONDecodeError):
                self.corrupt += 1
                continue
            out.append(Sample(d["op"], dtype, *nums))
        return out

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]


