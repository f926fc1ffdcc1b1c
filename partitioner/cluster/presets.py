"""Cluster presets: datasheet figures, the source next to each.

Peak FLOP/s are dense (datasheets also print "with sparsity" figures, twice as large, which no
dense training reaches). NVIDIA quotes GPU memory in "GB" that are GiB (nvidia-smi shows 40960
MiB on an A100 40GB), so memory is GiB. Latencies are assumptions; see [Note: latencies] in
``partitioner/cluster/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from ..errors import ClusterError
from .checks import GiB, did_you_mean, show
from .local import LOCAL_CPU, local_spec
from .specs import ClusterSpec, DeviceSpec, LinkSpec

__all__ = ["PRESETS", "preset_spec"]


def _a100(memory_gib: int, hbm_gbps: float) -> DeviceSpec:
    return DeviceSpec(
        name=f"NVIDIA A100-SXM4-{memory_gib}GB",
        memory_bytes=memory_gib * GiB,  # NVIDIA A100 datasheet: 40GB HBM2 / 80GB HBM2e
        peak_flops={
            "fp32": 19.5e12,  # NVIDIA A100 datasheet: FP32 19.5 TFLOPS
            "tf32": 156e12,  # NVIDIA A100 datasheet: TF32 Tensor Core 156 TFLOPS (dense)
            "bf16": 312e12,  # NVIDIA A100 datasheet: BFLOAT16 Tensor Core 312 TFLOPS (dense)
            "fp16": 312e12,  # NVIDIA A100 datasheet: FP16 Tensor Core 312 TFLOPS (dense)
        },  # no fp8: Ampere has no FP8 tensor cores
        # NVIDIA A100 datasheet: HBM bandwidth 1,555 GB/s (40GB), 2,039 GB/s (80GB)
        memory_bandwidth=hbm_gbps * 1e9,
    )


_NVLINK3 = LinkSpec(
    bandwidth=300e9,  # NVIDIA A100 datasheet: NVLink 600 GB/s bidirectional = 300 GB/s each way
    latency=3e-6,  # assumption: NCCL NVLink hop, see [Note: latencies]
    name="NVLink",
)
_HDR_IB = LinkSpec(
    bandwidth=25e9,  # NVIDIA DGX A100 datasheet: 8x single-port HDR 200 Gb/s, one per GPU = 25 GB/s
    latency=8e-6,  # assumption: NCCL IB hop, 5-10 us
    name="IB",
)
_NVLINK4 = LinkSpec(
    bandwidth=450e9,  # NVIDIA H100 SXM5 datasheet: NVLink 900 GB/s bidirectional = 450 each way
    latency=3e-6,  # assumption, as NVLink3
    name="NVLink",
)
_NDR_IB = LinkSpec(
    # NVIDIA DGX H100/H200 datasheets: 8x 400 Gb/s NDR ConnectX-7, one per GPU = 50 GB/s
    bandwidth=50e9,
    latency=8e-6,  # assumption: NCCL IB hop, 5-10 us
    name="IB",
)
_HOPPER_PEAK = {
    "fp32": 67e12,  # NVIDIA H100 SXM5 datasheet: FP32 67 TFLOPS
    "tf32": 494e12,  # NVIDIA H100 SXM5 datasheet: TF32 Tensor Core 989 with sparsity, 494 dense
    "bf16": 989e12,  # NVIDIA H100 SXM5 datasheet: BF16 Tensor Core 1,979 with sparsity, 989 dense
    "fp16": 989e12,  # NVIDIA H100 SXM5 datasheet: FP16 Tensor Core 1,979 with sparsity, 989 dense
    "fp8": 1979e12,  # NVIDIA H100 SXM5 datasheet: FP8 Tensor Core 3,958 with sparsity, 1,979 dense
}


def _dgx_a100_40g() -> ClusterSpec:
    return ClusterSpec("dgx-a100-40g", 1, 8, _a100(40, 1555), _NVLINK3, _HDR_IB)


def _dgx_a100_80g() -> ClusterSpec:
    return ClusterSpec("dgx-a100-80g", 1, 8, _a100(80, 2039), _NVLINK3, _HDR_IB)


def _dgx_h100() -> ClusterSpec:
    device = DeviceSpec(
        name="NVIDIA H100 80GB HBM3",
        memory_bytes=80 * GiB,  # NVIDIA H100 SXM5 datasheet: 80GB HBM3
        peak_flops=_HOPPER_PEAK,
        memory_bandwidth=3350e9,  # NVIDIA H100 SXM5 datasheet: 3.35 TB/s
    )
    return ClusterSpec("dgx-h100", 1, 8, device, _NVLINK4, _NDR_IB)


def _dgx_h200() -> ClusterSpec:
    device = DeviceSpec(
        name="NVIDIA H200",
        memory_bytes=141 * GiB,  # NVIDIA H200 datasheet: 141GB HBM3e
        peak_flops=_HOPPER_PEAK,  # NVIDIA H200 datasheet: same Tensor Core figures as H100 SXM5
        memory_bandwidth=4800e9,  # NVIDIA H200 datasheet: 4.8 TB/s
    )
    return ClusterSpec("dgx-h200", 1, 8, device, _NVLINK4, _NDR_IB)


def _p3_v100() -> ClusterSpec:
    device = DeviceSpec(
        name="Tesla V100-SXM2-16GB",
        memory_bytes=16 * GiB,  # NVIDIA V100 datasheet: 16GB HBM2 (SXM2)
        peak_flops={
            "fp32": 15.7e12,  # NVIDIA V100 datasheet: single precision 15.7 TFLOPS (SXM2)
            "fp16": 125e12,  # NVIDIA V100 datasheet: Tensor Performance 125 TFLOPS (SXM2)
        },  # no bf16, tf32 or fp8: Volta tensor cores run fp16 only
        memory_bandwidth=900e9,  # NVIDIA V100 datasheet: 900 GB/s
    )
    nvlink2 = LinkSpec(
        bandwidth=150e9,  # NVIDIA V100 datasheet: NVLink 300 GB/s total = 150 GB/s each way
        latency=3e-6,  # assumption, as NVLink3
        name="NVLink",
    )
    ethernet = LinkSpec(
        bandwidth=25e9 / 8 / 8,  # AWS p3.16xlarge: 25 Gbit/s per instance, shared by 8 GPUs
        latency=30e-6,  # assumption: NCCL over TCP sockets on cloud Ethernet
        name="Ethernet",
    )
    return ClusterSpec("p3-v100", 1, 8, device, nvlink2, ethernet)


PRESETS: Mapping[str, Callable[[], ClusterSpec]] = MappingProxyType(
    {
        "dgx-a100-40g": _dgx_a100_40g,
        "dgx-a100-80g": _dgx_a100_80g,
        "dgx-h100": _dgx_h100,
        "dgx-h200": _dgx_h200,
        "p3-v100": _p3_v100,
        LOCAL_CPU: lambda: local_spec(1),
    }
)
"""Preset name -> factory of a one-node cluster's fields; ``Cluster.preset(name, nodes)`` builds and reshapes it."""


def preset_spec(name: str) -> ClusterSpec:
    """The fields of preset ``name``; an unknown name is refused in one line that lists the presets."""
    factory = PRESETS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ClusterError(
            f"preset = {show(name)}: unknown cluster preset{did_you_mean(name, PRESETS)}; "
            f"presets are {', '.join(PRESETS)}; or give a path to a .toml cluster file"
        )
    return factory()

