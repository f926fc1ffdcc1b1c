"""The profiler: each block's and each compute node's forward and backward time, measured on this device.

It sits between capture and the cost models. Given a captured model and its
blocks, it runs every distinct block for real (random tensors of the annotated
shapes and dtypes), times the block and each of its compute nodes forward and
backward, and also times the tensor-parallel shards the solver considers (a
column-parallel linear with its local shard's shapes). The measurements feed
``cost_models.MeasuredCostModel`` directly and, through
``cost_models.fit_calibration``, the calibrated analytic model that prices
what was not measured. ``autopart plan --profile`` and ``autopart profile``
are its commands.

Glossary (as everywhere): a **node** is an FX graph node, a **block** a group
of nodes aligned to a module, a **variant** one (strategy, tp) shard of a node.

[Note: profiling one block at a time]
Only one block's parameters ever exist: its parameter placeholders and the
activations entering it are created (random, with the annotated shape, dtype
and strides) just before it runs and dropped after, so a 175B model is
profiled one layer's weights at a time. Integer inputs that index an embedding
get indices within its rows; other integer inputs are zeros and boolean ones
True (masks that attend everywhere: the same work as a causal mask on the
kernels we run). A float input requires grad when a trainable parameter flows
into it, so backward computes exactly the gradients training would. Each node
is then timed alone on the real values it saw in the block's run (so views
keep their strides). Repeated identical blocks and identical nodes share one
signature and are measured once.

[Note: the profile cache]
Measurements go to an SQLite file (a plain format, never pickle), one row per
(kind, signature, variant, dtype, device, torch version), with a checksum of
its JSON payload. A row that fails its checksum or does not parse as a valid
measurement is counted as corrupt, deleted and measured again; a file that is
not a database is moved aside (``<name>.corrupt-<time>``), never deleted, and
a fresh cache is started. Timings depend on the device, the torch version and
(on CPU) the number of threads, so those are part of the key.

[Note: nodes alone and the block]
A node timed alone runs hot (its inputs in cache, no neighbours) and skips
what the block pays between ops: the dispatcher, the Python of the forward,
allocation. The planner sums node costs, so the difference between the
whole block (measured) and the sum of its nodes (measured alone) is shared
out over the block's nodes, separately forward and backward: equally (it is
per-call overhead) when the block is slower, in proportion when it is faster.
These in-block times are what the planner uses and what the calibrated model
is fitted to (as ``sample`` rows of the cache), so that both add up to the
block that runs for real. Shards get the same per-node share as their node.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import fx

from cost_models import MeasuredCostModel, MeasuredOp, NodeRef, Sample
from cost_models.base import CostModel

from .capture import CapturedModel, NodeInfo, flat_tensors
from .errors import AutopartError
from .graph import Block, PartitionGraph
from .tp_strategies import STRATEGIES, allowed_strategies

if TYPE_CHECKING:
    from cost_models import Calibration

    from .cluster import Cluster

__all__ = [
    "ProfileError",
    "Timing",
    "Measurement",
    "ProfileCache",
    "ProfileOptions",
    "ProfileStats",
    "ProfileResult",
    "profile_model",
    "device_name",
    "default_cache_path",
    "gpu_preset",
    "check_device",
    "calibration",
    "profile_for_planning",
    "Profiled",
    "BlockFidelity",
    "fidelity",
    "measure_blocks",
]

CACHE_FORMAT = 2


class ProfileError(AutopartError):
    """The model cannot be profiled here (a node we cannot run, a device we do not have)."""


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    """Repeated runs of one thing: the median and how much the runs varied."""

    median_s: float
    spread: float  # interquartile range / median (0 for a single run)
    reps: int

    @classmethod
    def of(cls, times: Sequence[float]) -> "Timing":
        med = statistics.median(times)
        if len(times) >= 4:
            q = statistics.quantiles(times, n=4)
            spread = (q[2] - q[0]) / med if med > 0 else 0.0
        else:
            spread = (max(times) - min(times)) / med if med > 0 else 0.0
        return cls(med, spread, len(times))


NO_TIME = Timing(0.0, 0.0, 0)


@dataclass(frozen=True, slots=True)
class Measurement:
    """One node variant (or a whole block) measured for one micro-batch of the capture batch."""

    op: str  # aten target for a node; the block name for a block
    strategy: str  # replicate | column | row | vocab | sharded
    tp: int  # the degree the strategy divides by (1 for replicate)
    forward: Timing
    backward: Timing  # NO_TIME when nothing it reads needs a gradient
    forward_flops: float  # of the variant measured
    backward_flops: float
    bytes_moved: float
    activation_bytes: int | None = None  # CUDA only: peak allocated during forward minus before
    param_bytes: float = 0.0  # the parameters' share of bytes_moved

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op, "strategy": self.strategy, "tp": self.tp,
            "forward": [self.forward.median_s, self.forward.spread, self.forward.reps],
            "backward": [self.backward.median_s, self.backward.spread, self.backward.reps],
            "forward_flops": self.forward_flops, "backward_flops": self.backward_flops,
            "bytes_moved": self.bytes_moved, "activation_bytes": self.activation_bytes,
            "param_bytes": self.param_bytes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Measurement":
        """Parse and validate; raises ValueError on anything a measurement cannot be."""

        def timing(v: Any) -> Timing:
            med, spread, reps = v
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in (med, spread, reps)):
                raise ValueError(f"bad timing {v!r}")
            return Timing(float(med), float(spread), int(reps))

        numbers = [d["forward_flops"], d["backward_flops"], d["bytes_moved"], d["param_bytes"]]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in numbers):
            raise ValueError("bad FLOPs or bytes")
        act = d.get("activation_bytes")
        if act is not None and (not isinstance(act, int) or act < 0):
            raise ValueError("bad activation_bytes")
        tp = d["tp"]
        if not isinstance(tp, int) or tp < 1 or not isinstance(d["op"], str) or not isinstance(d["strategy"], str):
            raise ValueError("bad op, strategy or tp")
        fwd = timing(d["forward"])
        if fwd.reps < 1:
            raise ValueError("no forward runs")
        f, b, moved, params = map(float, numbers)
        return cls(d["op"], d["strategy"], tp, fwd, timing(d["backward"]), f, b, moved, act, params)

    def measured_op(self) -> MeasuredOp:
        return MeasuredOp(self.forward.median_s, self.backward.median_s, self.forward_flops, self.backward_flops,
                          self.bytes_moved, self.param_bytes)


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``$AUTOPART_CACHE``, else ``$XDG_CACHE_HOME/autopart/profile.sqlite``, else ``~/.cache/...``."""
    if os.environ.get("AUTOPART_CACHE"):
        return Path(os.environ["AUTOPART_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "autopart" / "profile.sqlite"


class ProfileCache:
    """Measurements on disk; see [Note: the profile cache]."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.corrupt = 0  # entries found corrupt (and dropped) since opening
        self.moved_aside: Path | None = None  # where an unreadable file went
        if self.path.is_dir():
            raise ProfileError(f"--cache {self.path} is a directory; give a file path such as {self.path / 'profile.sqlite'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProfileError(f"--cache {self.path}: cannot create its directory ({exc.strerror})") from None
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path)
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, kind TEXT, device TEXT, torch TEXT, "
                "dtype TEXT, payload TEXT, checksum TEXT)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            row = db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('format', ?)", (str(CACHE_FORMAT),))
                db.commit()
            elif row[0] != str(CACHE_FORMAT):
                raise sqlite3.DatabaseError(f"cache format {row[0]}, expected {CACHE_FORMAT}")
            return db
        except sqlite3.DatabaseError:
            try:
                db.close()
            except Exception:
                pass
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            self.moved_aside = aside
            return self._open()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ProfileCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _checksum(payload: str) -> str:
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def get(self, key: str) -> Measurement | None:
        row = self._db.execute("SELECT payload, checksum FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        payload, checksum = row
        try:
            if not isinstance(payload, str) or self._checksum(payload) != checksum:
                raise ValueError("checksum mismatch")
            return Measurement.from_dict(json.loads(payload))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.corrupt += 1
            self._db.execute("DELETE FROM entries WHERE key = ?", (key,))
            self._db.commit()
            return None

    def put(self, key: str, kind: str, device: str, torch_version: str, dtype: str, m: Measurement) -> None:
        payload = json.dumps(m.to_dict(), sort_keys=True)
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, kind, device, torch_version, dtype, payload, self._checksum(payload)),
        )

    def put_sample(self, key: str, device: str, torch_version: str, dtype: str, op: str, m: MeasuredOp) -> None:
        """A node's in-block time, for fitting the calibrated model."""
        payload = json.dumps(dict(op=op, forward_s=m.forward_s, backward_s=m.backward_s, forward_flops=m.forward_flops,
                                  backward_flops=m.backward_flops, bytes_moved=m.bytes_moved, param_bytes=m.param_bytes),
                             sort_keys=True)
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, 'sample', ?, ?, ?, ?, ?)",
            (key, device, torch_version, dtype, payload, self._checksum(payload)),
        )

    def commit(self) -> None:
        self._db.commit()

    def samples(self, device: str, torch_version: str) -> list[Sample]:
        """Every valid in-block node time of ``device`` under ``torch_version``, for fitting."""
        out = []
        rows = self._db.execute(
            "SELECT dtype, payload, checksum FROM entries WHERE kind = 'sample' AND device = ? AND torch = ?",
            (device, torch_version),
        ).fetchall()
        for dtype, payload, checksum in rows:
            try:
                if self._checksum(payload) != checksum:
                    raise ValueError("checksum mismatch")
                d = json.loads(payload)
                nums = [float(d[k]) for k in ("forward_flops", "backward_flops", "bytes_moved", "forward_s", "backward_s",
                                              "param_bytes")]
                if not all(math.isfinite(x) and x >= 0 for x in nums) or not isinstance(d["op"], str):
                    raise ValueError("bad sample")
            except (ValueError, KeyError, TypeError, json.JSONDecodeError):
                self.corrupt += 1
                continue
            out.append(Sample(d["op"], dtype, *nums))
        return out

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]


