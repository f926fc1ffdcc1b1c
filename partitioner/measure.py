"""Measure a training step: each rank's peak memory by category, and where its time goes.

Beside the runtime, in the run phase (capture -> ... -> Plan -> rewrite -> **run**):
``ParallelModel.step(track_memory=True)`` and ``step(record=True)`` call in here,
``autopart run --json`` writes what comes out (``RankMemory``, ``RankTime``), and
``autopart explain --measured`` (explain.py) sets it against the plan's predictions.

Glossary as in plan.py. Memory **categories**: parameters (the stages' weights
and buffers), gradients, optimizer (its state, fp32 masters included),
activations (tensors saved for backward), temporaries (everything else
allocated in the step). Time **components** per rank: forward and backward
compute (recomputation included), tensor-parallel collectives, exposed
data-parallel reduction, the optimizer step, other synchronization (tied
weights' sums), and waiting (the rest of the step: point-to-point transfers,
the pipeline bubble and the wait for the slowest rank in the loss's
all-reduce, which the runtime cannot tell apart).

[Note: why not MemTracker]
``torch.distributed._tools.mem_tracker.MemTracker`` is torch's tracker and the
first choice (docs/STYLE: a well-kept library first). In torch 2.13 it refuses
a module called twice in one iteration ("does not support memory tracking for
multiple iterative calls"), which is every pipeline stage with more than one
micro-batch. ``StorageMeter`` is the same mechanism cut to what we need: a
``TorchDispatchMode`` that sees every tensor an op returns, counts each
storage once while it lives (a weakref callback on the storage), and keeps the
live total's peak. Categories come from what the storage turns out to be at
the end of the step (a parameter, gradient or optimizer state of this rank),
and from autograd's saved-tensor hook (an activation); the rest are
temporaries. Storages that exist before the step (weights, masters, DDP's
gradient buckets) are counted as live until they die (gradients that a
``zero_grad`` inside the metered step drops; those alive at the peak count
there). Ops inside DTensor's own
dispatch (the local shards' collectives) run below the mode and are not
seen, so a tensor-parallel rank's temporaries are a lower bound. On CUDA the
peak is ``torch.cuda.max_memory_allocated``; the categories still come from
the meter.

[Note: measured time components]
``record=True`` times every stage's forward and backward (``StepEvent``), the
gradient finishing and DDP's reduction (a communication hook notes when each
bucket is launched and done: the reduction still running after the last
launch is exposed and is taken out of that backward), the optimizer step and
the tied weights' sums. The loss's all-reduce at the end of the step is not
timed apart: a rank that finished early waits there for the slowest, which
the simulator counts as bubble, so it is left in the waiting. With ``tp > 1``, ``torch.profiler`` records the
step's functional collectives (``_c10d_functional::*``, launch and wait),
which are taken out of the forward or backward they fall in. What is left of
the step's wall time is waiting.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "MEMORY_CATEGORIES",
    "TIME_COMPONENTS",
    "MemoryByCategory",
    "RankMemory",
    "StageTime",
    "RankTime",
    "StorageMeter",
    "StepClock",
    "DdpTimer",
    "tp_profile",
    "rank_time",
]

MEMORY_CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
TIME_COMPONENTS = ("forward", "backward", "tp_comm", "dp_reduce", "optimizer", "other", "wait")
# The functional collectives DTensor issues (launch and wait); their time is tensor-parallel communication.
TP_COLLECTIVE_PREFIX = "_c10d_functional"


@dataclass(frozen=True, slots=True)
class MemoryByCategory:
    """Bytes by category (MEMORY_CATEGORIES) on one rank."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.temporaries

    @property
    def static(self) -> int:
        """Parameters, gradients and optimizer state: what the memory model calls static."""
        return self.parameters + self.gradients + self.optimizer


@dataclass(frozen=True, slots=True)
class RankMemory:
    """One rank's measured memory over one training step, and the plan's prediction for it."""

    rank: int
    stages: tuple[int, ...]  # the plan stages this rank holds
    source: str  # where peak_bytes comes from: "dispatch" (StorageMeter, CPU) or "cuda.max_memory_allocated"
    peak_bytes: int  # the step's peak of live tensor bytes on the rank
    at_peak: MemoryByCategory  # the live bytes at that peak, by category ([Note: why not MemTracker])
    resident: MemoryByCategory  # parameters, gradients and optimizer state held after the step (exact)
    predicted_static_bytes: int  # the plan: its stages' static_bytes (recompute workspace included)
    predicted_activation_bytes: int  # the plan: the rank's peak activation bytes
    predicted_peak_bytes: int  # the plan: the rank's peak memory


