"""Progress on long work, for a person watching a terminal; silence for scripts, pipes and CI.

The CLI's commands can take a minute (capturing GPT-3 175B, searching 64 nodes' meshes,
profiling, running every method of a comparison). ``Progress`` shows the phase
(capture, profile, search, run), how far it is, and for the ILP search the candidates
searched, the incumbent step time and the lower bound as they improve. It draws with
``rich.progress`` on **stderr**, and only when stderr is a terminal: piped or redirected
output, and ``--quiet``, get nothing, so stdout stays the result and stderr stays the
one-line error. The bar is transient: it disappears when the command prints its result.

The planner reports through a plain callback (``SearchStatus`` values), so the solver
knows nothing of terminals; a Python caller may pass its own callback instead.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["SearchStatus", "SearchCallback", "Progress"]


@dataclass(frozen=True, slots=True)
class SearchStatus:
    """Where the ILP search stands; reported after each candidate."""

    searched: int  # candidates done: solved, pruned by the bound, or dropped for memory
    total: int  # candidates (meshes x micro-batching x schedules) the search enumerated
    incumbent_s: float | None  # the best fitting plan's simulated step time so far, if any
    bound_s: float | None  # a proven lower bound on the best step time (None until one is known)

    @property
    def gap(self) -> float | None:
        """How far the incumbent may be from the best plan: (incumbent - bound) / incumbent."""
        if self.incumbent_s is None or self.bound_s is None or not self.incumbent_s > 0:
            return None
        return max(0.0, (self.incumbent_s - self.bound_s) / self.incumbent_s)


SearchCallback = Callable[[SearchStatus], None]


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


class Progress:
    """A progress display on stderr, shown only on a terminal (``enabled=None``) or when forced.

    ``phase(name, total)`` starts a phase (the previous one is done); ``advance(detail)``
    moves it one step; ``search(status)`` is the planner's callback; ``note(text)`` sets the
    phase's detail (a compare run's "ilp: running the plan on 2 processes"). When disabled,
    every method does nothing. Use it as a context manager so that the display always stops.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn, TextColumn
            from rich.progress import TimeElapsedColumn

            self._bar = Bar(
                SpinnerColumn(), TextColumn("[bold]{task.fields[phase]}[/bold]"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                console=Console(stderr=True), transient=True,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def phase(self, name: str, total: int | None = None, detail: str = "") -> None:
        """Start phase ``name`` (capture, profile, search, run, ...): ``total`` steps, or None for a spinner."""
        if self._bar is None:
            return
        if self._task is not None:
            self._bar.update(self._task, visible=False)
        self._task = self._bar.add_task(detail, total=total, phase=name)

    def advance(self, detail: str | None = None, steps: int = 1) -> None:
        if self._bar is None or self._task is None:
            return
        self._bar.advance(self._task, steps)
        if detail is not None:
            self._bar.update(self._task, description=detail)

    def note(self, text: str) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=text)

    def search(self, status: SearchStatus) -> None:
        """The ILP search's callback: candidates searched of the total, incumbent, bound and gap."""
        if self._bar is None:
            return
        if self._task is None:
            self.phase("search")
        parts = []
        if status.incumbent_s is not None and math.isfinite(status.incumbent_s):
            parts.append(f"best {_fmt_s(status.incumbent_s)}")
        if status.bound_s is not None and math.isfinite(status.bound_s):
            parts.append(f"bound {_fmt_s(status.bound_s)}")
        if status.gap is not None:
            parts.append(f"gap {status.gap:.1%}")
        self._bar.update(self._task, total=status.total, completed=status.searched, description=" · ".join(parts))
