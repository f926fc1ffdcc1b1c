"""Tests for partitioner/cluster/: presets, the TOML format, validation, and docs/cluster.md.

The examples in docs/cluster.md are loaded here, and its presets table is checked against the
code, so the doc cannot drift from what the loader accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from pathlib import Path

import pytest

from partitioner.cluster import (
    DTYPES,
    PRESETS,
    Cluster,
    DeviceSpec,
    Efficiency,
    LinkSpec,
    load_cluster,
)
from partitioner.errors import ClusterError

DOC = Path(__file__).resolve().parent.parent / "docs" / "cluster.md"
GPU_PRESETS = [name for name in PRESETS if name != "local-cpu"]

# A complete cluster file without a preset; the error cases below each break one line of it.
BASE_TOML = """\
name = "test"
nodes = 2
devices_per_node = 4

[device]
name = "TestGPU"
memory_gib = 24
memory_bandwidth_gbps = 1000

[device.peak_tflops]
fp32 = 20
bf16 = 200

[intra_node]
bandwidth_gbps = 100
latency_us = 2

[inter_node]
bandwidth_gbps = 10
latency_us = 10
"""


def write(tmp_path: Path, text: str, name: str = "cluster.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def doc_toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


# ---- presets ------------------------------------------------------------------------------


def test_preset_names_are_exactly_the_documented_ones():
    assert list(PRESETS) == [
        "dgx-a100-40g", "dgx-a100-80g", "dgx-h100", "dgx-h200", "p3-v100", "local-cpu",
    ]


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_loads_and_describes(name):
    cluster = Cluster.preset(name)
    assert cluster.name == name
    assert cluster.nodes == 1
    assert cluster.world_size == cluster.devices_per_node
    line = cluster.describe()
    assert line.startswith(f"{name}: 1 node x {cluster.devices_per_node} ")
    assert "\n" not in line
    assert load_cluster(name) == cluster


def test_describe_matches_the_documented_example():
    assert Cluster.preset("dgx-a100-80g", nodes=4).describe() == (
        "dgx-a100-80g: 4 nodes x 8 NVIDIA A100-SXM4-80GB (80 GiB, 312 TFLOP/s bf16), "
        "NVLink 300 GB/s, IB 25 GB/s/device"
    )


def test_preset_figures_are_the_datasheet_figures_in_si_units():
    a100 = Cluster.preset("dgx-a100-40g")
    assert a100.device.memory_bytes == 40 * 2**30
    assert a100.device.memory_bandwidth == 1555e9
    assert a100.device.flops("bf16") == 312e12
    assert a100.device.flops("tf32") == 156e12
    assert a100.device.flops("fp32") == 19.5e12
    assert a100.intra_node.bandwidth == 300e9
    assert a100.inter_node.bandwidth == 25e9
    assert Cluster.preset("dgx-a100-80g").device.memory_bandwidth == 2039e9
    h100 = Cluster.preset("dgx-h100").device
    assert (h100.flops("bf16"), h100.flops("fp8"), h100.flops("tf32"), h100.flops("fp32")) == (
        989e12, 1979e12, 494e12, 67e12,
    )
    assert h100.memory_bandwidth == 3.35e12
    h200 = Cluster.preset("dgx-h200")
    assert h200.device.peak_flops == h100.peak_flops
    assert (h200.device.memory_bytes, h200.device.memory_bandwidth) == (141 * 2**30, 4.8e12)
    assert h200.intra_node.bandwidth == 450e9 and h200.inter_node.bandwidth == 50e9
    v100 = Cluster.preset("p3-v100")
    assert set(v100.device.peak_flops) == {"fp32", "fp16"}
    assert v100.device.flops("fp16") == 125e12
    assert v100.intra_node.bandwidth == 150e9
    assert v100.inter_node.bandwidth * 8 * 8 == 25e9  # 25 Gbit/s per node, 8 GPUs


def test_preset_nodes_and_with_nodes():
    cluster = Cluster.preset("dgx-h100", nodes=4)
    assert (cluster.nodes, cluster.devices_per_node, cluster.world_size) == (4, 8, 32)
    smaller = cluster.with_nodes(2, devices_per_node=4)
    assert smaller.world_size == 8
    assert smaller.device == cluster.device and smaller.inter_node == cluster.inter_node
    assert cluster.world_size == 32  # with_nodes made a new value
    assert load_cluster("dgx-h100", nodes=2, devices_per_node=4) == smaller
    assert load_cluster("dgx-h100", devices_per_node=2).world_size == 2


def test_node_of_is_node_major():
    cluster = Cluster.preset("dgx-a100-80g", nodes=2)
    assert [cluster.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    for bad in (-1, 16, 1.0):
        with pytest.raises(ClusterError, match=r"rank = .*\[0, 16\)"):
            cluster.node_of(bad)


def test_v100_has_no_bf16_and_says_to_use_fp16():
    with pytest.raises(ClusterError) as info:
        Cluster.preset("p3-v100").device.flops("bf16")
    message = str(info.value)
    assert "V100" in message and "no bf16" in message
    assert "use fp16" in message and "fp32, fp16" in message


def test_unknown_dtype_suggests_the_dtypes_name():
    device = Cluster.preset("dgx-h100").device
    with pytest.raises(ClusterError, match=r"did you mean 'bf16'"):
        device.flops("bfloat16")


# ---- local-cpu ----------------------------------------------------------------------------


def test_local_four_processes():
    one, four = Cluster.local(1), Cluster.local(4)
    assert (four.name, four.nodes, four.devices_per_node, four.world_size) == ("local-cpu", 1, 4, 4)
    assert list(four.device.peak_flops) == ["fp32"]
    assert 0 < four.device.flops("fp32") <= one.device.flops("fp32")
    assert 0 < four.device.memory_bandwidth <= one.device.memory_bandwidth
    assert 0 < four.device.memory_bytes * 4 <= one.device.memory_bytes
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert ram - 4 * 2**20 <= 4 * four.device.memory_bytes <= ram
    assert four.intra_node == four.inter_node
    assert 1e9 <= four.intra_node.bandwidth <= 10e9  # gloo over loopback: a few GB/s
    assert 10e-6 <= four.intra_node.latency <= 100e-6
    assert four.efficiency != Efficiency()  # tuned for CPU, not the GPU defaults
    with pytest.raises(ClusterError, match="use fp32"):
        four.device.flops("bf16")


def test_local_specs():
    assert load_cluster("local-cpu:4") == Cluster.local(4)
    assert load_cluster("local-cpu", devices_per_node=3) == Cluster.local(3)
    assert load_cluster("local-cpu") == Cluster.local(1) == Cluster.preset("local-cpu")
    for spec, kwargs, needle in [
        ("local-cpu:x", {}, "local-cpu:N"),
        ("local-cpu:0", {}, "local-cpu:N"),
        ("local-cpu", {"nodes": 2}, "nodes = 2"),
        ("local-cpu:2", {"devices_per_node": 3}, "devices_per_node = 3"),
    ]:
        with pytest.raises(ClusterError, match=re.escape(needle)):
            load_cluster(spec, **kwargs)
    with pytest.raises(ClusterError, match="world_size = 0"):
        Cluster.local(0)


# ---- TOML and dict round trips ------------------------------------------------------------


def awkward_cluster() -> Cluster:
    """Figures that are not round in file units: odd bytes, 15-digit bandwidths, tiny latency."""
    return Cluster(
        name='odd "name" \\ with\ttab',
        nodes=3,
        devices_per_node=5,
        device=DeviceSpec(
            name="Weird-GPU ü",
            memory_bytes=12_345_678_901,
            peak_flops={"fp8": 1.23456789012345e15, "fp32": 7.1e12},
            memory_bandwidth=1.23456789012345e12,
        ),
        intra_node=LinkSpec(bandwidth=123.456e9, latency=1.7e-6),
        inter_node=LinkSpec(bandwidth=3.3333333333e9, latency=0.0, name="RoCE"),
        efficiency=Efficiency(matmul=0.55, attention=0.123456789, elementwise=1.0, comm=0.9),
    )


ROUND_TRIP = [Cluster.preset(n, nodes=2) for n in GPU_PRESETS] + [
    Cluster.local(3),
    awkward_cluster(),
]


@pytest.mark.parametrize("cluster", ROUND_TRIP, ids=lambda c: c.name[:12])
def test_toml_round_trip(cluster, tmp_path):
    path = write(tmp_path, cluster.to_toml())
    assert Cluster.from_toml(path) == cluster
    assert load_cluster(str(path)) == cluster


@pytest.mark.parametrize("cluster", ROUND_TRIP, ids=lambda c: c.name[:12])
def test_dict_round_trip_through_json(cluster):
    d = cluster.to_dict()
    assert Cluster.from_dict(json.loads(json.dumps(d))) == cluster
    assert Cluster.from_dict(d) == cluster


def test_to_dict_uses_file_units():
    d = Cluster.preset("dgx-a100-80g").to_dict()
    assert d["device"]["memory_gib"] == 80
    assert d["device"]["memory_bandwidth_gbps"] == 2039
    assert d["device"]["peak_tflops"] == {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}
    assert d["intra_node"] == {"name": "NVLink", "bandwidth_gbps": 300, "latency_us": 3}
    assert "preset" not in d


def test_preset_plus_override(tmp_path):
    path = write(tmp_path, """\