@dataclass(frozen=True, slots=True)
class StageTime:
    """One stage's measured compute over one step (all its micro-batches), seconds."""

    stage: int
    forward_s: float  # forward compute, tensor-parallel collectives taken out
    backward_s: float  # backward compute (recomputation included), collectives and exposed dp reduction out
    tp_comm_s: float  # tensor-parallel collectives inside its forward and backward
    dp_reduce_s: float  # DDP's reduction still running after the stage's last gradient bucket was launched


@dataclass(frozen=True, slots=True)
class RankTime:
    """One rank's measured step, by component ([Note: measured time components]), seconds."""

    rank: int
    step_s: float  # the step's wall time on this rank
    stages: tuple[StageTime, ...]
    finish_s: float  # gradients' mean over micro-batches (and the dp all-reduce where DDP does not run)
    optimizer_s: float  # the optimizer step (masters' copy and loss-scaler included)
    other_s: float  # tied weights' sums
    wait_s: float  # the rest: waiting on point-to-point transfers, the pipeline bubble and the slowest rank

    @classmethod
    def mean(cls, steps: Sequence["RankTime"]) -> "RankTime":
        """The field-wise mean of one rank's records of several steps (the same rank and stages): one
        step's components are noisy on a shared machine, their mean is what ``explain --measured``
        sets against the prediction."""
        if not steps:
            raise ValueError("RankTime.mean of no steps")
        n = len(steps)

        def avg(xs: Iterable[float]) -> float:
            return sum(xs) / n

        def mean_of(kind: type, records: Sequence[Any], keep: str, **given: Any) -> Any:  # every field but keep's
            return kind(**{f.name: getattr(records[0], f.name) if f.name == keep else avg(getattr(r, f.name) for r in records)
                           for f in fields(kind) if f.name not in given}, **given)

        stages = tuple(mean_of(StageTime, [t.stages[i] for t in steps], "stage") for i in range(len(steps[0].stages)))
        return mean_of(cls, steps, "rank", stages=stages)

    def components(self) -> dict[str, float]:
        """Seconds by TIME_COMPONENTS; they add up to ``step_s``."""
        return dict(
            forward=sum(s.forward_s for s in self.stages),
            backward=sum(s.backward_s for s in self.stages),
            tp_comm=sum(s.tp_comm_s for s in self.stages),
            dp_reduce=sum(s.dp_reduce_s for s in self.stages) + self.finish_s,
            optimizer=self.optimizer_s,
            other=self.other_s,
            wait=self.wait_s,
        )


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _storage(t: Any) -> Any:
    """The untyped storage behind ``t`` (a DTensor's local shard's), or None for a non-tensor or meta tensor."""
    if not isinstance(t, torch.Tensor):
        return None
    t = _local(t)
    if t.is_meta or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, functional wrapper)
        return None


def _storages(tensors: Iterable[Any]) -> dict[int, int]:
    """``{id(storage): nbytes}`` of ``tensors``, each storage once."""
    out: dict[int, int] = {}
    for t in tensors:
        st = _storage(t)
        if st is not None:
            out[id(st)] = st.nbytes()
    return out


