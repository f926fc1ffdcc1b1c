"""The hardware a plan targets: its devices, the links between them, and how close to peak they run.

A :class:`Cluster` says how many machines there are, how many devices each holds, what one
device can do (memory, peak FLOP/s per dtype, memory bandwidth) and how fast the links inside
and between machines are. The solver reads device memory from it to decide what fits, and the
cost models (``cost_models/``) price compute and communication from its datasheet figures scaled
by its :class:`Efficiency` assumptions. A cluster comes from a preset name, a TOML file
(``docs/cluster.md``), or the processes of this machine (``local-cpu``); it is frozen once built.

One module per concern, each importing only those before it:

- ``checks``: validation helpers; every error names the field, the value and what is allowed;
- ``specs``: the value types of one device, one link, the efficiencies, and a cluster's fields;
- ``local``: this machine's model for ``local-cpu`` (estimates);
- ``presets``: the named clusters, datasheet figures with their sources;
- ``fileformat``: the TOML layout, unit conversion and parsing;
- ``values``: :class:`Cluster` itself, its constructors and queries;
- ``load``: the CLI's ``--cluster`` spelling.

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

from .checks import DTYPES
from .load import load_cluster
from .local import LOCAL_CPU, available_cpus, cpu_model
from .presets import PRESETS
from .specs import ClusterSpec, DeviceSpec, Efficiency, LinkSpec
from .values import Cluster, default_dtype, tp_degrees

__all__ = [
    "DTYPES",
    "LOCAL_CPU",
    "PRESETS",
    "Cluster",
    "ClusterSpec",
    "DeviceSpec",
    "Efficiency",
    "LinkSpec",
    "available_cpus",
    "cpu_model",
    "default_dtype",
    "load_cluster",
    "tp_degrees",
]