preset = "dgx-a100-80g"
nodes = 4

[device]
memory_gib = 40

[inter_node]
bandwidth_gbps = 12.5

[efficiency]
comm = 0.7
""")
    cluster = Cluster.from_toml(path)
    base = Cluster.preset("dgx-a100-80g")
    assert cluster.name == "dgx-a100-80g" and cluster.world_size == 32
    assert cluster.device.memory_bytes == 40 * 2**30
    assert cluster.device.peak_flops == base.device.peak_flops
    assert cluster.device.memory_bandwidth == base.device.memory_bandwidth
    assert cluster.inter_node == LinkSpec(12.5e9, base.inter_node.latency, "IB")
    assert cluster.intra_node == base.intra_node
    assert cluster.efficiency == dataclasses.replace(base.efficiency, comm=0.7)


def test_preset_override_replaces_peak_table_whole():
    cluster = Cluster.from_dict(
        {"preset": "dgx-h100", "device": {"peak_tflops": {"bf16": 500}}}
    )
    assert dict(cluster.device.peak_flops) == {"bf16": 500e12}


def test_local_cpu_preset_in_a_file(tmp_path):
    path = write(tmp_path, 'preset = "local-cpu"\ndevices_per_node = 2\n')
    assert Cluster.from_toml(path) == Cluster.local(2)
    with pytest.raises(ClusterError, match="nodes = 2"):
        Cluster.from_dict({"preset": "local-cpu", "nodes": 2})


def test_efficiency_defaults_apply_when_the_table_is_absent(tmp_path):
    cluster = Cluster.from_toml(write(tmp_path, BASE_TOML))
    assert cluster.efficiency == Efficiency()
    assert cluster.world_size == 8
    assert cluster.device.memory_bytes == 24 * 2**30
    assert cluster.inter_node.latency == 10e-6
    assert cluster.intra_node.name == ""
    assert cluster.describe() == (
        "test: 2 nodes x 4 TestGPU (24 GiB, 200 TFLOP/s bf16), "
        "intra-node 100 GB/s, inter-node 10 GB/s/device"
    )


# ---- errors name the field ----------------------------------------------------------------

# (id, old line of BASE_TOML, its replacement, substrings the error must contain)
BAD_FIELDS = [
    ("negative-bandwidth", "bandwidth_gbps = 10\n", "bandwidth_gbps = -25\n",
     ["inter_node.bandwidth", "-25", "> 0"]),
    ("zero-bandwidth", "bandwidth_gbps = 100\n", "bandwidth_gbps = 0\n",
     ["intra_node.bandwidth_gbps", "> 0"]),
    ("negative-latency", "latency_us = 2\n", "latency_us = -1\n",
     ["intra_node.latency_us", ">= 0"]),
    ("zero-devices", "devices_per_node = 4\n", "devices_per_node = 0\n",
     ["devices_per_node = 0", ">= 1"]),
    ("zero-nodes", "nodes = 2\n", "nodes = 0\n", ["nodes = 0", ">= 1"]),
    ("nodes-wrong-type", "nodes = 2\n", 'nodes = "2"\n', ["nodes = '2'", "integer"]),
    ("nodes-float", "nodes = 2\n", "nodes = 2.0\n", ["nodes = 2.0", "integer"]),
    ("zero-memory", "memory_gib = 24\n", "memory_gib = 0\n", ["device.memory_gib", "GiB"]),
    ("memory-twice", "memory_gib = 24\n", "memory_gib = 24\nmemory_bytes = 1024\n",
     ["device.memory_gib", "device.memory_bytes", "not both"]),
    ("memory-bytes-float", "memory_gib = 24\n", "memory_bytes = 1.5e9\n",
     ["device.memory_bytes", "integer"]),
    ("missing-key", "memory_bandwidth_gbps = 1000\n", "",
     ["device.memory_bandwidth_gbps", "missing", "GB/s"]),
    ("missing-table", "[inter_node]\nbandwidth_gbps = 10\nlatency_us = 10\n", "",
     ["inter_node", "missing"]),
    ("missing-top-key", 'name = "test"\n', "", ["name is missing", "preset"]),
    ("unknown-key-typo", "memory_gib = 24\n", "memroy_gib = 24\n",
     ["device.memroy_gib", "did you mean 'memory_gib'"]),
    ("unknown-top-key", "nodes = 2\n", "nodes = 2\ndevice_per_node = 4\n",
     ["device_per_node", "did you mean 'devices_per_node'"]),
    ("unknown-table", "[inter_node]\n", "[inter-node]\n",
     ["inter-node", "did you mean 'inter_node'"]),
    ("bad-dtype-key", "bf16 = 200\n", "bfloat16 = 200\n",
     ["device.peak_tflops.bfloat16", "did you mean 'bf16'", "fp32, tf32, bf16, fp16, fp8"]),
    ("zero-peak", "bf16 = 200\n", "bf16 = 0\n", ["device.peak_tflops.bf16", "> 0"]),
    ("empty-peak", "fp32 = 20\nbf16 = 200\n", "", ["device.peak_tflops", "at least one dtype"]),
    ("efficiency-above-one", "latency_us = 10\n", "latency_us = 10\n\n[efficiency]\ncomm = 1.5\n",
     ["efficiency.comm = 1.5", "(0, 1]"]),
    ("efficiency-zero", "latency_us = 10\n", "latency_us = 10\n\n[efficiency]\nmatmul = 0\n",
     ["efficiency.matmul = 0", "(0, 1]"]),
    ("unknown-preset", 'name = "test"\n', 'preset = "dgx-a100-80"\n',
     ["preset = 'dgx-a100-80'", "did you mean 'dgx-a100-80g'", "dgx-h100", "p3-v100"]),
    ("bad-toml-syntax", "nodes = 2\n", "nodes = \n", ["not valid TOML", "line 2"]),
    ("inf-bandwidth", "bandwidth_gbps = 10\n", "bandwidth_gbps = inf\n",
     ["inter_node.bandwidth_gbps = inf", "finite"]),
]


@pytest.mark.parametrize("old, new, needles", [c[1:] for c in BAD_FIELDS],
                         ids=[c[0] for c in BAD_FIELDS])
def test_bad_field_names_the_field(tmp_path, old, new, needles):
    assert BASE_TOML.count(old) == 1, "the test case must change exactly one place"
    path = write(tmp_path, BASE_TOML.replace(old, new))
    with pytest.raises(ClusterError) as info:
        Cluster.from_toml(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    for load in (Cluster.from_toml, load_cluster):
        with pytest.raises(ClusterError) as info:
            load(str(path))
        assert str(path) in str(info.value) and "does not exist" in str(info.value)


def test_unknown_preset_suggests_one():
    with pytest.raises(ClusterError, match=r"did you mean 'dgx-h100'.*\.toml"):
        load_cluster("dgx-h10")
    with pytest.raises(ClusterError, match="presets are dgx-a100-40g, "):
        Cluster.preset("nothing-like-it")


def test_from_dict_rejects_non_tables():
    with pytest.raises(ClusterError, match=r"device = 5 \(int\)|device = 5"):
        Cluster.from_dict({**Cluster.preset("dgx-h100").to_dict(), "device": 5})
    with pytest.raises(ClusterError, match="cluster"):
        Cluster.from_dict(["not", "a", "table"])


@pytest.mark.parametrize("build, needle", [
    (lambda: LinkSpec(bandwidth=-1.0, latency=0.0), "LinkSpec.bandwidth = -1.0"),
    (lambda: LinkSpec(bandwidth=1e9, latency=-1e-6), "LinkSpec.latency"),
    (lambda: DeviceSpec("x", 0, {"fp32": 1e12}, 1e9), "device.memory_bytes = 0"),
    (lambda: DeviceSpec("x", 1, {}, 1e9), "device.peak_flops"),
    (lambda: DeviceSpec("x", 1, {"int8": 1e12}, 1e9), "device.peak_flops.int8"),
    (lambda: DeviceSpec("", 1, {"fp32": 1e12}, 1e9), "device.name"),
    (lambda: Efficiency(comm=0.0), "efficiency.comm = 0.0"),
    (lambda: Efficiency(matmul=True), "efficiency.matmul = True"),
    (lambda: Cluster.preset("dgx-h100").with_nodes(0), "nodes = 0"),
    (lambda: Cluster.preset("dgx-h100").with_nodes(1, 0), "devices_per_node = 0"),
    (lambda: dataclasses.replace(Cluster.preset("dgx-h100"), inter_node=None), "inter_node = None"),
])
def test_direct_construction_is_validated(build, needle):
    with pytest.raises(ClusterError) as info:
        build()
    assert needle in str(info.value)


# ---- immutability -------------------------------------------------------------------------


def test_frozen():
    cluster = Cluster.preset("dgx-a100-80g")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cluster.nodes = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cluster.device.memory_bytes = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cluster.efficiency.comm = 1.0
    with pytest.raises(TypeError):
        cluster.device.peak_flops["bf16"] = 1.0  # the peak table is read-only too
    assert not hasattr(cluster, "__dict__")  # slots


def test_hashable_and_picklable():
    cluster = Cluster.preset("dgx-h200", nodes=2)
    assert hash(cluster) == hash(Cluster.preset("dgx-h200", nodes=2))
    assert {cluster: 1}[Cluster.preset("dgx-h200", nodes=2)] == 1
    assert pickle.loads(pickle.dumps(cluster)) == cluster


def test_peak_flops_keep_dtype_order():
    device = DeviceSpec("x", 1, {"fp16": 2e12, "fp32": 1e12}, 1e9)
    assert list(device.peak_flops) == ["fp32", "fp16"]
    assert list(device.peak_flops) == [d for d in DTYPES if d in device.peak_flops]


# ---- docs/cluster.md ----------------------------------------------------------------------


def test_doc_examples_load(tmp_path):
    blocks = doc_toml_blocks()
    assert len(blocks) >= 2
    clusters = [Cluster.from_toml(write(tmp_path, b, f"doc{i}.toml")) for i, b in enumerate(blocks)]

    full = clusters[0]
    assert "preset" not in blocks[0]
    assert (full.name, full.nodes, full.devices_per_node) == ("lab-a100", 2, 8)
    assert full.device == Cluster.preset("dgx-a100-80g").device
    assert full.inter_node == LinkSpec(12.5e9, 8e-6, "IB")
    assert full.efficiency == Efficiency(matmul=0.8, attention=0.6, elementwise=0.7, comm=0.75)
    assert f"`{full.describe()}`" in DOC.read_text(encoding="utf-8")
    # The full example spells out every key the format has.
    for key in ("name", "nodes", "devices_per_node", "memory_gib", "memory_bandwidth_gbps",
                "bandwidth_gbps", "latency_us", *dataclasses.asdict(Efficiency())):
        assert re.search(rf"^{key} = ", blocks[0], flags=re.M), key

    override = clusters[1]
    assert re.search(r'^preset = "dgx-a100-80g"', blocks[1], flags=re.M)
    assert override.world_size == 32
    assert override.inter_node.bandwidth == 12.5e9
    assert override.device == Cluster.preset("dgx-a100-80g").device


def _fmt(x: float) -> str:
    return f"{x:.4g}"


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_doc_presets_table_matches_code(name):
    c = Cluster.preset(name)
    peaks = " / ".join(
        _fmt(c.device.peak_flops[d] / 1e12) if d in c.device.peak_flops else "-" for d in DTYPES
    )
    row = (
        f"| {name} | {c.device.name} | {c.devices_per_node} "
        f"| {_fmt(c.device.memory_bytes / 2**30)} | {_fmt(c.device.memory_bandwidth / 1e9)} "
        f"| {peaks} "
        f"| {c.intra_node.name} {_fmt(c.intra_node.bandwidth / 1e9)} "
        f"| {c.inter_node.name} {_fmt(c.inter_node.bandwidth / 1e9)} |"
    )
    assert row in DOC.read_text(encoding="utf-8").splitlines()


def test_doc_lists_every_field_and_preset():
    text = DOC.read_text(encoding="utf-8")
    for key in ("memory_bytes", "memory_gib", "peak_tflops", "bandwidth_gbps", "latency_us",
                "preset", *dataclasses.asdict(Efficiency()), *DTYPES, *PRESETS):
        assert f"`{key}`" in text or f"| {key} |" in text, key