@dataclass(frozen=True, slots=True)
class _Static:
    """This rank's parameters, gradients and optimizer state, as storages by category."""

    parameters: dict[int, int] = field(default_factory=dict)
    gradients: dict[int, int] = field(default_factory=dict)
    optimizer: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, modules: Sequence[torch.nn.Module], optimizer: Any) -> "_Static":
        params = [p for m in modules for p in m.parameters()]
        buffers = [b for m in modules for b in m.buffers()]
        state = _optimizer_tensors(optimizer)
        out = cls(_storages([*params, *buffers]), _storages(p.grad for p in params if p.grad is not None),
                  _storages(state))
        for key in out.parameters:  # a tensor both weight and state (none today): count it as a weight
            out.optimizer.pop(key, None)
        return out

    def category(self, key: int) -> str | None:
        for name in ("parameters", "gradients", "optimizer"):
            if key in getattr(self, name):
                return name
        return None


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (this rank's share under ZeRO-1) and its fp32 masters."""
    out: list[torch.Tensor] = list(getattr(optimizer, "masters", []))
    inner = getattr(optimizer, "inner", optimizer)
    inner = getattr(inner, "optim", inner)  # ZeroRedundancyOptimizer's local optimizer
    for state in getattr(inner, "state", {}).values():
        out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out


class StorageMeter(TorchDispatchMode):
    """Peak live tensor bytes of one step, by category ([Note: why not MemTracker]).

    Use as ``with StorageMeter(modules, optimizer) as meter: <step>``, then
    ``meter.result(modules, optimizer)``. ``modules`` are the rank's stage
    modules (unwrapped), ``optimizer`` the rank's optimizer.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], optimizer: Any) -> None:
        super().__init__()
        self._before = _Static.of(modules, optimizer)
        self._before_keys = {**self._before.parameters, **self._before.gradients, **self._before.optimizer}
        # A storage from before the step may die in it (gradients dropped by ``zero_grad`` inside the
        # step): its id then leaves ``_before_keys``, or a new storage that reuses the id would go uncounted.
        self._before_refs: dict[int, weakref.ref] = {}
        for t in (p for m in modules for p in (*m.parameters(), *m.buffers())):
            for st in (_storage(t), _storage(t.grad)):
                self._watch_before(st)
        for t in _optimizer_tensors(optimizer):
            self._watch_before(_storage(t))
        self._before_at_peak = dict(self._before_keys)  # those alive at the peak (all, until a peak is seen)
        self._before_dead = 0  # how many have died: the snapshot at a peak is retaken only when it moved
        self._before_dead_at_peak = 0
        # id(storage) -> [serial, nbytes, saved for backward], for storages first seen in the step and alive.
        # The serial tells a storage from a later one that reuses its id.
        self._live: dict[int, list[Any]] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._serial = 0
        self._live_bytes = 0
        self._peak = 0
        self._at_peak: dict[int, tuple[int, int, bool]] = {}
        self._peak_ops: dict[int, tuple[Any, tuple[int, ...]]] = {}
        self._hooks: Any = None

    # --- the dispatcher side ---

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outputs:
            # A view or an in-place result shares an input's storage: not an allocation. (A storage made
            # before the step and first seen so is counted only if it ends up static: see result().)
            inputs = {id(st) for t in tree_flatten((args, kwargs))[0] if (st := _storage(t)) is not None}
            for t in outputs:
                st = _storage(t)
                if st is not None and (id(st) not in inputs or id(st) in self._live):
                    self._see(t, func)
        return out

    def _see(self, t: Any, func: Any = None) -> list[Any] | None:
        st = _storage(t)
        if st is None:
            return None
        key = id(st)
        entry = self._live.get(key)
        if entry is not None or key in self._before_keys:
            return entry
        try:
            self._refs[key] = weakref.ref(st, lambda _, key=key: self._free(key))
        except TypeError:  # not weak-referenceable: cannot tell when it dies, so it is not counted
            return None
        self._serial += 1
        # The op that made it, and its shape: what ``peak_tensors`` names.
        entry = self._live[key] = [self._serial, st.nbytes(), False, func, tuple(_local(t).shape)]
        self._live_bytes += entry[1]
        if self._live_bytes > self._peak:
            self._peak = self._live_bytes
            self._at_peak = {k: (e[0], e[1], e[2]) for k, e in self._live.items()}
            if self._before_dead != self._before_dead_at_peak:
                self._before_at_peak, self._before_dead_at_peak = dict(self._before_keys), self._before_dead
            self._peak_ops = {k: (e[3], e[4]) for k, e in self._live.items()}
        return entry

    def _watch_before(self, st: Any) -> None:
        key = id(st) if st is not None else None
        if key in self._before_keys and key not in self._before_refs:
            try:
                self._before_refs[key] = weakref.ref(st, lambda _, key=key: self._before_died(key))
            except TypeError:  # not weak-referenceable: kept as always live
                pass

    def _before_died(self, key: int) -> None:
        self._before_keys.pop(key, None)
        self._before_refs.pop(key, None)
        self._before_dead += 1

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        self._refs.pop(key, None)
        if entry is not None:
            self._live_bytes -= entry[1]

    # [Note: the meter's saved-tensor hook]
    # The hook marks what autograd saves, and hands autograd a detached alias (the same storage), not
    # ``t`` itself. Given ``t``, an op's output saved by its own backward node (log-softmax's) holds that
    # node through the tensor: a cycle through autograd's C++ that nothing frees while the node's saved
    # tensors are kept for a second backward, as a split backward's I keeps them (retain_graph=True).
    # The meter then kept, and counted, what training frees: under ``zb``, GPT-2's 50,257-row head on the
    # last of two ranks read 8 micro-batches' log-softmax outputs (98 MiB) at its peak, and 12.5 MiB with
    # the alias, the peak 245.9 -> 160.0 MiB (tests/test_measure.py).
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        entry = self._see(t)
        if entry is not None:
            entry[2] = True
        return t.detach()  # [Note: the meter's saved-tensor hook]

    def __enter__(self) -> "StorageMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._hooks.__exit__(*exc)

    # --- the result ---

    @property
    def live_bytes(self) -> int:
        """Bytes of the storages first seen in the step and alive now (what the step holds beyond what
        existed before it); read inside the step, e.g. at the loss's call, the end of a forward."""
        return self._live_bytes

    def peak_tensors(self, limit: int = 20) -> list[tuple[str, tuple[int, ...], int, bool]]:
        """The largest storages first seen in the step and live at its peak: (the op that made it, or "?" for
        one first seen saved for backward; its shape; bytes; saved for backward), largest first. What
        attributes a measured peak to the memory model's terms (docs/solver.md, "Memory")."""
        rows = [(str(op) if op is not None else "?", shape, self._at_peak[k][1], self._at_peak[k][2])
                for k, (op, shape) in self._peak_ops.items() if k in self._at_peak]
        return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))[:limit]

    def result(self, modules: Sequence[torch.nn.Module], optimizer: Any) -> tuple[int, MemoryByCategory, MemoryByCategory]:
        """(peak bytes, live bytes at the peak by category, resident static bytes after the step)."""
        after = _Static.of(modules, optimizer)
        resident = MemoryByCategory(sum(after.parameters.values()), sum(after.gradients.values()),
                                    sum(after.optimizer.values()))
        sums = dict.fromkeys(MEMORY_CATEGORIES, 0)
        # Always live: what existed before the step and was still alive at the peak, and static storages the
        # step never allocated (DDP's gradient buckets: the gradients become views of them).
        for key, nbytes in self._before_at_peak.items():
            sums[after.category(key) or self._before.category(key) or "temporaries"] += nbytes
        for name in ("parameters", "gradients", "optimizer"):
            for key, nbytes in getattr(after, name).items():
                if (key not in self._before_at_peak and key not in self._before_keys and key not in self._refs
                        and key not in self._at_peak):
                    sums[name] += nbytes
        for key, (serial, nbytes, saved) in self._at_peak.items():
            alive = self._live.get(key)
            static = after.category(key) if alive is not None and alive[0] == serial else None
            sums[static or ("activations" if saved else "temporaries")] += nbytes
        at_peak = MemoryByCategory(**sums)
        return at_peak.total, at_peak, resident


