"""The values of a comparison: cases, rows, measurements and results, and their statistics."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ..baselines import METHODS as BASELINES
from ..baselines import REFERENCE
from ..errors import AutopartError


DEFAULT_METHODS = ("ilp", *BASELINES)  # the ILP and every baseline
GIB = 1 << 30


class CompareError(AutopartError):
    """A comparison cannot be set up or written (bad method list, output in the way, no runtime)."""


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One model on one cluster under one training set-up. Fields mean what ``autopart plan``'s options do."""

    model: str = "gpt2"  # zoo name, hf:ClassName or py:module:function
    cluster: str = "dgx-a100-80g"  # preset name, TOML file, or local-cpu[:N]
    nodes: int | None = None  # overrides the cluster's node count
    gpus_per_node: int | None = None  # overrides the cluster's devices per node
    config: tuple[str, ...] = ()  # model config overrides, KEY=VALUE
    seq_len: int | None = None  # sequence length (default: the model's)
    vocab_chunks: int = 1  # the head's vocabulary in this many blocks, for every method (vocab_split.py)
    dtype: str | None = None  # compute dtype (default bf16, or the device's own, fp32 on a CPU)
    global_batch: int | None = None  # samples per step (default 8 per device)
    mesh: str | None = None  # pinned mesh axes for every method, e.g. "pp=2"
    microbatches: int | None = None  # pinned micro-batches per replica
    schedule: str | None = None  # pinned schedule
    virtual_stages: int | None = None  # pinned stages per rank (interleaved)
    recompute: bool | None = None  # pinned activation recomputation
    optimizer: str | None = None  # adam-mixed | adam | sgd (default adam-mixed)
    zero1: bool = False  # shard optimizer state over data-parallel ranks
    memory_reserve: float | None = None  # fraction of device memory kept free (default 0.1)
    time_limit: float | None = None  # seconds the ILP may search (default 30)
    label: str | None = None  # the name reports use; default "MODEL on CLUSTER"

    def __post_init__(self) -> None:
        if isinstance(self.config, str):
            object.__setattr__(self, "config", tuple(self.config.split()))
        else:
            object.__setattr__(self, "config", tuple(self.config))
        for name in ("nodes", "gpus_per_node", "seq_len", "global_batch", "microbatches", "virtual_stages"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CompareError(f"case {self.title}: {name} = {value!r} must be an integer >= 1")
        if not isinstance(self.vocab_chunks, int) or isinstance(self.vocab_chunks, bool) or self.vocab_chunks < 1:
            raise CompareError(f"case {self.title}: vocab_chunks = {self.vocab_chunks!r} must be an integer >= 1")
        if self.time_limit is not None and not (self.time_limit > 0 and math.isfinite(self.time_limit)):
            raise CompareError(f"case {self.title}: time_limit = {self.time_limit!r} must be a number of seconds > 0")

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        nodes = f" x{self.nodes}" if self.nodes else ""
        return f"{self.model} on {self.cluster}{nodes}"

    @property
    def slug(self) -> str:
        """The case's name in file names."""
        keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.title.replace(" on ", "_"))
        return "-".join(filter(None, keep.split("-"))).lower()


@dataclass(frozen=True, slots=True)
class MeasureSettings:
    """How plans are run for real (see [Note: the runtime contract])."""

    steps: int = 5  # measured steps; the report shows their median
    warmup: int = 2  # steps run first and not measured
    max_world_size: int = 8  # more processes than this are too many for this machine
    timeout_s: float = 600.0  # one run's wall-clock limit
    memory_fraction: float = 0.8  # share of this machine's memory all ranks together may use

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise CompareError(f"steps = {self.steps} must be >= 1 and warmup = {self.warmup} >= 0")


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """Price every method with costs measured on this machine (``autopart plan --profile``'s options)."""

    device: str = "cpu"  # where to measure: cpu, or cuda on a GPU machine
    cache: str | None = None  # profile cache file (default $AUTOPART_CACHE or ~/.cache/autopart/profile.sqlite)
    budget_s: float | None = None  # stop measuring after this long; the calibrated model prices the rest
    sizes: int | None = None  # micro-batch sizes to measure at, the capture batch's among them (None: the default)


@dataclass(frozen=True, slots=True)
class MeasuredEvent:
    """One forward or backward as the runtime timed it (seconds from the earliest reported start)."""

    rank: int
    stage: int
    kind: str  # "F" or "B"
    microbatch: int
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class Measurement:
    """The outcome of running one plan for real."""

    status: str  # "measured" | "skipped" (too large or too slow to run here) | "failed"
    reason: str = ""  # why skipped or failed, one line
    step_times_s: tuple[float, ...] = ()  # the warm steps
    events: tuple[MeasuredEvent, ...] = ()
    log: str | None = None  # the run's output, a path

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.step_times_s) if self.step_times_s else None


