"""The value types of a cluster: one device (:class:`DeviceSpec`), one link (:class:`LinkSpec`), the
assumed fractions of peak (:class:`Efficiency`), and the fields of a whole cluster
(:class:`ClusterSpec`) as the presets, this machine's model and the file format produce them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from cost_models.overheads import Overheads

from ..errors import ClusterError
from .checks import DTYPES, FrozenDict, did_you_mean, integer, number, peak_table, show, text

__all__ = ["ClusterSpec", "DeviceSpec", "Efficiency", "LinkSpec"]

# When a device lacks the dtype asked for, the error suggests the first of these it has.
_SUBSTITUTES = {
    "bf16": ("fp16", "fp32"),
    "fp16": ("bf16", "fp32"),
    "fp8": ("bf16", "fp16"),
    "tf32": ("fp32",),
    "fp32": ("tf32",),
}

@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device, as its datasheet describes it. No efficiency factors here; see
    [Note: datasheet figures and assumptions]."""

    # Model name, as torch.cuda.get_device_name() reports it where we know it; free text.
    name: str
    # Device memory in bytes (HBM, or this process's share of RAM), before any runtime overhead.
    memory_bytes: int
    # Peak dense FLOP/s (no structured sparsity) per dtype, keys from DTYPES. A dtype left out is
    # one the device cannot run fast; flops() refuses it and names the dtypes the device has.
    peak_flops: Mapping[str, float]
    # Device memory bandwidth in bytes/s (HBM or DRAM), datasheet figure.
    memory_bandwidth: float

    def __post_init__(self) -> None:
        text("device.name", self.name, what="the device model, e.g. 'NVIDIA A100-SXM4-80GB'")
        integer("device.memory_bytes", self.memory_bytes, unit="bytes of device memory")
        peak = peak_table("device.peak_flops", self.peak_flops, unit="FLOP/s")
        object.__setattr__(self, "peak_flops", FrozenDict(peak))
        object.__setattr__(
            self,
            "memory_bandwidth",
            number("device.memory_bandwidth", self.memory_bandwidth, unit="bytes/s"),
        )

    def flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype``: the datasheet figure, before ``Efficiency.matmul``."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype not in DTYPES:
            raise ClusterError(
                f"unknown dtype {show(dtype)}{did_you_mean(dtype, DTYPES)}; "
                f"dtypes are {', '.join(DTYPES)}"
            )
        have = ", ".join(self.peak_flops)
        alternative = next((d for d in _SUBSTITUTES[dtype] if d in self.peak_flops), None)
        fix = f"use {alternative}, or " if alternative else ""
        raise ClusterError(
            f"device {self.name!r} has no {dtype} peak (it has {have}): {fix}add "
            f"device.peak_tflops.{dtype} to the cluster file if the hardware runs {dtype}"
        )


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """The link one device uses to reach another; see [Note: link bandwidth per device]."""

    # Bytes/s one device can send in one direction (datasheet; bidirectional figures halved,
    # per-node NIC figures divided by the devices sharing the NIC).
    bandwidth: float
    # Seconds of fixed cost per message, the alpha of alpha-beta; an assumption, see
    # [Note: latencies].
    latency: float
    # Label for describe() and reports, e.g. "NVLink" or "IB"; free text, may be empty.
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "bandwidth",
            number("LinkSpec.bandwidth", self.bandwidth, unit="bytes/s per device, one direction"),
        )
        object.__setattr__(
            self,
            "latency",
            number("LinkSpec.latency", self.latency, unit="seconds per message", low_ok=True),
        )
        if not isinstance(self.name, str):
            raise ClusterError(f"LinkSpec.name = {show(self.name)}: expected a string label")


@dataclass(frozen=True, slots=True)
class Efficiency:
    """ASSUMPTIONS, not datasheet figures: the fraction of peak reached in practice, each in
    (0, 1]. ``autopart calibrate`` measures these on real hardware and writes them back; the
    defaults below are what published measurements on A100/H100-class GPUs suggest."""

    # Fraction of peak FLOP/s that large GEMMs reach. cuBLAS reaches ~80-90% of dense peak on
    # large bf16 GEMMs on A100; Megatron-LM's GPT runs (Narayanan et al., SC'21) sustain 52% of
    # peak end to end, bubbles and communication included. 0.8 for the GEMMs themselves.
    matmul: float = 0.8
    # Fraction of peak FLOP/s that fused attention kernels reach. FlashAttention-2 (Dao, 2023)
    # reports 50-73% of A100 peak forward and less backward; 0.6 for forward and backward alike.
    attention: float = 0.6
    # Fraction of memory bandwidth that memory-bound ops (elementwise, norms, softmax) reach.
    # Streaming kernels reach ~85-90% of HBM bandwidth on A100; short, unfused kernels much less.
    # 0.7 as a middle figure.
    elementwise: float = 0.7
    # Fraction of link bandwidth that NCCL-style collectives reach as bus bandwidth. nccl-tests
    # all-reduce on a DGX A100 reports ~230-240 GB/s bus bandwidth over 300 GB/s NVLink, i.e.
    # ~80%; inter-node IB reaches ~80-90% of line rate. 0.8.
    comm: float = 0.8

    def __post_init__(self) -> None:
        for f in fields(self):
            value = number(
                f"efficiency.{f.name}", getattr(self, f.name), unit="fraction of peak", high=1.0
            )
            object.__setattr__(self, f.name, value)



@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The fields of a :class:`~partitioner.cluster.Cluster`, as a preset, ``local-cpu`` or a cluster
    file gives them; ``Cluster.from_spec`` validates them into a cluster."""

    name: str
    nodes: int
    devices_per_node: int
    device: DeviceSpec
    intra_node: LinkSpec
    inter_node: LinkSpec
    efficiency: Efficiency = Efficiency()
    overheads: Overheads = Overheads()