# --------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------


class StepClock:
    """Seconds spent in named parts of one step: ``clock.lap("optimizer")`` after the optimizer step adds
    the time since the previous lap (``clock.lap()`` starts a lap without naming the one before)."""

    def __init__(self) -> None:
        self.spans: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str | None = None) -> None:
        now = time.perf_counter()
        if name is not None:
            self.spans[name] = self.spans.get(name, 0.0) + now - self._last
        self._last = now


class DdpTimer:
    """DDP communication hooks that note when each gradient bucket's all-reduce is launched and done.

    The hook is torch's default all-reduce (``allreduce_hook``: divide by the group's size, sum), so the
    gradients are those DDP computes without it; the times are noted only while ``enabled``."""

    def __init__(self) -> None:
        self.enabled = False
        self._registered = False
        self.launched: dict[int, list[float]] = {}
        self.done: dict[int, list[float]] = {}

    def register(self, ddp: Any, stage: int, group: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP refuses annotations other than its own
            t0 = time.perf_counter()
            fut = allreduce_hook(state, bucket)
            if not self.enabled:
                return fut
            self.launched.setdefault(stage, []).append(t0)

            def noted(f: Any) -> Any:
                self.done.setdefault(stage, []).append(time.perf_counter())
                return f.value()

            return fut.then(noted)

        ddp.register_comm_hook(group, hook)
        self._registered = True

    @property
    def registered(self) -> bool:
        """Whether any DDP module has the hook (the rank's gradients are DDP's bucket views)."""
        return self._registered

    def reset(self, enabled: bool) -> None:
        self.enabled = enabled
        self.launched, self.done = {}, {}

    def exposed_s(self, stage: int, until: float) -> float:
        """The stage's reduction still running after its last bucket was launched, up to ``until``."""
        launched, done = self.launched.get(stage), self.done.get(stage)
        if not launched or not done:
            return 0.0
        return max(0.0, min(until, max(done)) - max(launched))


@contextmanager
def tp_profile(enabled: bool) -> Iterator[list[tuple[float, float]]]:
    """Record the functional collectives of the block (``torch.profiler``); the yielded list is filled,
    on exit, with their (start, end) in ``time.perf_counter`` seconds, nested ones merged away."""
    intervals: list[tuple[float, float]] = []
    if not enabled:
        yield intervals
        return
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("autopart::origin"):
            origin = time.perf_counter()
        yield intervals
    events = prof.events()
    marker = next(e for e in events if e.name == "autopart::origin")
    offset = origin - marker.time_range.start * 1e-6
    spans = sorted(
        (e.time_range.start * 1e-6 + offset, e.time_range.end * 1e-6 + offset)
        for e in events
        if e.name.startswith(TP_COLLECTIVE_PREFIX) and e.thread == marker.thread
    )
    for start, end in spans:  # outermost only: a wrapper and the op it calls count once
        if intervals and start < intervals[-1][1]:
            intervals[-1] = (intervals[-1][0], max(end, intervals[-1][1]))
        else:
            intervals.append((start, end))


def rank_time(
    rank: int,
    stages: Sequence[int],
    events: Sequence[Any],
    origin: float,
    step_s: float,
    spans: Mapping[str, float],
    ddp: DdpTimer | None,
    tp_intervals: Sequence[tuple[float, float]],
) -> RankTime:
    """This rank's ``RankTime`` from its ``StepEvent`` records (times from ``origin``), the clock's spans
    ("finish", "optimizer", "other"), DDP's bucket times and the collectives' intervals (perf_counter)."""
    per: dict[int, dict[str, float]] = {s: dict(forward=0.0, backward=0.0, tp=0.0, dp=0.0) for s in stages}
    last_b: dict[int, Any] = {}
    for e in events:
        if e.rank != rank or e.stage not in per:
            continue
        start, end = e.start_s + origin, e.end_s + origin
        tp = sum(max(0.0, min(end, b) - max(start, a)) for a, b in tp_intervals)
        key = "forward" if e.kind == "F" else "backward"
        per[e.stage][key] += e.end_s - e.start_s - tp
        per[e.stage]["tp"] += tp
        if key == "backward" and (e.stage not in last_b or e.end_s > last_b[e.stage].end_s):
            last_b[e.stage] = e
    if ddp is not None:
        for s, e in last_b.items():
            exposed = min(ddp.exposed_s(s, e.end_s + origin), e.end_s - e.start_s)
            per[s]["dp"] = exposed
            per[s]["backward"] = max(0.0, per[s]["backward"] - exposed)
    stage_times = tuple(StageTime(s, v["forward"], v["backward"], v["tp"], v["dp"]) for s, v in per.items())
    finish, opt, other = (spans.get(k, 0.0) for k in ("finish", "optimizer", "other"))
    busy = sum(t.forward_s + t.backward_s + t.tp_comm_s + t.dp_reduce_s for t in stage_times) + finish + opt + other
    return RankTime(rank, step_s, stage_times, finish, opt, other, max(0.0, step_s - busy))
