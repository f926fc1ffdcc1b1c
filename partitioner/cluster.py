"""The hardware a plan targets: its devices, the links between them, and how close to peak they run.

A :class:`Cluster` says how many machines there are, how many devices each holds, what one
device can do (memory, peak FLOP/s per dtype, memory bandwidth) and how fast the links inside
and between machines are. The solver reads device memory from it to decide what fits, and the
cost models (``cost_models/``) price compute and communication from its datasheet figures scaled
by its :class:`Efficiency` assumptions. A cluster comes from a preset name, a TOML file
(``docs/cluster.md``), or the processes of this machine (``local-cpu``); it is frozen once built.

Glossary (the project's words, plus the one exception this module makes):

- **device**: one GPU, or for ``local-cpu`` one process's share of this CPU.
- **rank**: one process; a plan puts one rank on each device.
- **node** (*here only*): one machine, as in torchrun's ``--nnodes``. Everywhere else in autopart
  a node is an FX graph node; the fields ``nodes``, ``devices_per_node``, ``intra_node`` and
  ``inter_node`` keep torchrun's spelling because that is what users type.
- **link**: the path one device uses to reach another: ``intra_node`` (NVLink, say) when both
  ranks are on the same node, ``inter_node`` (InfiniBand, say) when they are not.

Units: inside Python every figure is SI (bytes, bytes/s, FLOP/s, seconds). The TOML file and
:meth:`Cluster.to_dict` use the units people read off datasheets (GiB, GB/s, TFLOP/s,
microseconds); :meth:`Cluster.from_dict` converts. See [Note: unit conversion].

[Note: datasheet figures and assumptions]
:class:`DeviceSpec` and :class:`LinkSpec` hold only what a datasheet states: peak dense FLOP/s,
memory size and bandwidth, link bandwidth. What the hardware reaches in practice is a separate,
named assumption, :class:`Efficiency`, so that a calibration (``autopart calibrate``) replaces
the assumptions and never edits a datasheet figure, and a reader can tell the two apart.
Link latencies are not on datasheets; they are assumptions too, documented in [Note: latencies].

[Note: link bandwidth per device]
``LinkSpec.bandwidth`` is the bandwidth one device can push in one direction, not the total of
the node or the bidirectional figure on the datasheet. NVLink is quoted bidirectional (A100: 600
GB/s, so 300 GB/s each way). Networks are quoted per NIC; a DGX A100 has one 200 Gb/s HDR NIC
per GPU, so 25 GB/s per device. A p3.16xlarge has one 25 Gbit/s link for 8 GPUs, so each device
gets 25/8/8 GB/s. Cost models multiply this by ``Efficiency.comm`` to get achieved bus bandwidth.

[Note: latencies]
``LinkSpec.latency`` is the fixed cost of one message (the alpha of an alpha-beta model), in
seconds. The presets use: NVLink 3 us (NCCL's own tuning table, src/graph/tuning.cc, charges
~3.4 us per NVLink ring hop with the Simple protocol), InfiniBand 8 us (an NCCL hop over IB,
software included, is commonly 5-10 us), TCP over cloud Ethernet 30 us, gloo over loopback 50 us
(a small gloo collective between local processes typically takes 30-100 us). All are estimates:
``autopart profile`` / ``calibrate`` replace them with measurements.

[Note: rank layout]
Ranks are laid out node-major, as torchrun assigns them: rank ``r`` is on node
``r // devices_per_node``. :meth:`Cluster.node_of` is the one place that encodes this.

[Note: unit conversion]
A file value becomes SI by shifting its shortest decimal form by a power of ten (``Decimal``),
not by float multiplication, so ``300`` GB/s is exactly ``3e11`` bytes/s and ``3`` us exactly
``3e-06`` s, and ``to_dict`` shifts back the same way. Any figure with up to 15 significant
digits survives ``to_dict`` -> ``from_dict`` (and ``to_toml`` -> ``from_toml``) unchanged.
"""

from __future__ import annotations

import difflib
import math
import os
import platform
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cost_models.overheads import Overheads
from partitioner.errors import ClusterError

