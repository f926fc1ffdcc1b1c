"""The machine's other work while we measure: what of its CPUs went to processes not ours.

Used around measurements that time the machine (``autopart calibrate``, the runs of
``benchmarks/fidelity.py``), so that a figure says how quiet the machine was when it was taken.

[Note: other load]
On a shared machine a calibration or a timed run can see someone else's work for a few seconds:
another process, or, in a virtual machine, the hypervisor running another guest on our cores
(``steal``). Either makes wall time longer without being the plan's cost. ``LoadMeter`` reads the
kernel's count of every CPU's busy time (``/proc/stat``: user, nice, system, irq, softirq and steal;
``guest`` is inside ``user``; the lines of the CPUs this process may run on) at the start and the
end, and the caller gives the CPU time its own processes used in between (``own_cpu_seconds``: ``getrusage`` of the process, or of the children it
waited for). What is left, over the wall time times the CPUs, is the **other load**: 0 on a quiet
machine, 0.5 when another job kept one of two cores busy throughout. The kernel counts in ticks
(10 ms), and the launcher's own bookkeeping (torchrun's agent) counts as other, so a quiet
machine reads a percent or two. Where ``/proc/stat`` does not exist (not Linux), there is no meter. A
container's CPU quota (cgroup ``cpu.max``) below its CPUs is not seen: its throttling is neither ours
nor another's busy time.
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
        """At most ``OTHER_LOAD_WARN``: a measurement taken on a quiet machine."""
        return self.fraction <= OTHER_LOAD_WARN

    def describe(self) -> str:
        """One clause for a report: the other load and the CPUs it is a share of."""
        return f"{self.fraction:.0%} of the machine's {self.cpus} CPUs went to other work (other processes, the hypervisor)"


@dataclass(frozen=True, slots=True)
class BusyTime:
    """The busy seconds of the CPUs this process may run on, since boot, read at ``at`` (perf_counter)."""

    seconds: float
    cpus: int
    at: float


def busy_time() -> BusyTime | None:
    """Now's ``BusyTime`` from /proc/stat's per-CPU lines of the CPUs in this process's affinity, or None
    without /proc/stat."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    ticks, cpus = 0, 0
    for line in lines[1:]:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        if mine is not None and int(name[3:]) not in mine:
            continue
        ticks += sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields))
        cpus += 1
    if cpus == 0:
        return None
    return BusyTime(ticks / os.sysconf("SC_CLK_TCK"), cpus, time.perf_counter())


def own_cpu_seconds(children: bool = False) -> float:
    """User and system CPU seconds of this process (every thread), or of the children it has waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LoadMeter:
    """Reads the busy time now; ``stop(own_cpu_s)`` gives the other load since."""

    def __init__(self) -> None:
        self.start = busy_time()

    @property
    def available(self) -> bool:
        return self.start is not None

    def stop(self, own_cpu_s: float, end: BusyTime | None = None) -> OtherLoad | None:
        """The other load from the start to ``end`` (default: now), ``own_cpu_s`` being ours."""
        end = end if end is not None else busy_time()
        if self.start is None or end is None:
            return None
        return OtherLoad(end.at - self.start.at, end.cpus, end.seconds - self.start.seconds - own_cpu_s)
