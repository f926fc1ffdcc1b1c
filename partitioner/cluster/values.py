"""The :class:`Cluster` value: the machines a plan runs on, its constructors and its queries."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from cost_models.overheads import Overheads

from ..errors import ClusterError
from .checks import GiB, integer, show, text
from .fileformat import spec_from_dict, spec_from_toml, spec_to_dict, toml_text
from .local import LOCAL_CPU, local_spec
from .presets import preset_spec
from .specs import ClusterSpec, DeviceSpec, Efficiency, LinkSpec

__all__ = ["Cluster", "default_dtype", "tp_degrees"]


@dataclass(frozen=True, slots=True)
class Cluster:
    """The machines a plan runs on. Ranks are node-major; see [Note: rank layout]."""

    # Short identifier, e.g. "dgx-a100-80g"; printed in plans and reports.
    name: str
    # Machines (torchrun's --nnodes), >= 1.
    nodes: int
    # Devices on each machine (torchrun's --nproc-per-node), >= 1.
    devices_per_node: int
    # One device; all devices in a cluster are the same model.
    device: DeviceSpec
    # Link between two devices on the same node, e.g. NVLink; per device, one direction.
    intra_node: LinkSpec
    # Link between devices on different nodes, e.g. InfiniBand; per device (NIC bandwidth per
    # GPU), one direction.
    inter_node: LinkSpec
    # Achieved fractions of peak; assumptions, see [Note: datasheet figures and assumptions].
    efficiency: Efficiency = Efficiency()
    # Measured software costs (``autopart calibrate``); the default adds nothing
    # ([Note: software overheads] in cost_models/overheads.py).
    overheads: Overheads = Overheads()

    def __post_init__(self) -> None:
        text("name", self.name, what="a short cluster name, e.g. 'dgx-a100-80g'")
        integer("nodes", self.nodes, unit="machines")
        integer("devices_per_node", self.devices_per_node, unit="devices on each machine")
        for attr, kind in (
            ("device", DeviceSpec),
            ("intra_node", LinkSpec),
            ("inter_node", LinkSpec),
            ("efficiency", Efficiency),
            ("overheads", Overheads),
        ):
            if not isinstance(getattr(self, attr), kind):
                raise ClusterError(
                    f"{attr} = {show(getattr(self, attr))}: expected a {kind.__name__}"
                )

    # ---- shape ---------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Total devices, hence ranks: ``nodes * devices_per_node``."""
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        """The node that ``rank`` runs on; see [Note: rank layout]."""
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.world_size:
            raise ClusterError(
                f"rank = {show(rank)}: expected an integer in [0, {self.world_size}) "
                f"for cluster {self.name!r} ({self.nodes} x {self.devices_per_node} devices)"
            )
        return rank // self.devices_per_node

    def with_nodes(self, nodes: int, devices_per_node: int | None = None) -> Cluster:
        """The same hardware with another shape: the CLI's ``--nodes`` and ``--gpus-per-node``.

        Device and link figures are per device and do not change. (For ``local-cpu``, where a
        device is a share of this machine, build ``Cluster.local(n)`` instead.)
        """
        if devices_per_node is None:
            devices_per_node = self.devices_per_node
        return replace(self, nodes=nodes, devices_per_node=devices_per_node)

    # ---- constructors --------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: ClusterSpec) -> Cluster:
        """A cluster of ``spec``'s fields, validated."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(ClusterSpec)})

    @property
    def spec(self) -> ClusterSpec:
        """This cluster's fields."""
        return ClusterSpec(**{f.name: getattr(self, f.name) for f in fields(ClusterSpec)})

    @classmethod
    def preset(cls, name: str, nodes: int | None = None) -> Cluster:
        """A named cluster from :data:`PRESETS`, with ``nodes`` nodes (default 1)."""
        cluster = cls.from_spec(preset_spec(name))
        if nodes is None:
            return cluster
        if name == LOCAL_CPU and nodes != 1:
            raise ClusterError(
                f"nodes = {show(nodes)}: the local-cpu preset is this one machine, so nodes "
                f"must be 1; for N processes use 'local-cpu:N'"
            )
        return cluster.with_nodes(nodes)

    @classmethod
    def local(cls, world_size: int) -> Cluster:
        """The ``world_size`` processes of this machine, talking gloo over loopback (local.py)."""
        return cls.from_spec(local_spec(world_size))

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Cluster:
        """Load a cluster file; the format is in docs/cluster.md. Errors start with the path."""
        return cls.from_spec(spec_from_toml(path))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cluster:
        """Build from the TOML layout (file units: GiB, GB/s, TFLOP/s, microseconds).

        With ``preset = "<name>"`` the preset is the starting point and every key given replaces
        the preset's; tables merge key by key, and ``device.peak_tflops`` is replaced whole.
        """
        return cls.from_spec(spec_from_dict(d))

    # ---- output --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout as plain dicts, numbers and strings; ``from_dict`` reads it back."""
        return spec_to_dict(self.spec)

    def to_toml(self) -> str:
        """The cluster as a TOML file that ``from_toml`` reads back equal (written by ``tomli_w``),
        headed by the units of its keys."""
        return toml_text(self.to_dict())

    def describe(self) -> str:
        """One line, e.g. ``dgx-a100-80g: 4 nodes x 8 NVIDIA A100-SXM4-80GB (80 GiB, 312
        TFLOP/s bf16), NVLink 300 GB/s, IB 25 GB/s/device``."""
        dev = self.device
        dtype = next(d for d in ("bf16", "fp16", "tf32", "fp32", "fp8") if d in dev.peak_flops)
        nodes = f"{self.nodes} node{'' if self.nodes == 1 else 's'}"
        intra = self.intra_node.name or "intra-node"
        inter = self.inter_node.name or "inter-node"
        # One node has no inter-node link to speak of (local-cpu's two links are the same loopback).
        across = f", {inter} {_g(self.inter_node.bandwidth / 1e9)} GB/s/device" if self.nodes > 1 else ""
        return (
            f"{self.name}: {nodes} x {self.devices_per_node} {dev.name} "
            f"({_g(dev.memory_bytes / GiB)} GiB, {_g(dev.peak_flops[dtype] / 1e12)} TFLOP/s "
            f"{dtype}), {intra} {_g(self.intra_node.bandwidth / 1e9)} GB/s{across}"
        )


def _g(x: float) -> str:
    return f"{x:.4g}"


def default_dtype(cluster: Cluster) -> str:
    """bf16, or on a device without bf16 (a CPU) the first dtype it has: what ``plan`` and ``compare`` default to."""
    peaks = cluster.device.peak_flops
    return "bf16" if "bf16" in peaks else next(iter(peaks))


def tp_degrees(cluster: Cluster, pinned: int | None) -> tuple[int, ...]:
    """The tensor-parallel degrees the planner may choose (and ``--profile`` measures): powers of two in a node."""
    if pinned is not None:
        return (pinned,) if pinned > 1 else ()
    out, tp = [], 2
    while tp <= min(8, cluster.devices_per_node):
        out.append(tp)
        tp *= 2
    return tuple(out)
