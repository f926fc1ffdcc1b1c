"""The machine's other load ([Note: other load] in partitioner/hostload.py): what a measurement was disturbed by."""

from __future__ import annotations

import subprocess
import sys

import pytest

from partitioner.hostload import OTHER_LOAD_WARN, LoadMeter, OtherLoad, busy_time, own_cpu_seconds

pytestmark = pytest.mark.skipif(not LoadMeter().available, reason="the meter reads /proc/stat (Linux)")

BUSY = "import time\nt = time.process_time() + 0.6\nwhile time.process_time() < t: pass"


def test_a_child_process_is_the_other_load_unless_it_is_counted_as_ours():
    meter, own0 = LoadMeter(), own_cpu_seconds(children=True)
    subprocess.run([sys.executable, "-c", BUSY], check=True)
    child = own_cpu_seconds(children=True) - own0
    assert child >= 0.6  # the child's CPU time, every thread, once it was waited for
    end = busy_time()  # one reading for both: whatever runs between two readings cannot move the comparison
    unclaimed, claimed = meter.stop(0.0, end), meter.stop(child, end)
    # The kernel saw the child's work as busy time (it counts in 10 ms ticks): unclaimed, it is other load;
    # claimed as ours, it is taken off. Whatever else runs on the machine only adds to both.
    assert unclaimed.other_cpu_s >= child - 0.1
    assert claimed.other_cpu_s == pytest.approx(unclaimed.other_cpu_s - child)
    assert unclaimed.fraction > claimed.fraction >= 0.0 and unclaimed.cpus >= 1


def test_other_load_is_a_share_of_the_machine_and_says_when_it_was_not_quiet():
    half = OtherLoad(seconds=10.0, cpus=2, other_cpu_s=10.0)  # another job kept one of two cores busy
    assert half.fraction == 0.5 and not half.quiet
    assert half.describe() == "50% of the machine's 2 CPUs went to other work (other processes, the hypervisor)"
    assert OtherLoad(10.0, 2, 2.0 * OTHER_LOAD_WARN * 10.0).quiet  # exactly at the threshold
    assert OtherLoad(10.0, 2, -0.03).fraction == 0.0  # the kernel's ticks against our exact CPU time
