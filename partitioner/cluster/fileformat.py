"""The cluster file: its tables and keys, unit conversion, and parsing with errors that name the key.

docs/cluster.md describes the same tables for users; [Note: unit conversion] in
``partitioner/cluster/__init__.py`` explains why values are shifted by ``Decimal``.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from decimal import Decimal
from pathlib import Path
from typing import Any

from cost_models.overheads import Overheads

from ..errors import ClusterError
from .checks import GiB, MiB, did_you_mean, integer, number, peak_table, show, text
from .local import LOCAL_CPU, local_spec
from .presets import PRESETS, preset_spec
from .specs import ClusterSpec, DeviceSpec, Efficiency, LinkSpec

__all__ = ["spec_from_dict", "spec_from_toml", "spec_to_dict", "toml_text"]

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
        raise ClusterError(f"{path or 'cluster'} = {show(value)}: expected a table ({where})")
    for key in value:
        if key not in allowed:
            full = f"{path}.{key}" if path else str(key)
            raise ClusterError(
                f"{full}: unknown key{did_you_mean(key, allowed)}; "
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
    """The preset's dict with ``d``'s keys laid over it; see spec_from_dict."""
    name = d.pop("preset")
    if name == LOCAL_CPU:
        # A local-cpu device is a share of this machine, so the share follows devices_per_node.
        if d.get("nodes", 1) != 1:
            raise ClusterError(
                f"nodes = {show(d['nodes'])}: preset = \"local-cpu\" is this one machine, "
                f"so nodes must be 1"
            )
        count = integer("devices_per_node", d.get("devices_per_node", 1), unit="processes")
        merged = spec_to_dict(local_spec(count))
    else:
        merged = spec_to_dict(preset_spec(name))
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
    name = text("device.name", _require("device", t, "name"), what="the device model")
    if "memory_gib" in t and "memory_bytes" in t:
        raise ClusterError(
            f"device.memory_gib = {show(t['memory_gib'])} and device.memory_bytes = "
            f"{show(t['memory_bytes'])}: give one of them, not both"
        )
    if "memory_bytes" in t:
        memory = integer(
            "device.memory_bytes", t["memory_bytes"],
            unit="bytes; use memory_gib for a fractional GiB figure",
        )
    else:
        gib = number("device.memory_gib", _require("device", t, "memory_gib"), unit="GiB")
        memory = round(gib * GiB)
        if memory < 1:
            raise ClusterError(f"device.memory_gib = {gib!r}: expected at least one byte (GiB)")
    bandwidth = number(
        "device.memory_bandwidth_gbps",
        _require("device", t, "memory_bandwidth_gbps"),
        unit=_FILE_UNITS["memory_bandwidth_gbps"],
    )
    peak = peak_table(
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
        raise ClusterError(f"{path}.name = {show(name)}: expected a string label, e.g. \"NVLink\"")
    bandwidth = number(
        f"{path}.bandwidth_gbps", _require(path, t, "bandwidth_gbps"),
        unit=_FILE_UNITS["bandwidth_gbps"],
    )
    latency = number(
        f"{path}.latency_us", _require(path, t, "latency_us"), unit="microseconds", low_ok=True
    )
    return LinkSpec(_from_file(bandwidth, _GIGA), _from_file(latency, _MICRO), name)


def _parse_efficiency(value: Any) -> Efficiency:
    t = _table("efficiency", value, _EFFICIENCY_KEYS)
    return Efficiency(
        **{
            k: number(f"efficiency.{k}", v, unit="fraction of peak", high=1.0)
            for k, v in t.items()
        }
    )


def _parse_overheads(value: Any) -> Overheads:
    if not isinstance(value, Mapping):
        raise ClusterError(f"overheads = {show(value)}: expected a table ([overheads])")
    try:
        return Overheads.from_file(value)
    except ValueError as e:
        raise ClusterError(f"{e} (measured by autopart calibrate; see docs/cluster.md)") from None


def _link_dict(link: LinkSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"name": link.name} if link.name else {}
    d["bandwidth_gbps"] = _to_file(link.bandwidth, _GIGA)
    d["latency_us"] = _to_file(link.latency, _MICRO)
    return d


def spec_from_toml(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read a cluster file; the format is in docs/cluster.md. Errors start with the path."""
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
        return spec_from_dict(data)
    except ClusterError as e:
        raise ClusterError(f"{path}: {e}") from None


def spec_from_dict(d: Mapping[str, Any]) -> ClusterSpec:
    """The file's layout (file units: GiB, GB/s, TFLOP/s, microseconds) as a cluster's fields.

    With ``preset = "<name>"`` the preset is the starting point and every key given replaces
    the preset's; tables merge key by key, and ``device.peak_tflops`` is replaced whole.
    """
    d = _table("", d, _TOP_KEYS)
    if "preset" in d:
        d = _onto_preset(d)
    for key in ("name", "nodes", "devices_per_node", "device", "intra_node", "inter_node"):
        _require("", d, key)
    return ClusterSpec(
        name=text("name", d["name"], what="a short cluster name, e.g. 'my-cluster'"),
        nodes=integer("nodes", d["nodes"], unit="machines"),
        devices_per_node=integer("devices_per_node", d["devices_per_node"], unit="devices on each machine"),
        device=_parse_device(d["device"]),
        intra_node=_parse_link("intra_node", d["intra_node"]),
        inter_node=_parse_link("inter_node", d["inter_node"]),
        efficiency=_parse_efficiency(d.get("efficiency", {})),
        overheads=_parse_overheads(d.get("overheads", {})),
    )


def spec_to_dict(spec: ClusterSpec) -> dict[str, Any]:
    """The file's layout as plain dicts, numbers and strings; ``spec_from_dict`` reads it back."""
    dev = spec.device
    device: dict[str, Any] = {"name": dev.name}
    if dev.memory_bytes % MiB == 0:  # whole MiB: GiB reads better and is exact
        device["memory_gib"] = dev.memory_bytes / GiB
    else:
        device["memory_bytes"] = dev.memory_bytes
    device["memory_bandwidth_gbps"] = _to_file(dev.memory_bandwidth, _GIGA)
    device["peak_tflops"] = {k: _to_file(v, _TERA) for k, v in dev.peak_flops.items()}
    out = {
        "name": spec.name,
        "nodes": spec.nodes,
        "devices_per_node": spec.devices_per_node,
        "device": device,
        "intra_node": _link_dict(spec.intra_node),
        "inter_node": _link_dict(spec.inter_node),
        "efficiency": {f.name: getattr(spec.efficiency, f.name) for f in fields(Efficiency)},
    }
    if spec.overheads.measured:  # absent unless calibrated, so files and plans without it are unchanged
        out["overheads"] = spec.overheads.to_file()
    return out


def toml_text(d: Mapping[str, Any]) -> str:
    """``d`` (``spec_to_dict``'s layout) as a TOML file, written by ``tomli_w`` and headed by the units of its keys."""
    import tomli_w

    keys = {"nodes", "devices_per_node"} | {k for t in d.values() if isinstance(t, dict) for k in t}
    units = [f"#   {k}: {u}" for k, u in _FILE_UNITS.items() if k in keys and u and u != "table"]
    header = ["# autopart cluster description; the format is in docs/cluster.md.", "# Units:", *units, ""]
    return "\n".join(header) + "\n" + tomli_w.dumps(dict(d))
