"""The profiler's values: timings, measurements, options and results."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from cost_models import MeasuredLoss, MeasuredOp, NodeRef

from ..errors import AutopartError


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
    # A block's backward as torch's zero-bubble schedules split it, input half (I) then weight half (W);
    # None where not measured (a node; a block none of whose inputs needs a gradient; an older cache row):
    # [Note: the split backward per block] in profile/__init__.py
    backward_input: Timing | None = None
    backward_weight: Timing | None = None

    def to_dict(self) -> dict[str, Any]:
        def timing(t: Timing) -> list[float]:
            return [t.median_s, t.spread, t.reps]

        split = {} if self.backward_input is None or self.backward_weight is None else {
            "backward_input": timing(self.backward_input), "backward_weight": timing(self.backward_weight),
        }
        return split | {
            "op": self.op, "strategy": self.strategy, "tp": self.tp,
            "forward": timing(self.forward), "backward": timing(self.backward),
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
        split = ("backward_input", "backward_weight")
        if any(k in d for k in split) and not all(k in d for k in split):
            raise ValueError("half of a split backward")
        i, w = (timing(d[k]) if k in d else None for k in split)
        return cls(d["op"], d["strategy"], tp, fwd, timing(d["backward"]), f, b, moved, act, params, i, w)

    def measured_op(self) -> MeasuredOp:
        return MeasuredOp(self.forward.median_s, self.backward.median_s, self.forward_flops, self.backward_flops,
                          self.bytes_moved, self.param_bytes)


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
    loss: MeasuredLoss | None = None  # the training loss on the outputs ([Note: the loss's time] in cost_models/profiled.py)

    def measured_ops(self) -> dict[NodeRef, MeasuredOp]:
        """The measurements as the cost model takes them: in-block times where the block was measured."""
        return {ref: self.in_block.get(ref) or m.measured_op() for ref, m in self.nodes.items()}


def device_name(device: str) -> str:
    """What measurements are filed under: the device model (and, on CPU, the thread count)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(f"--device {device}: this machine has no CUDA GPU; profile on cpu or on a GPU machine")
        return torch.cuda.get_device_name(dev)
    if dev.type != "cpu":
        raise ProfileError(f"--device {device}: profiling runs on cpu or cuda")
    from ..cluster import cpu_model

    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'' if threads == 1 else 's'})"


