"""Validation of cluster figures: every error names the field (a dotted path), the bad value and
what is allowed, so a person can fix the file or the call without reading this package."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import ClusterError

__all__ = ["DTYPES", "GiB", "MiB", "FrozenDict", "did_you_mean", "integer", "number", "peak_table", "show", "text"]

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
"""The dtypes a device may list peak FLOP/s for (``tf32`` is fp32 matmul on tensor cores)."""

GiB = 2**30
MiB = 2**20

# torch spellings people type for a dtype; used only to suggest the DTYPES name.
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}



def show(value: Any) -> str:
    """The bad value as the error shows it: its repr, plus its type unless it is a plain scalar."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss, or ``""``."""
    choices = list(choices)
    alias = _DTYPE_ALIASES.get(word.lower()) if isinstance(word, str) else None
    if alias in choices:
        return f" (did you mean {alias!r}?)"
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def number(path: str, value: Any, *, unit: str, low: float = 0.0, low_ok: bool = False,
            high: float | None = None) -> float:
    """A finite real in ``(low, high]`` (``[low, high]`` when ``low_ok``), as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_ok else value > low) and (high is None or value <= high)
    if not ok:
        if high is None:
            allowed = f"a finite number {'>=' if low_ok else '>'} {low:g}"
        else:
            allowed = f"a number in {'[' if low_ok else '('}{low:g}, {high:g}]"
        raise ClusterError(f"{path} = {show(value)}: expected {allowed} ({unit})")
    return float(value)


def integer(path: str, value: Any, *, unit: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ClusterError(f"{path} = {show(value)}: expected an integer >= {low} ({unit})")
    return value


def text(path: str, value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ClusterError(f"{path} = {show(value)}: expected a non-empty string ({what})")
    return value


def peak_table(path: str, value: Any, *, unit: str) -> dict[str, float]:
    """A dtype -> positive number table with at least one dtype, in DTYPES order."""
    if not isinstance(value, Mapping):
        raise ClusterError(
            f"{path} = {show(value)}: expected a table of dtype -> {unit} "
            f"with keys from {', '.join(DTYPES)}"
        )
    if not value:
        raise ClusterError(
            f"{path} is empty: list at least one dtype ({', '.join(DTYPES)}) with its peak {unit}"
        )
    for key in value:
        if key not in DTYPES:
            raise ClusterError(
                f"{path}.{key}: unknown dtype{did_you_mean(key, DTYPES)}; "
                f"dtypes are {', '.join(DTYPES)}"
            )
    return {d: number(f"{path}.{d}", value[d], unit=unit) for d in DTYPES if d in value}


class FrozenDict(Mapping[str, float]):
    """A read-only, hashable mapping, so that a frozen DeviceSpec is really frozen and hashable."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, float]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> float:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self):
        return (FrozenDict, (self._data,))