# --------------------------------------------------------------------------------------
# Options and results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileOptions:
    """How to profile."""

    device: str = "cpu"  # "cpu" or "cuda" (or "cuda:N")
    dtype: str = "fp32"  # the training dtype label the measurements are filed under
    tp_degrees: tuple[int, ...] = ()  # also measure the shards of these tensor-parallel degrees
    budget_s: float | None = None  # stop measuring after this many seconds; the rest is predicted
    warmup: int = 2  # untimed runs before timing
    min_reps: int = 5  # timed runs, at least
    max_reps: int = 25  # timed runs, at most
    target_s: float = 0.15  # stop repeating once this much time was spent timing one thing
    progress: bool | None = None  # a progress bar; None: when stderr is a terminal
    # "wall", or on CPU "cpu": the process's CPU time, which other jobs sharing the cores do not
    # inflate. Equal to wall time for one thread on an idle core; use it only with one thread.
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "cpu"):
            raise ProfileError(f"clock must be 'wall' or 'cpu', got {self.clock!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ProfileError(f"--profile-budget must be a positive number of seconds, got {self.budget_s}")
        if any(t < 2 for t in self.tp_degrees):
            raise ProfileError(f"tp_degrees must be >= 2, got {self.tp_degrees}")


@dataclass(frozen=True, slots=True)
class ProfileStats:
    """What a profiling run did."""

    measured: int  # measurements taken now (nodes, shards and blocks)
    cached: int  # measurements read from the cache
    corrupt: int  # cache entries found corrupt and measured again
    unmeasured: int  # measurements skipped because the budget ran out
    profiling_s: float  # wall time spent profiling (cache lookups included)


@dataclass(frozen=True)
class ProfileResult:
    """Measurements of one captured model on one device."""

    device: str
    torch_version: str
    dtype: str
    nodes: Mapping[NodeRef, Measurement]  # every measured node variant, by node name
    blocks: Mapping[str, Measurement]  # block name -> the whole block, unsharded
    stats: ProfileStats
    # Node times with their block's share of what runs between ops; see [Note: nodes alone and the block].
    in_block: Mapping[NodeRef, MeasuredOp] = field(default_factory=dict)

    def measured_ops(self) -> dict[NodeRef, MeasuredOp]:
        """The measurements as the cost model takes them: in-block times where the block was measured."""
        return {ref: self.in_block.get(ref) or m.measured_op() for ref, m in self.nodes.items()}

    def cost_model(self, base: CostModel) -> MeasuredCostModel:
        """The planner's cost model: these measurements, with ``base`` for everything else."""
        return MeasuredCostModel(base, self.measured_ops())


def device_name(device: str) -> str:
    """What measurements are filed under: the device model (and, on CPU, the thread count)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(f"--device {device}: this machine has no CUDA GPU; profile on cpu or on a GPU machine")
        return torch.cuda.get_device_name(dev)
    if dev.type != "cpu":
        raise ProfileError(f"--device {device}: profiling runs on cpu or cuda")
    from .cluster import cpu_model

    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'' if threads == 1 else 's'})"


# --------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------


def profile_model(
    pgraph: PartitionGraph, cache: ProfileCache, options: ProfileOptions = ProfileOptions()
) -> ProfileResult:
    """Measure every block of ``pgraph`` (and its compute nodes and their shards) on ``options.device``."""
    return _Profiler(pgraph, cache, options).run()


def _dtype_of(t: Any) -> torch.dtype | None:
    return t.dtype if isinstance(t, torch.Tensor) else None


def _spec(a: Any) -> Any:
    """A printable, hashable description of an argument: tensors by shape, dtype and strides."""
    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        return _spec(v) if v is not None else f"node:{a.name}"
    if isinstance(a, torch.Tensor):
        return f"T{tuple(a.shape)}:{str(a.dtype).removeprefix('torch.')}:{tuple(a.stride())}"
    if isinstance(a, (list, tuple)):
        return [_spec(x) for x in a]
    if isinstance(a, dict):
        return {str(k): _spec(v) for k, v in sorted(a.items())}
    if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(a)
    return repr(a)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class _Clock:
    """Wall time on CPU (or the process's CPU time, on request), CUDA events on a GPU."""

    def __init__(self, device: torch.device, kind: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        self.now = time.process_time if kind == "cpu" and not self.cuda else time.perf_counter

    def time(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = self.now()
        fn()
        return self.now() - t0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class _Profiler:
    def __init__(self, pgraph: PartitionGraph, cache: ProfileCache, options: ProfileOptions) -> None:
        self.pgraph = pgraph
        self.cap: CapturedModel = pgraph.captured
        if self.cap.tracer != "export":
            raise ProfileError(
                f"{self.cap.name} was captured with torch.fx, whose graph calls modules; profiling runs "
                "torch.export graphs only. Fix what stops torch.export (see `autopart inspect`), or plan without --profile"
            )
        self.cache = cache
        self.opt = options
        self.device = torch.device(options.device)
        self.device_name = device_name(options.device)
        self.torch_version = torch.__version__
        self.clock = _Clock(self.device, options.clock)
        self.fx_nodes = {n.name: n for n in self.cap.graph_module.graph.nodes}
        self.grad_nodes = {n for n, info in self.cap.nodes.items() if info.needs_grad}
        self.started = time.perf_counter()
        self.measured = self.cached = self.unmeasured = 0
        self.corrupt_before = cache.corrupt
        self.nodes: dict[NodeRef, Measurement] = {}
        self.blocks: dict[str, Measurement] = {}
        self.by_key: dict[str, Measurement] = {}
        self.in_block: dict[NodeRef, MeasuredOp] = {}

    # --- bookkeeping ------------------------------------------------------------------

    def over_budget(self) -> bool:
        return self.opt.budget_s is not None and time.perf_counter() - self.started > self.opt.budget_s

    def node_signature(self, node: fx.Node) -> str:
        return json.dumps([str(node.target), _spec(node.args), _spec(node.kwargs),
                           [a.name in self.grad_nodes for a in node.all_input_nodes]])

    def cache_key(self, kind: str, signature: str, strategy: str, tp: int) -> str:
        return _key(kind, signature, strategy, tp, self.opt.dtype, self.device_name, self.torch_version, self.opt.clock)

    def lookup(self, key: str) -> Measurement | None:
        if key in self.by_key:
            return self.by_key[key]
        m = self.cache.get(key)
        if m is not None:
            self.cached += 1
            self.by_key[key] = m
        return m

    def store(self, key: str, kind: str, m: Measurement) -> None:
        self.measured += 1
        self.by_key[key] = m
        self.cache.put(key, kind, self.device_name, self.torch_version, self.opt.dtype, m)

    # --- what to measure --------------------------------------------------------------

    def compute_nodes(self, block: Block) -> list[NodeInfo]:
        """Nodes that run something: ops, and views too (no kernel, but a dispatcher call each)."""
        return [
            info for info in (self.cap.nodes[n] for n in block.nodes)
            if info.outputs and info.op in ("call_function", "call_method")
        ]

    def variants(self, info: NodeInfo) -> list[tuple[str, int]]:
        """(strategy, tp) shards of ``info`` to measure besides the whole op: those whose strategy
        times its shard (``TPStrategy.measured``; others are scaled from the whole op)."""
        return [
            (strat, tp)
            for tp in self.opt.tp_degrees
            for strat in allowed_strategies(info, self.cap, tp)
            if STRATEGIES[strat].divides_work and STRATEGIES[strat].measured(info.target)
        ]

    # --- the run ----------------------------------------------------------------------

    def run(self) -> ProfileResult:
        blocks = list(self.pgraph.blocks)
        bar = _progress(self.opt.progress, len(blocks))
        try:
            for block in blocks:
                if bar:
                    bar.advance(block.name)
                self.profile_block(block)
        finally:
            if bar:
                bar.close()
            self.cache.commit()
        stats = ProfileStats(self.measured, self.cached, self.cache.corrupt - self.corrupt_before, self.unmeasured,
                             time.perf_counter() - self.started)
        return ProfileResult(self.device_name, self.torch_version, self.opt.dtype, dict(self.nodes), dict(self.blocks), stats,
                             dict(self.in_block))

    def profile_block(self, block: Block) -> None:
        infos = self.compute_nodes(block)
        wanted: list[tuple[NodeInfo, str, int, str]] = []  # (node, strategy, tp, key) not yet known
        node_keys: dict[str, str] = {}
        for info in infos:
            sig = self.node_signature(self.fx_nodes[info.name])
            node_keys[info.name] = sig
            for strat, tp in [("replicate", 1), *self.variants(info)]:
                key = self.cache_key("node", sig, strat, tp)
                m = self.lookup(key)
                if m is None:
                    wanted.append((info, strat, tp, key))
                else:
                    self.nodes[NodeRef(info.name, strat, tp)] = m
        block_sig = json.dumps([node_keys.get(n, "") for n in block.nodes] + [self._boundary_specs(block)])
        block_key = self.cache_key("block", block_sig, "replicate", 1)
        bm = self.lookup(block_key)
        if bm is not None:
            self.blocks[block.name] = bm
        if not wanted and bm is not None:
            self.share_out(block, infos, bm, block_key, fresh=False)
            return
        if self.over_budget():
            self.unmeasured += len(wanted) + (bm is None)
            return
        env = self.materialize(block)
        try:
            self.forward_block(block, env)
            for info, strat, tp, key in wanted:
                if key in self.by_key:  # a twin earlier in this block (same op, same shapes)
                    self.nodes[NodeRef(info.name, strat, tp)] = self.by_key[key]
                    continue
                if self.over_budget():
                    self.unmeasured += 1
                    continue
                try:
                    m = self.time_node(info, env, strat, tp)
                except Exception as exc:
                    raise ProfileError(
                        f"block {block.name}: timing node {info.name} ({info.target}, {strat} at tp={tp}) failed: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    ) from None
                self.store(key, "node", m)
                self.nodes[NodeRef(info.name, strat, tp)] = m
            if bm is None:
                if self.over_budget():
                    self.unmeasured += 1
                else:
                    bm = self.time_block(block, env)
                    self.store(block_key, "block", bm)
                    self.blocks[block.name] = bm
            if bm is not None:
                self.share_out(block, infos, bm, block_key, fresh=True)
        finally:
            env.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def share_out(self, block: Block, infos: Sequence[NodeInfo], bm: Measurement, block_key: str, fresh: bool) -> None:
        """In-block node times; see [Note: nodes alone and the block]. ``fresh``: also file them for fitting."""
        alone = [(info, self.nodes.get(NodeRef(info.name))) for info in infos]
        if any(m is None for _, m in alone) or not alone:
            return  # the budget ran out inside this block: keep the nodes as measured

        def shares(total: float, parts: list[float]) -> list[tuple[float, float]]:
            """(add, scale) per part so that the parts sum to ``total``."""
            have = sum(parts)
            counted = sum(1 for p in parts if p > 0) or 1
            if total >= have:
                return [((total - have) / counted if p > 0 else 0.0, 1.0) for p in parts]
            return [(0.0, total / have if have > 0 else 1.0) for _ in parts]

        fwd = shares(bm.forward.median_s, [m.forward.median_s for _, m in alone])
        bwd = shares(bm.backward.median_s, [m.backward.median_s for _, m in alone])
        for i, ((info, _), (fa, fs), (ba, bs)) in enumerate(zip(alone, fwd, bwd)):
            refs = [NodeRef(info.name, st, tp) for st, tp in [("replicate", 1), *self.variants(info)]]
            for ref, m in [(r, self.nodes[r]) for r in refs if r in self.nodes]:
                op = MeasuredOp(
                    m.forward.median_s * fs + fa,
                    (m.backward.median_s * bs + ba) if m.backward.reps else 0.0,
                    m.forward_flops, m.backward_flops, m.bytes_moved, m.param_bytes,
                )
                self.in_block[ref] = op
                if fresh:
                    key = self.cache_key("sample", json.dumps([block_key, i]), ref.strategy, ref.tp)
                    self.cache.put_sample(key, self.device_name, self.torch_version, self.opt.dtype, m.op, op)

    def _boundary_specs(self, block: Block) -> list[Any]:
        inside = set(block.nodes)
        return [
            [a.name in self.grad_nodes, _spec(a)]
            for n in block.nodes
            for a in self.fx_nodes[n].all_input_nodes
            if a.name not in inside
        ]

    # --- tensors ----------------------------------------------------------------------

    def materialize(self, block: Block) -> dict[str, Any]:
        """Values for everything the block reads from outside it; see [Note: profiling one block at a time]."""
        inside = set(block.nodes)
        env: dict[str, Any] = {}
        for n in block.nodes:
            for a in self.fx_nodes[n].all_input_nodes:
                if a.name in inside or a.name in env:
                    continue
                bound = self._index_bound(a, block)
                env[a.name] = self._make(a.meta.get("val"), a.name in self.grad_nodes, a.name in self.cap.param_nodes, bound)
        return env

    def _index_bound(self, producer: fx.Node, block: Block) -> int | None:
        """Rows of the embedding that ``producer`` indexes inside ``block``, if it does."""
        bounds = []
        for user in producer.users:
            if user.name in block.nodes and _base(str(user.target)) == "embedding" and user.args[1] is producer:
                weight = user.args[0].meta.get("val") if isinstance(user.args[0], fx.Node) else None
                if isinstance(weight, torch.Tensor):
                    bounds.append(int(weight.shape[0]))
        return min(bounds) if bounds else None

    def _make(self, val: Any, grad: bool, is_param: bool, bound: int | None) -> Any:
        if isinstance(val, (list, tuple)):
            return type(val)(self._make(v, grad, is_param, bound) for v in val)
        if not isinstance(val, torch.Tensor):
            return val  # ints, symbolic sizes already concrete, None
        shape, stride = tuple(int(s) for s in val.shape), tuple(int(s) for s in val.stride())
        t = torch.empty_strided(shape, stride, dtype=val.dtype, device=self.device)
        if val.dtype.is_floating_point:
            t.normal_(0.0, 0.02 if is_param else 1.0)
            return t.requires_grad_(grad)
        if val.dtype == torch.bool:
            return t.fill_(True)
        if bound is not None:
            return t.random_(0, bound)
        return t.zero_()

    def _on_device(self, obj: Any) -> Any:
        """The capture ran on meta: factory ops and ``.to`` name that device; run them here instead."""
        if isinstance(obj, torch.device) and obj.type == "meta":
            return self.device
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._on_device(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._on_device(v) for k, v in obj.items()}
        return obj

    def _call(self, node: fx.Node, env: Mapping[str, Any]) -> Any:
        if "_assert" in str(node.target):
            return None  # metadata assertions (they name the capture's meta device) do no work
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a.name])
        args, kwargs = self._on_device(args), self._on_device(kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        raise ProfileError(f"node {node.name} ({node.op} {node.target}) cannot be run on its own; profiling needs torch.export graphs")

    def forward_block(self, block: Block, env: dict[str, Any]) -> None:
        """Run the block once, leaving every node's real output in ``env`` (its nodes' inputs)."""
        with torch.enable_grad():
            for n in block.nodes:
                node = self.fx_nodes[n]
                try:
                    env[n] = self._call(node, env)
                except ProfileError:
                    raise
                except Exception as exc:
                    raise ProfileError(
                        f"block {block.name}: node {n} ({node.format_node()}) failed on real tensors: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    ) from None

    # --- timing -----------------------------------------------------------------------

    def repeat(self, setup: Callable[[], Any], timed: Callable[[Any], Any]) -> Timing:
        """Warm up, then time ``timed(setup())`` until ``max_reps`` or ``target_s`` (at least ``min_reps``)."""
        for _ in range(self.opt.warmup):
            timed(setup())
        self.clock.sync()
        times: list[float] = []
        spent = 0.0
        while len(times) < self.opt.max_reps and (len(times) < self.opt.min_reps or spent < self.opt.target_s):
            state = setup()
            t = self.clock.time(lambda: timed(state))
            times.append(t)
            spent += t
        return Timing.of(times)

    def _variant_args(self, node: fx.Node, env: Mapping[str, Any], strat: str, tp: int) -> tuple[tuple, dict]:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a.name])
        args, kwargs = self._on_device(args), self._on_device(kwargs)
        if strat == "replicate":
            return tuple(args), dict(kwargs)
        args, kwargs = list(args), dict(kwargs)
        STRATEGIES[strat].local_args(str(node.target), args, kwargs, tp)
        return tuple(args), dict(kwargs)

    def time_node(self, info: NodeInfo, env: Mapping[str, Any], strat: str, tp: int) -> Measurement:
        node = self.fx_nodes[info.name]
        args, kwargs = self._variant_args(node, env, strat, tp)
        target = node.target if node.op == "call_function" else None

        def call(a: tuple, k: dict) -> Any:
            if target is not None:
                return target(*a, **k)
            obj, *rest = a
            return getattr(obj, node.target)(*rest, **k)

        def fresh() -> tuple[tuple, dict]:  # leaves, so backward stops at this op
            def leaf(x: Any) -> Any:
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    return x.detach().requires_grad_(True)
                return x

            return tuple(_map(leaf, args)), {k: _map(leaf, v) for k, v in kwargs.items()}

        with torch.enable_grad():
            a0, k0 = fresh()
            outs = [t for t in flat_tensors(call(a0, k0)) if t.grad_fn is not None and t.dtype.is_floating_point]
            grads = [torch.randn_like(t) for t in outs]
            forward = self.repeat(lambda: fresh(), lambda s: call(*s))
            if outs:
                def setup() -> list[torch.Tensor]:
                    a, k = fresh()
                    return [t for t in flat_tensors(call(a, k)) if t.grad_fn is not None and t.dtype.is_floating_point]

                backward = self.repeat(setup, lambda o: torch.autograd.backward(o, grads))
            else:
                backward = NO_TIME
        div = tp if strat != "replicate" else 1
        moved = 0 if info.is_view else info.bytes_read + info.bytes_written  # as sharding.BlockLayoutCosts prices it
        pbytes = 0 if info.is_view else sum(self.cap.params[p].bytes for p in info.params if p in self.cap.params)
        return Measurement(
            info.op_label, strat, div, forward, backward,
            info.forward_flops / div, info.backward_flops / div, moved / div, None, pbytes / div,
        )

    def time_block(self, block: Block, env: Mapping[str, Any]) -> Measurement:
        """The whole block, forward and backward, from the inputs in ``env``."""
        inside = set(block.nodes)
        leaving = [
            n for n in block.nodes
            if n in self.pgraph.model_outputs or any(u.name not in inside for u in self.fx_nodes[n].users)
        ]
        inputs = {k: v for k, v in env.items() if k not in inside}

        def forward() -> dict[str, Any]:
            local = dict(inputs)
            with torch.enable_grad():
                for n in block.nodes:
                    local[n] = self._call(self.fx_nodes[n], local)
            return local

        def outputs(local: Mapping[str, Any]) -> list[torch.Tensor]:
            return [t for n in leaving for t in flat_tensors(local[n]) if t.grad_fn is not None and t.dtype.is_floating_point]

        grads = [torch.randn_like(t) for t in outputs(forward())]
        activation = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            kept = forward()
            torch.cuda.synchronize()
            activation = int(torch.cuda.max_memory_allocated(self.device) - before)
            del kept
        fwd = self.repeat(lambda: None, lambda _: forward())
        bwd = self.repeat(lambda: outputs(forward()), lambda o: torch.autograd.backward(o, grads)) if grads else NO_TIME
        return Measurement(block.name, "replicate", 1, fwd, bwd, float(block.forward_flops), float(block.backward_flops),
                           float(block.bytes_read + block.bytes_written), activation)


def measure_blocks(pgraph: PartitionGraph, blocks: Sequence[int], options: ProfileOptions = ProfileOptions()) -> Measurement:
    """Forward and backward of ``blocks`` run together, as one pipeline stage runs them (not cached).

    For checking the simulator's per-stage times against a real run of the
    stage's blocks in one process (benchmarks/stage_fidelity.py).
    """
    from dataclasses import replace

    members = [pgraph.blocks[i] for i in sorted(blocks)]
    nodes = tuple(n for b in members for n in b.nodes)
    unit = replace(
        members[0], name="+".join(b.name for b in members) if len(members) < 4 else f"{members[0].name}..{members[-1].name}",
        nodes=nodes, forward_flops=sum(b.forward_flops for b in members),
        backward_flops=sum(b.backward_flops for b in members), bytes_read=sum(b.bytes_read for b in members),
        bytes_written=sum(b.bytes_written for b in members),
    )
    with ProfileCache(":memory:") as cache:
        prof = _Profiler(pgraph, cache, options)
        env = prof.materialize(unit)
        return prof.time_block(unit, env)


def _map(fn: Callable[[Any], Any], obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(fn, o) for o in obj)
    return fn(obj)


def _base(target: str) -> str:
    """``aten.addmm.default`` -> ``addmm``."""
    parts = target.split(".")
    return parts[1] if target.startswith("aten.") and len(parts) > 1 else parts[0]


class _Bar:
    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
            console=Console(stderr=True), transient=True,
        )
        self.task = self.progress.add_task("", total=total)
        self.progress.start()
        self.first = True

    def advance(self, label: str) -> None:
        if not self.first:
            self.progress.advance(self.task)
        self.first = False
        self.progress.update(self.task, description=label)

    def close(self) -> None:
        self.progress.advance(self.task)
        self.progress.stop()


def _progress(enabled: bool | None, total: int) -> _Bar | None:
    if enabled is None:
        enabled = sys.stderr.isatty()
    return _Bar(total) if enabled and total > 1 else None


# --------------------------------------------------------------------------------------
# From measurements to the planner's cost model, and back to a report
# --------------------------------------------------------------------------------------


def calibration(cache: ProfileCache, device: str, torch_version: str | None = None) -> "Calibration":
    """Fit the calibrated op model to every node ``device`` has in the cache (all models profiled there)."""
    from cost_models import fit_calibration

    return fit_calibration(device, cache.samples(device, torch_version or torch.__version__))


def gpu_preset(gpu: str) -> str:
    """The cluster preset whose device is ``gpu`` (a torch.cuda.get_device_name()), for reports."""
    name = gpu.upper()
    if "H200" in name:
        return "dgx-h200"
    if "H100" in name:
        return "dgx-h100"
    if "A100" in name:
        return "dgx-a100-80g" if "80" in name else "dgx-a100-40g"
    if "V100" in name:
        return "p3-v100"
    raise ProfileError(f"no cluster preset has a {gpu}; write a cluster file for it (docs/cluster.md) and pass --cluster")


def check_device(cluster: "Cluster", device: str) -> None:
    """Measured costs only describe the cluster if the cluster's devices are the one measured."""
    kind = torch.device(device).type
    gpu_cluster = not cluster.name.startswith("local-cpu") and "cpu" not in cluster.device.name.lower()
    if kind == "cpu" and gpu_cluster:
        raise ProfileError(
            f"--profile measures this machine's CPU, but --cluster {cluster.name} has {cluster.device.name} devices; "
            "plan with --cluster local-cpu[:N] here, or profile on that GPU with --device cuda"
        )
    if kind == "cuda":
        have = device_name(device)
        words = [w for w in ("A100", "H100", "H200", "V100", "L40", "B200") if w in cluster.device.name.upper()]
        if not gpu_cluster or (words and not any(w in have.upper() for w in words)):
            raise ProfileError(
                f"--device {device} is a {have}, but --cluster {cluster.name} has {cluster.device.name} devices; "
                "give the cluster of the GPU measured"
            )


def cpu_threads_for(cluster: "Cluster") -> int:
    """Threads one process of a ``local-cpu`` cluster gets: this machine's CPUs shared among its ranks."""
    from .cluster import available_cpus

    return max(1, available_cpus() // max(1, cluster.devices_per_node))


@dataclass(frozen=True)
class Profiled:
    """A profiling run turned into the planner's cost model."""

    result: ProfileResult
    calibration: "Calibration"
    cost_model: MeasuredCostModel  # measured nodes, calibrated model for the rest


def profile_for_planning(
    pgraph: PartitionGraph,
    cluster: "Cluster",
    cache: ProfileCache,
    options: ProfileOptions,
) -> Profiled:
    """Measure ``pgraph`` (reading the cache), fit the calibrated model, and build the measured cost model.

    On a ``local-cpu`` cluster the measurement runs with the thread count one
    rank of that cluster gets, so that the costs describe the ranks that will run.
    """
    from cost_models import AnalyticCostModel, CalibratedCostModel

    check_device(cluster, options.device)
    threads = torch.get_num_threads()
    if torch.device(options.device).type == "cpu":
        torch.set_num_threads(cpu_threads_for(cluster))
    try:
        result = profile_model(pgraph, cache, options)
        calib = calibration(cache, result.device, result.torch_version)
    finally:
        torch.set_num_threads(threads)
    base = CalibratedCostModel(AnalyticCostModel(cluster), calib)
    return Profiled(result, calib, result.cost_model(base))


@dataclass(frozen=True, slots=True)
class BlockFidelity:
    """One block type: predicted and measured times for one micro-batch of the capture batch."""

    block: str  # the first block of its type
    count: int  # blocks of this type
    measured: tuple[float, float]  # (forward, backward) seconds
    analytic: tuple[float, float]  # the datasheet roofline
    calibrated: tuple[float, float]  # the fitted op model (sum of its nodes)
    spread: float  # the measurement's relative interquartile range, forward

    @staticmethod
    def error(pred: float, meas: float) -> float:
        return (pred - meas) / meas if meas > 0 else 0.0


def fidelity(pgraph: PartitionGraph, result: ProfileResult, cluster: "Cluster", calib: "Calibration",
             dtype: str) -> list[BlockFidelity]:
    """Per block type: analytic and calibrated predictions next to the measurement."""
    from cost_models import AnalyticCostModel, CalibratedCostModel

    from .evaluate import Evaluator
    from .plan import Training

    training = Training(global_batch=pgraph.captured.batch_size, dtype=dtype)
    analytic = Evaluator(pgraph, cluster, AnalyticCostModel(cluster), training)
    calibrated = Evaluator(pgraph, cluster, CalibratedCostModel(AnalyticCostModel(cluster), calib), training)
    mb = pgraph.captured.batch_size
    rows: dict[str, list] = {}
    for block in pgraph.blocks:
        m = result.blocks.get(block.name)
        if m is None:
            continue
        key = json.dumps([block.signature, m.forward.median_s])
        if key in rows:
            rows[key][1] += 1
            continue
        a = analytic.block_cost(block, mb, 1, {}).compute
        c = calibrated.block_cost(block, mb, 1, {}).compute
        rows[key] = [block.name, 1, (m.forward.median_s, m.backward.median_s), (a.forward_s, a.backward_s),
                     (c.forward_s, c.backward_s), m.forward.spread]
    return [BlockFidelity(*r) for r in rows.values()]