__all__ = [
    "DTYPES",
    "PRESETS",
    "Cluster",
    "DeviceSpec",
    "Efficiency",
    "LinkSpec",
    "available_cpus",
    "cpu_model",
    "default_dtype",
    "load_cluster",
    "tp_degrees",
]

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
"""The dtypes a device may list peak FLOP/s for (``tf32`` is fp32 matmul on tensor cores)."""

LOCAL_CPU = "local-cpu"

_GiB = 2**30
_MiB = 2**20

# When a device lacks the dtype asked for, the error suggests the first of these it has.
_SUBSTITUTES = {
    "bf16": ("fp16", "fp32"),
    "fp16": ("bf16", "fp32"),
    "fp8": ("bf16", "fp16"),
    "tf32": ("fp32",),
    "fp32": ("tf32",),
}
# torch spellings people type for a dtype; used only to suggest the DTYPES name.
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}


# --------------------------------------------------------------------------------------------
# Validation helpers. Every error names the field (a dotted path), the bad value, and what is
# allowed, so a person can fix the file or the call without reading this module.
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """The bad value as the error shows it: its repr, plus its type unless it is a plain scalar."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def _did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss, or ``""``."""
    choices = list(choices)
    alias = _DTYPE_ALIASES.get(word.lower()) if isinstance(word, str) else None
    if alias in choices:
        return f" (did you mean {alias!r}?)"
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(path: str, value: Any, *, unit: str, low: float = 0.0, low_ok: bool = False,
            high: float | None = None) -> float:
    """A finite real in ``(low, high]`` (``[low, high]`` when ``low_ok``), as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_ok else value > low) and (high is None or value <= high)
    if not ok:
        if high is None:
            allowed = f"a finite number {'>=' if low_ok else '>'} {low:g}"
        else:
            allowed = f"a number in {'[' if low_ok else '('}{low:g}, {high:g}]"
        raise ClusterError(f"{path} = {_show(value)}: expected {allowed} ({unit})")
    return float(value)


def _integer(path: str, value: Any, *, unit: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ClusterError(f"{path} = {_show(value)}: expected an integer >= {low} ({unit})")
    return value


def _text(path: str, value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ClusterError(f"{path} = {_show(value)}: expected a non-empty string ({what})")
    return value


def _peak_table(path: str, value: Any, *, unit: str) -> dict[str, float]:
    """A dtype -> positive number table with at least one dtype, in DTYPES order."""
    if not isinstance(value, Mapping):
        raise ClusterError(
            f"{path} = {_show(value)}: expected a table of dtype -> {unit} "
            f"with keys from {', '.join(DTYPES)}"
        )
    if not value:
        raise ClusterError(
            f"{path} is empty: list at least one dtype ({', '.join(DTYPES)}) with its peak {unit}"
        )
    for key in value:
        if key not in DTYPES:
            raise ClusterError(
                f"{path}.{key}: unknown dtype{_did_you_mean(key, DTYPES)}; "
                f"dtypes are {', '.join(DTYPES)}"
            )
    return {d: _number(f"{path}.{d}", value[d], unit=unit) for d in DTYPES if d in value}


class _FrozenDict(Mapping[str, float]):
    """A read-only, hashable mapping, so that a frozen DeviceSpec is really frozen and hashable."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, float]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> float:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self):
        return (_FrozenDict, (self._data,))


