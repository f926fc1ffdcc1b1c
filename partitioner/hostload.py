"""The machine's other work while we measure: what of its CPUs went to processes not ours.

Used around measurements that time the machine (``autopart calibrate``, the runs of
``benchmarks/fidelity.py``), so that a figure says how quiet the machine was when it was taken.

[Note: other load]
On a shared machine a calibration or a timed run can see someone else's work for a few seconds:
another process, or, in a virtual machine, the hypervisor running another guest on our cores
(``steal``). Either makes wall time longer without being the plan's cost. ``LoadMeter`` reads the
kernel's count of every CPU's busy time (``/proc/stat``: user, nice, system, irq, softirq and steal;
``guest`` is inside ``user``) at the start and the end, and the caller gives the CPU time its own
processes used in between (``own_cpu_seconds``: ``getrusage`` of the process, or of the children it
waited for). What is left, over the wall time times the CPUs, is the **other load**: 0 on a quiet
machine, 0.5 when another job kept one of two cores busy throughout. The kernel counts in ticks
(10 ms), and the launcher's own bookkeeping (torchrun's agent) counts as other, so a quiet
machine reads a percent or two. Where ``/proc/stat`` does not exist (not Linux), there is no meter.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system [idle iowait] irq softirq steal, after "cpu"
OTHER_LOAD_WARN = 0.10  # the other load above which a measurement says it was not taken on a quiet machine


@dataclass(frozen=True, slots=True)
class OtherLoad:
    """What the machine's other work took of its CPUs over one measurement ([Note: other load])."""

    seconds: float  # the measurement's wall time
    cpus: int  # the CPUs /proc/stat counts
    other_cpu_s: float  # CPU seconds that were neither idle nor ours

    @property
    def fraction(self) -> float:
        """The other work's share of the machine's CPU capacity over the measurement, at least 0."""
        return max(0.0, self.other_cpu_s / (self.seconds * self.cpus)) if self.seconds > 0 else 0.0

    @property
    def quiet(self) -> bool:
        return self.fraction <= OTHER_LOAD_WARN

    def describe(self) -> str:
        return f"{self.fraction:.0%} of the machine's {self.cpus} CPUs went to other work (other processes, the hypervisor)"


def _busy() -> tuple[float, int] | None:
    """(every CPU's busy seconds since boot, the CPUs), or None without /proc/stat."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    total = lines[0].split()
    if total[0] != "cpu":
        return None
    ticks = sum(int(total[1 + i]) for i in BUSY_FIELDS if 1 + i < len(total))
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return ticks / os.sysconf("SC_CLK_TCK"), max(1, cpus)


def own_cpu_seconds(children: bool = False) -> float:
    """User and system CPU seconds of this process (every thread), or of the children it has waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LoadMeter:
    """Reads the machine's busy time now; ``stop(own_cpu_s)`` gives the other load since."""

    def __init__(self) -> None:
        self._start = _busy()
        self._t0 = time.perf_counter()

    @property
    def available(self) -> bool:
        return self._start is not None

    def stop(self, own_cpu_s: float) -> OtherLoad | None:
        end = _busy()
        if self._start is None or end is None:
            return None
        busy = end[0] - self._start[0]
        return OtherLoad(time.perf_counter() - self._t0, end[1], busy - own_cpu_s)
