"""How far the step-time model's predictions have been measured from the runs, and on what.

[Note: the recorded step-time error]
A predicted step time is a model's figure. People who book a cluster on it need to know how far
such figures have landed from real runs, and where that was measured. ``python -m
benchmarks.fidelity --rounds N --report FILE --record-step-error`` runs every
layout of the fidelity benchmark and writes, beside this module, ``step_error.json``: the median
and worst |predicted / measured - 1| over its layouts (each the mean of its rounds), the most
under- and over-predicted layout's signed error, the device and backend it ran on, the command,
the date and the report. ``autopart explain`` states it under the plan's step time: as the
measured error where the plan's device is the one measured (its cluster's device name), saying
so where the plan's cluster was not calibrated (the benchmark's plans were calibrated and
profiled; an uncalibrated one is priced by the analytic model alone), and otherwise as not
measured on that device, naming what was. Unlike the memory margin ([Note: the
memory margin] in memory.py) it changes no plan: a step time has no limit to keep, and a figure
measured on a 2-core CPU with gloo says little about a GPU's kernels and NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import load_record

__all__ = ["RecordedStepError", "STEP_ERROR_FILE", "recorded_step_error"]

STEP_ERROR_FILE = Path(__file__).with_name("step_error.json")


@dataclass(frozen=True, slots=True)
class RecordedStepError:
    """The step-time model's measured error and where it comes from ([Note: the recorded step-time error])."""

    median_error: float  # median |predicted / measured - 1| over the layouts (each the mean of its rounds)
    worst_error: float  # the largest of them
    most_under: float  # the most negative predicted / measured - 1 (a step predicted short), <= 0 or the least
    most_over: float  # the most positive one
    layouts: int
    runs: int  # single runs behind the layouts' means
    device: str  # the device name of the measured clusters (Cluster.device.name)
    backend: str  # the process group's backend in the runs
    command: str
    date: str
    source: str  # the report

    def __post_init__(self) -> None:
        if not (0.0 <= self.median_error <= self.worst_error < 10.0):
            raise ValueError(f"median {self.median_error!r} and worst {self.worst_error!r} errors must satisfy "
                             "0 <= median <= worst < 10")
        if self.most_under > self.most_over or self.layouts < 1 or self.runs < self.layouts:
            raise ValueError("most_under must not exceed most_over, and runs must cover the layouts")

    def describe(self, device: str, calibrated: bool = True) -> str:
        """One line for a plan whose cluster's device is ``device``; ``calibrated``: whether that cluster was
        measured by ``autopart calibrate`` (the fidelity benchmark's plans were, and profiled)."""
        measured = (f"median |error| {self.median_error:.1%}, worst {self.worst_error:.1%}, from "
                    f"{self.most_under:+.1%} to {self.most_over:+.1%} over {self.layouts} layouts "
                    f"({self.runs} runs; {self.source}, {self.date})")
        if device == self.device and not calibrated:
            return (f"step time: this plan's cluster was not calibrated, which the measured error does not cover "
                    f"(autopart calibrate, then plan --profile: on {self.device} ({self.backend}) such plans were "
                    f"{measured})")
        if device == self.device:
            return f"step time: measured against runs on {self.device} ({self.backend}): {measured}"
        return (f"step time: not measured on {device} yet; on {self.device} ({self.backend}) this model's "
                f"predictions were: {measured}")


def recorded_step_error(path: Path | None = None) -> RecordedStepError:
    """The recorded step-time error (``step_error.json``). Raises ValueError naming the file when it is
    missing or malformed, with the command that writes it."""
    path = STEP_ERROR_FILE if path is None else path
    fix = "regenerate it with python -m benchmarks.fidelity --rounds 6 --min-seconds 4 --report FILE --record-step-error"
    return load_record(RecordedStepError, path, "step-time error", fix)