# --------------------------------------------------------------------------------------------
# The value types.
# --------------------------------------------------------------------------------------------


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
        _text("device.name", self.name, what="the device model, e.g. 'NVIDIA A100-SXM4-80GB'")
        _integer("device.memory_bytes", self.memory_bytes, unit="bytes of device memory")
        peak = _peak_table("device.peak_flops", self.peak_flops, unit="FLOP/s")
        object.__setattr__(self, "peak_flops", _FrozenDict(peak))
        object.__setattr__(
            self,
            "memory_bandwidth",
            _number("device.memory_bandwidth", self.memory_bandwidth, unit="bytes/s"),
        )

    def flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype``: the datasheet figure, before ``Efficiency.matmul``."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype not in DTYPES:
            raise ClusterError(
                f"unknown dtype {_show(dtype)}{_did_you_mean(dtype, DTYPES)}; "
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
            _number("LinkSpec.bandwidth", self.bandwidth, unit="bytes/s per device, one direction"),
        )
        object.__setattr__(
            self,
            "latency",
            _number("LinkSpec.latency", self.latency, unit="seconds per message", low_ok=True),
        )
        if not isinstance(self.name, str):
            raise ClusterError(f"LinkSpec.name = {_show(self.name)}: expected a string label")


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
            value = _number(
                f"efficiency.{f.name}", getattr(self, f.name), unit="fraction of peak", high=1.0
            )
            object.__setattr__(self, f.name, value)


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
        _text("name", self.name, what="a short cluster name, e.g. 'dgx-a100-80g'")
        _integer("nodes", self.nodes, unit="machines")
        _integer("devices_per_node", self.devices_per_node, unit="devices on each machine")
        for attr, kind in (
            ("device", DeviceSpec),
            ("intra_node", LinkSpec),
            ("inter_node", LinkSpec),
            ("efficiency", Efficiency),
            ("overheads", Overheads),
        ):
            if not isinstance(getattr(self, attr), kind):
                raise ClusterError(
                    f"{attr} = {_show(getattr(self, attr))}: expected a {kind.__name__}"
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
                f"rank = {_show(rank)}: expected an integer in [0, {self.world_size}) "
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
    def preset(cls, name: str, nodes: int | None = None) -> Cluster:
        """A named cluster from :data:`PRESETS`, with ``nodes`` nodes (default 1)."""
        factory = PRESETS.get(name) if isinstance(name, str) else None
        if factory is None:
            raise ClusterError(
                f"preset = {_show(name)}: unknown cluster preset{_did_you_mean(name, PRESETS)}; "
                f"presets are {', '.join(PRESETS)}; or give a path to a .toml cluster file"
            )
        cluster = factory()
        if nodes is None:
            return cluster
        if name == LOCAL_CPU and nodes != 1:
            raise ClusterError(
                f"nodes = {_show(nodes)}: the local-cpu preset is this one machine, so nodes "
                f"must be 1; for N processes use 'local-cpu:N'"
            )
        return cluster.with_nodes(nodes)

    @classmethod
    def local(cls, world_size: int) -> Cluster:
        """The ``world_size`` processes of this machine, talking gloo over loopback.

        One node of ``world_size`` devices; each device is an equal share of this machine's
        logical CPUs and physical RAM. FLOP/s and memory bandwidth are estimates (see the
        ``_CPU_*`` constants); run ``autopart calibrate`` for measured figures.
        """
        world_size = _integer("world_size", world_size, unit="processes on this machine")
        share = available_cpus() / world_size  # logical CPUs per process; < 1 if oversubscribed
        memory = _physical_memory_bytes() // world_size // _MiB * _MiB
        device = DeviceSpec(
            name=cpu_model(),
            memory_bytes=max(memory, _MiB),
            peak_flops={"fp32": _round3(share * _CPU_FP32_FLOPS_PER_CPU)},
            memory_bandwidth=_round3(share * _CPU_MEMORY_BANDWIDTH_PER_CPU),
        )
        loopback = LinkSpec(_GLOO_LOOPBACK_BANDWIDTH, _GLOO_LOOPBACK_LATENCY, "gloo loopback")
        return cls(
            name=LOCAL_CPU,
            nodes=1,
            devices_per_node=world_size,
            device=device,
            intra_node=loopback,
            inter_node=loopback,
            efficiency=_CPU_EFFICIENCY,
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Cluster:
        """Load a cluster file; the format is in docs/cluster.md. Errors start with the path."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ClusterError(
                f"cluster file {str(path)!r} does not exist; give a path to a .toml file "
                f"or a preset name ({', '.join(PRESETS)})"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise ClusterError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ClusterError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
        except OSError as e:
            raise ClusterError(f"cluster file {str(path)!r} cannot be read: {e.strerror}") from None
        try:
            return cls.from_dict(data)
        except ClusterError as e:
            raise ClusterError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cluster:
        """Build from the TOML layout (file units: GiB, GB/s, TFLOP/s, microseconds).

        With ``preset = "<name>"`` the preset is the starting point and every key given replaces
        the preset's; tables merge key by key, and ``device.peak_tflops`` is replaced whole.
        """
        d = _table("", d, _TOP_KEYS)
        if "preset" in d:
            d = _onto_preset(d)
        for key in ("name", "nodes", "devices_per_node", "device", "intra_node", "inter_node"):
            _require("", d, key)
        return cls(
            name=_text("name", d["name"], what="a short cluster name, e.g. 'my-cluster'"),
            nodes=_integer("nodes", d["nodes"], unit="machines"),
            devices_per_node=_integer(
                "devices_per_node", d["devices_per_node"], unit="devices on each machine"
            ),
            device=_parse_device(d["device"]),
            intra_node=_parse_link("intra_node", d["intra_node"]),
            inter_node=_parse_link("inter_node", d["inter_node"]),
            efficiency=_parse_efficiency(d.get("efficiency", {})),
            overheads=_parse_overheads(d.get("overheads", {})),
        )

    # ---- output --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout as plain dicts, numbers and strings; ``from_dict`` reads it back."""
        dev = self.device
        device: dict[str, Any] = {"name": dev.name}
        if dev.memory_bytes % _MiB == 0:  # whole MiB: GiB reads better and is exact
            device["memory_gib"] = dev.memory_bytes / _GiB
        else:
            device["memory_bytes"] = dev.memory_bytes
        device["memory_bandwidth_gbps"] = _to_file(dev.memory_bandwidth, _GIGA)
        device["peak_tflops"] = {k: _to_file(v, _TERA) for k, v in dev.peak_flops.items()}
        out = {
            "name": self.name,
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "device": device,
            "intra_node": _link_dict(self.intra_node),
            "inter_node": _link_dict(self.inter_node),
            "efficiency": {f.name: getattr(self.efficiency, f.name) for f in fields(Efficiency)},
        }
        if self.overheads.measured:  # absent unless calibrated, so files and plans without it are unchanged
            out["overheads"] = self.overheads.to_file()
        return out

    def to_toml(self) -> str:
        """The cluster as a TOML file that ``from_toml`` reads back equal (written by ``tomli_w``),
        headed by the units of its keys."""
        import tomli_w

        d = self.to_dict()
        keys = {"nodes", "devices_per_node"} | {k for t in d.values() if isinstance(t, dict) for k in t}
        units = [f"#   {k}: {u}" for k, u in _FILE_UNITS.items() if k in keys and u and u != "table"]
        header = ["# autopart cluster description; the format is in docs/cluster.md.", "# Units:", *units, ""]
        return "\n".join(header) + "\n" + tomli_w.dumps(d)

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
            f"({_g(dev.memory_bytes / _GiB)} GiB, {_g(dev.peak_flops[dtype] / 1e12)} TFLOP/s "
            f"{dtype}), {intra} {_g(self.intra_node.bandwidth / 1e9)} GB/s{across}"
        )


def load_cluster(
    spec: str, nodes: int | None = None, devices_per_node: int | None = None
) -> Cluster:
    """The CLI's ``--cluster``: a preset name, a path to a .toml file, or ``local-cpu[:N]``.

    ``nodes`` and ``devices_per_node`` (``--nodes``, ``--gpus-per-node``) reshape the result;
    for ``local-cpu``, ``devices_per_node`` is the number of processes, like ``:N``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ClusterError(
            f"cluster = {_show(spec)}: expected a preset name ({', '.join(PRESETS)}), "
            f"a path to a .toml file, or 'local-cpu:N'"
        )
    if spec == LOCAL_CPU or spec.startswith(LOCAL_CPU + ":"):
        return _load_local(spec, nodes, devices_per_node)
    if spec in PRESETS:
        cluster = Cluster.preset(spec)
    elif spec.endswith(".toml") or "/" in spec or os.sep in spec or Path(spec).is_file():
        cluster = Cluster.from_toml(spec)
    else:
        cluster = Cluster.preset(spec)  # raises, listing the presets and suggesting one
    if nodes is None and devices_per_node is None:
        return cluster
    return cluster.with_nodes(cluster.nodes if nodes is None else nodes, devices_per_node)


def _load_local(spec: str, nodes: int | None, devices_per_node: int | None) -> Cluster:
    count: int | None = None
    if ":" in spec:
        text = spec.split(":", 1)[1]
        if not text.isdigit() or int(text) < 1:
            raise ClusterError(
                f"cluster = {spec!r}: expected 'local-cpu:N' with N a whole number of "
                f"processes >= 1"
            )
        count = int(text)
    if count is not None and devices_per_node is not None and devices_per_node != count:
        raise ClusterError(
            f"devices_per_node = {devices_per_node} contradicts cluster = {spec!r}; "
            f"give one of them"
        )
    if nodes is not None and nodes != 1:
        raise ClusterError(
            f"nodes = {_show(nodes)}: local-cpu is this one machine, so nodes must be 1"
        )
    return Cluster.local(count or devices_per_node or 1)


# --------------------------------------------------------------------------------------------
# The file layout. See docs/cluster.md for the same tables written for users.
# --------------------------------------------------------------------------------------------

_TOP_KEYS = (
    "name", "preset", "nodes", "devices_per_node", "device", "intra_node", "inter_node",
    "efficiency", "overheads",
)
_DEVICE_KEYS = ("name", "memory_gib", "memory_bytes", "memory_bandwidth_gbps", "peak_tflops")
_LINK_KEYS = ("name", "bandwidth_gbps", "latency_us")
_EFFICIENCY_KEYS = tuple(f.name for f in fields(Efficiency))
_SUBTABLES = {
    "device": _DEVICE_KEYS,
    "intra_node": _LINK_KEYS,
    "inter_node": _LINK_KEYS,
    "efficiency": _EFFICIENCY_KEYS,
}
# Units as the file writes them; used in error messages and to_toml's header.
_FILE_UNITS = {
    "name": "",
    "nodes": "machines",
    "devices_per_node": "devices on each machine",
    "device": "table",
    "intra_node": "table",
    "inter_node": "table",
    "memory_gib": "GiB",
    "memory_bytes": "bytes",
    "memory_bandwidth_gbps": "GB/s",
    "peak_tflops": "TFLOP/s per dtype, dense",
    "bandwidth_gbps": "GB/s per device, one direction",
    "latency_us": "microseconds",
    **{k: "fraction of peak, (0, 1]" for k in _EFFICIENCY_KEYS},
}

_GIGA, _TERA, _MICRO = Decimal("1e9"), Decimal("1e12"), Decimal("1e-6")


def _from_file(value: float, factor: Decimal) -> float:
    """File units -> SI by a decimal shift; see [Note: unit conversion]."""
    return float(Decimal(repr(float(value))) * factor)


def _to_file(value: float, factor: Decimal) -> float:
    """SI -> file units, choosing the float that ``_from_file`` maps back to ``value`` exactly."""
    guess = float(Decimal(repr(value)) / factor)
    if _from_file(guess, factor) == value:
        return guess
    down = up = guess
    for _ in range(4):  # only 16-17 digit values can miss; a close neighbour usually hits
        down, up = math.nextafter(down, -math.inf), math.nextafter(up, math.inf)
        for candidate in (down, up):
            if _from_file(candidate, factor) == value:
                return candidate
    return guess


def _table(path: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    where = f"[{path}]" if path else "the top level"
    if not isinstance(value, Mapping):
        raise ClusterError(f"{path or 'cluster'} = {_show(value)}: expected a table ({where})")
    for key in value:
        if key not in allowed:
            full = f"{path}.{key}" if path else str(key)
            raise ClusterError(
                f"{full}: unknown key{_did_you_mean(key, allowed)}; "
                f"keys allowed at {where}: {', '.join(allowed)}"
            )
    return dict(value)


def _require(path: str, table: Mapping[str, Any], key: str) -> Any:
    if key in table:
        return table[key]
    full = f"{path}.{key}" if path else key
    if key in _SUBTABLES:
        add = f"add a [{full}] table"
    else:
        value = f"<{_FILE_UNITS[key]}>" if _FILE_UNITS[key] else '"..."'
        add = f"add {key} = {value} " + (f"under [{path}]" if path else "at the top level")
    raise ClusterError(
        f"{full} is missing: {add}, or start from a preset with preset = \"<name>\" "
        f"({', '.join(PRESETS)})"
    )


def _onto_preset(d: dict[str, Any]) -> dict[str, Any]:
    """The preset's to_dict() with ``d``'s keys laid over it; see Cluster.from_dict."""
    name = d.pop("preset")
    if name == LOCAL_CPU:
        # A local-cpu device is a share of this machine, so the share follows devices_per_node.
        if d.get("nodes", 1) != 1:
            raise ClusterError(
                f"nodes = {_show(d['nodes'])}: preset = \"local-cpu\" is this one machine, "
                f"so nodes must be 1"
            )
        count = _integer("devices_per_node", d.get("devices_per_node", 1), unit="processes")
        merged = Cluster.local(count).to_dict()
    else:
        merged = Cluster.preset(name).to_dict()
    for key, value in d.items():
        if key not in _SUBTABLES:
            merged[key] = value
            continue
        override = _table(key, value, _SUBTABLES[key])
        base = dict(merged[key])
        if key == "device" and ({"memory_gib", "memory_bytes"} & override.keys()):
            base.pop("memory_gib", None)
            base.pop("memory_bytes", None)
        base.update(override)
        merged[key] = base
    return merged


def _parse_device(value: Any) -> DeviceSpec:
    t = _table("device", value, _DEVICE_KEYS)
    name = _text("device.name", _require("device", t, "name"), what="the device model")
    if "memory_gib" in t and "memory_bytes" in t:
        raise ClusterError(
            f"device.memory_gib = {_show(t['memory_gib'])} and device.memory_bytes = "
            f"{_show(t['memory_bytes'])}: give one of them, not both"
        )
    if "memory_bytes" in t:
        memory = _integer(
            "device.memory_bytes", t["memory_bytes"],
            unit="bytes; use memory_gib for a fractional GiB figure",
        )
    else:
        gib = _number("device.memory_gib", _require("device", t, "memory_gib"), unit="GiB")
        memory = round(gib * _GiB)
        if memory < 1:
            raise ClusterError(f"device.memory_gib = {gib!r}: expected at least one byte (GiB)")
    bandwidth = _number(
        "device.memory_bandwidth_gbps",
        _require("device", t, "memory_bandwidth_gbps"),
        unit=_FILE_UNITS["memory_bandwidth_gbps"],
    )
    peak = _peak_table(
        "device.peak_tflops", _require("device", t, "peak_tflops"), unit="TFLOP/s"
    )
    return DeviceSpec(
        name=name,
        memory_bytes=memory,
        peak_flops={k: _from_file(v, _TERA) for k, v in peak.items()},
        memory_bandwidth=_from_file(bandwidth, _GIGA),
    )


def _parse_link(path: str, value: Any) -> LinkSpec:
    t = _table(path, value, _LINK_KEYS)
    name = t.get("name", "")
    if not isinstance(name, str):
        raise ClusterError(f"{path}.name = {_show(name)}: expected a string label, e.g. \"NVLink\"")
    bandwidth = _number(
        f"{path}.bandwidth_gbps", _require(path, t, "bandwidth_gbps"),
        unit=_FILE_UNITS["bandwidth_gbps"],
    )
    latency = _number(
        f"{path}.latency_us", _require(path, t, "latency_us"), unit="microseconds", low_ok=True
    )
    return LinkSpec(_from_file(bandwidth, _GIGA), _from_file(latency, _MICRO), name)


def _parse_efficiency(value: Any) -> Efficiency:
    t = _table("efficiency", value, _EFFICIENCY_KEYS)
    return Efficiency(
        **{
            k: _number(f"efficiency.{k}", v, unit="fraction of peak", high=1.0)
            for k, v in t.items()
        }
    )


def _parse_overheads(value: Any) -> Overheads:
    if not isinstance(value, Mapping):
        raise ClusterError(f"overheads = {_show(value)}: expected a table ([overheads])")
    try:
        return Overheads.from_file(value)
    except ValueError as e:
        raise ClusterError(f"{e} (measured by autopart calibrate; see docs/cluster.md)") from None


def _link_dict(link: LinkSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"name": link.name} if link.name else {}
    d["bandwidth_gbps"] = _to_file(link.bandwidth, _GIGA)
    d["latency_us"] = _to_file(link.latency, _MICRO)
    return d


def _g(x: float) -> str:
    return f"{x:.4g}"


# --------------------------------------------------------------------------------------------
# This machine, for local-cpu. Estimates, kept conservative so plans made on them still fit.
# --------------------------------------------------------------------------------------------

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
_FALLBACK_MEMORY_BYTES = 8 * _GiB
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


# --------------------------------------------------------------------------------------------
# Presets. Datasheet figures, source next to each; peak FLOP/s are dense (datasheets also print
# "with sparsity" figures, twice as large, which no dense training reaches). NVIDIA quotes GPU
# memory in "GB" that are GiB (nvidia-smi shows 40960 MiB on an A100 40GB), so memory is GiB.
# Latencies are assumptions; see [Note: latencies].
# --------------------------------------------------------------------------------------------


def _a100(memory_gib: int, hbm_gbps: float) -> DeviceSpec:
    return DeviceSpec(
        name=f"NVIDIA A100-SXM4-{memory_gib}GB",
        memory_bytes=memory_gib * _GiB,  # NVIDIA A100 datasheet: 40GB HBM2 / 80GB HBM2e
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


def _dgx_a100_40g() -> Cluster:
    return Cluster("dgx-a100-40g", 1, 8, _a100(40, 1555), _NVLINK3, _HDR_IB)


def _dgx_a100_80g() -> Cluster:
    return Cluster("dgx-a100-80g", 1, 8, _a100(80, 2039), _NVLINK3, _HDR_IB)


def _dgx_h100() -> Cluster:
    device = DeviceSpec(
        name="NVIDIA H100 80GB HBM3",
        memory_bytes=80 * _GiB,  # NVIDIA H100 SXM5 datasheet: 80GB HBM3
        peak_flops=_HOPPER_PEAK,
        memory_bandwidth=3350e9,  # NVIDIA H100 SXM5 datasheet: 3.35 TB/s
    )
    return Cluster("dgx-h100", 1, 8, device, _NVLINK4, _NDR_IB)


def _dgx_h200() -> Cluster:
    device = DeviceSpec(
        name="NVIDIA H200",
        memory_bytes=141 * _GiB,  # NVIDIA H200 datasheet: 141GB HBM3e
        peak_flops=_HOPPER_PEAK,  # NVIDIA H200 datasheet: same Tensor Core figures as H100 SXM5
        memory_bandwidth=4800e9,  # NVIDIA H200 datasheet: 4.8 TB/s
    )
    return Cluster("dgx-h200", 1, 8, device, _NVLINK4, _NDR_IB)


def _p3_v100() -> Cluster:
    device = DeviceSpec(
        name="Tesla V100-SXM2-16GB",
        memory_bytes=16 * _GiB,  # NVIDIA V100 datasheet: 16GB HBM2 (SXM2)
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
    return Cluster("p3-v100", 1, 8, device, nvlink2, ethernet)


PRESETS: Mapping[str, Callable[[], Cluster]] = MappingProxyType(
    {
        "dgx-a100-40g": _dgx_a100_40g,
        "dgx-a100-80g": _dgx_a100_80g,
        "dgx-h100": _dgx_h100,
        "dgx-h200": _dgx_h200,
        "p3-v100": _p3_v100,
        LOCAL_CPU: lambda: Cluster.local(1),
    }
)
"""Preset name -> factory of a one-node cluster; ``Cluster.preset(name, nodes)`` reshapes it."""


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
