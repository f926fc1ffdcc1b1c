"""This machine as a cluster, for ``local-cpu``: its processes share its CPUs and RAM and talk gloo
over loopback. Estimates, kept conservative so plans made on them still fit; ``autopart
calibrate`` replaces them with measurements."""

from __future__ import annotations

import os
import platform

from .checks import GiB, MiB, integer
from .specs import ClusterSpec, DeviceSpec, Efficiency, LinkSpec

__all__ = ["LOCAL_CPU", "available_cpus", "cpu_model", "local_spec"]

LOCAL_CPU = "local-cpu"

# fp32 FLOP/s per logical CPU. One AVX2 core with two FMA units peaks at 2 x 8 lanes x 2 FLOP =
# 32 FLOP/cycle, ~100 GFLOP/s at 3 GHz (AVX-512 doubles it); but os.cpu_count() counts SMT
# threads, which share those units, cores clock down under vector load, and CI VMs share cores.
# 25 GFLOP/s per logical CPU is a figure most x86-64 and Arm servers exceed.
_CPU_FP32_FLOPS_PER_CPU = 25e9
# Memory bandwidth per logical CPU, bytes/s. A server socket's ~100-200 GB/s of DDR4/DDR5 over
# 32-64 threads, or a laptop's ~50 GB/s over 8-16, is 3-6 GB/s per thread; 4 GB/s.
_CPU_MEMORY_BANDWIDTH_PER_CPU = 4e9
# gloo over loopback between processes: a few GB/s (copies through the kernel's TCP stack) and
# 30-100 us per small collective; see [Note: latencies].
_GLOO_LOOPBACK_BANDWIDTH = 3e9
_GLOO_LOOPBACK_LATENCY = 50e-6
# Used when the OS does not report physical memory (os.sysconf missing, e.g. Windows).
_FALLBACK_MEMORY_BYTES = 8 * GiB
# CPU fractions of the estimates above. oneDNN/MKL sgemm runs near real peak, but the peak is an
# estimate: 0.6. CPU attention is the unfused math path (scores materialized): 0.3. Memory-bound
# ops are single-pass but small: 0.5. gloo ring collectives copy through sockets: 0.5.
_CPU_EFFICIENCY = Efficiency(matmul=0.6, attention=0.3, elementwise=0.5, comm=0.5)


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects taskset / cgroup cpusets
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _physical_memory_bytes() -> int:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_MEMORY_BYTES
    if pages <= 0 or page_size <= 0:
        return _FALLBACK_MEMORY_BYTES
    return pages * page_size


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = " ".join(line.split(":", 1)[1].split())
                    if model:
                        return model
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _round3(x: float) -> float:
    """Three significant digits: these are estimates, and short figures read better in TOML."""
    return float(f"{x:.3g}")



def local_spec(world_size: int) -> ClusterSpec:
    """The ``world_size`` processes of this machine, talking gloo over loopback.

    One node of ``world_size`` devices; each device is an equal share of this machine's
    logical CPUs and physical RAM. FLOP/s and memory bandwidth are estimates (see the
    ``_CPU_*`` constants); run ``autopart calibrate`` for measured figures.
    """
    world_size = integer("world_size", world_size, unit="processes on this machine")
    share = available_cpus() / world_size  # logical CPUs per process; < 1 if oversubscribed
    memory = _physical_memory_bytes() // world_size // MiB * MiB
    device = DeviceSpec(
        name=cpu_model(),
        memory_bytes=max(memory, MiB),
        peak_flops={"fp32": _round3(share * _CPU_FP32_FLOPS_PER_CPU)},
        memory_bandwidth=_round3(share * _CPU_MEMORY_BANDWIDTH_PER_CPU),
    )
    loopback = LinkSpec(_GLOO_LOOPBACK_BANDWIDTH, _GLOO_LOOPBACK_LATENCY, "gloo loopback")
    return ClusterSpec(LOCAL_CPU, 1, world_size, device, loopback, loopback, _CPU_EFFICIENCY)
