"""Formatting shared by the CLI, compare and the plots: one spelling of a time and a size."""

from __future__ import annotations

__all__ = ["GIB", "fmt_bytes", "fmt_time"]

GIB = float(1 << 30)


def fmt_time(s: float | None) -> str:
    """Milliseconds below a second, seconds above; an em dash for no value."""
    if s is None:
        return "—"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def fmt_bytes(n: float) -> str:
    """GiB with two decimals, or MiB below a tenth of a GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"