@dataclass(frozen=True)
class Row:
    """One method's outcome in a case: a plan, or why there is none."""

    method: str
    plan: Any = None  # Plan | None
    sim: Any = None  # SimResult | None (not written to JSON)
    error: str | None = None  # why the method has no plan
    same_as: str | None = None  # an earlier method of this case produced exactly this plan
    measured: Measurement | None = None

    @property
    def ok(self) -> bool:
        return self.plan is not None

    @property
    def step_s(self) -> float | None:
        return self.plan.predicted.step_time_s if self.plan is not None else None

    def error_vs_measured(self) -> float | None:
        """(predicted - measured) / measured, or None if not measured."""
        m = self.measured.median_s if self.measured else None
        return (self.step_s - m) / m if m and self.step_s is not None else None


@dataclass(frozen=True)
class CaseResult:
    """All rows of one case."""

    case: Case
    cluster: str  # Cluster.describe()
    params: int  # the model's trainable parameters
    rows: tuple[Row, ...]
    capture_s: float  # capture and block building (shared by every method)
    wall_s: float  # the whole case, planning and measuring
    costs: str = "analytic"  # what priced the plans: "analytic", or "profiled on DEVICE (...)"

    def row(self, method: str) -> Row | None:
        return next((r for r in self.rows if r.method == method), None)

    def speedup(self, row: Row, over: str = REFERENCE) -> float | None:
        """How many times faster ``row``'s plan is than ``over``'s; None unless both exist and fit."""
        base = self.row(over)
        if base is None or not _fits(base) or not _fits(row):
            return None
        return base.step_s / row.step_s

    def unique_rows(self) -> list[Row]:
        """Rows with a plan, one per distinct plan."""
        return [r for r in self.rows if r.ok and r.same_as is None]


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` or the standing matrix produced, with what is needed to reproduce it."""

    cases: tuple[CaseResult, ...]
    command: str  # the exact command line
    machine: Mapping[str, str]
    measured: bool  # whether measurement was asked for
    wall_s: float

    def measured_points(self) -> list[tuple[CaseResult, Row]]:
        return [
            (c, r) for c in self.cases for r in c.unique_rows()
            if r.measured is not None and r.measured.median_s is not None
        ]

    def spearman(self) -> float | None:
        """Rank correlation of predicted and measured step time over all measured plans."""
        pts = self.measured_points()
        return spearman([r.step_s for _, r in pts], [r.measured.median_s for _, r in pts])

    def spearman_by_case(self) -> dict[str, float | None]:
        """The same within each case: does the simulator order one case's plans as the runs do?

        Pooled over cases of different models, the correlation is helped by the models' sizes
        alone (a bigger model is slower in both); within a case only the plans differ.
        """
        out: dict[str, float | None] = {}
        for c in self.cases:
            pts = [(r.step_s, r.measured.median_s) for cc, r in self.measured_points() if cc is c]
            if pts:
                out[c.case.title] = spearman([x for x, _ in pts], [y for _, y in pts]) if len(pts) > 1 else None
        return out


def _fits(row: Row) -> bool:
    return row.plan is not None and bool(row.plan.predicted.fits)


@dataclass(frozen=True, slots=True)
class IlpWins:
    """How often the ILP's own solve beat the best seed (the baselines' plans it starts from), and by how much."""

    cases: int  # cases with a fitting ILP plan whose origin is recorded
    wins: int  # of those, cases where the plan came from the ILP's own solve
    gain_geomean: float | None  # best seed's step time / the ILP's, geometric mean over the wins
    gain_max: float | None
    own_speedup_geomean: float | None  # over the reference, counting a seed's plan as no gain (ratio 1 to the seed)


def ilp_wins(cases: Sequence[CaseResult]) -> IlpWins:
    """``IlpWins`` over ``cases``: only plans with ``solver.origin == "ilp"`` count as the solver's.

    The own speedup of a case is ``reference / ILP`` where the solve won, and ``reference / best
    seed`` capped at 1 where it did not (a seed that beats the reference is another baseline's
    win, not the solver's).
    """
    n = wins = 0
    gains, own = [], []
    for c in cases:
        row = c.row("ilp")
        if row is None or not _fits(row) or row.plan.solver.origin is None:
            continue
        n += 1
        ref = c.row(REFERENCE)
        ref_s = ref.step_s if ref is not None and _fits(ref) else None
        solver = row.plan.solver
        if solver.origin == "ilp":
            wins += 1
            if solver.seed_step_s:
                gains.append(solver.seed_step_s / row.step_s)
            if ref_s:
                own.append(ref_s / row.step_s)
        elif ref_s:
            own.append(min(1.0, ref_s / row.step_s))
    return IlpWins(n, wins, geomean(gains), max(gains, default=None), geomean(own))


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (``scipy.stats.spearmanr``; ties get average ranks); None with
    fewer than two points or no spread."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs paired values, got {len(xs)} and {len(ys)}")
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def geomean(values: Iterable[float | None]) -> float | None:
    """Geometric mean (``statistics.geometric_mean``) of the values that are not None; None if none."""
    vals = [v for v in values if v is not None]
    return statistics.geometric_mean(vals) if vals else None


def load_case_cluster(case: Case):
    from ..cluster import load_cluster

    return load_cluster(case.cluster, nodes=case.nodes, devices_per_node=case.gpus_per_node)
