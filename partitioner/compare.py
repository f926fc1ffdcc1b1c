"""Every planning method side by side on one model and cluster: the library behind ``autopart compare``.

This sits at the end of the flow (``Plan ─▶ simulate / explain / compare``). For one *case* it
captures the model once, builds one evaluator, and lets each *method* (the ILP and the baselines)
plan with it, so that the same simulator judges every plan. With ``measure=True`` it also runs each
plan for real under ``torchrun`` through ``autopart run`` and sets the median warm step time beside
the prediction; with ``profile`` every method is priced by the costs measured on this machine
(``autopart plan --profile``), so that the two can be compared. The results go to a table (``rich``), and with ``out`` to a markdown report with
pictures (``partitioner/plots.py``), the plans and the raw figures as JSON. The standing benchmark
matrix (``benchmarks/run_matrix.py``) runs many cases through the same functions.

Glossary (besides the project's): a **case** is one model on one cluster under one training set-up;
a **method** is a planner (``ilp``, ``expert``, ``uniform``, ``params``, ``pipedream``, ``megatron``);
a **row** is one method's outcome in one case: a plan, or the reason there is none; a **measurement**
is a real run of a row's plan on this machine. The **reference** is ``expert`` (a tuned Megatron-style
sweep, see partitioner/baselines.py): every speedup is against it. The ILP's plan records its
**origin** (``solver.origin``): ``ilp`` where its own solve beat every seed, else the seed's name;
``ilp_wins`` counts the former, and only those are the solver's own improvements.

[Note: why the library lives in partitioner/]
``autopart compare`` must work from an installed autopart, and the wheel ships only
``partitioner`` and ``cost_models``. Shipping ``benchmarks`` as a top-level package would claim a
generic name in site-packages, so the harness is here and ``benchmarks/`` keeps what is not
installed: the standing matrix, its runner and the recorded results.

[Note: the runtime contract]
``measure`` runs, for each plan, ``torchrun --standalone --nproc-per-node W -m partitioner.cli run
--plan PLAN --model NAME [--config k=v ...] --steps N --warmup W --json OUT``. Rank 0 writes
``{"plan", "world_size", "step_times_s": [...], "losses": [...], "events": [{"rank", "stage",
"kind": "F"|"B", "microbatch", "start_s", "end_s"}, ...]}``. ``step_times_s`` holds the ``N``
measured steps; if it holds ``N + W`` the first ``W`` (warm-up) are dropped. The events are drawn
as the measured timeline; if they cover several steps, the last occurrence of each action is used.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .baselines import METHODS as BASELINES
from .baselines import REFERENCE
from .cluster import default_dtype, tp_degrees
from .errors import AutopartError
from .fmt import fmt_bytes, fmt_time

__all__ = [
    "DEFAULT_METHODS",
    "CompareError",
    "Case",
    "MeasureSettings",
    "ProfileSettings",
    "MeasuredEvent",
    "Measurement",
    "Row",
    "CaseResult",
    "Comparison",
    "CaptureCache",
    "compare",
    "run_case",
    "spearman",
    "geomean",
    "IlpWins",
    "ilp_wins",
    "print_tables",
    "write_report",
    "check_out_dir",
]

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


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get average ranks); None with fewer than two points or no spread."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs paired values, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def geomean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------


class CaptureCache:
    """Captured models by (model, config, seq_len, dtype), so a matrix captures each model once.

    Passed in by the caller (no module-level cache): its lifetime is the caller's run.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[Any, Any, float]] = {}

    def get(self, case: Case, dtype: str) -> tuple[Any, Any, float]:
        """(LoadedModel, CapturedModel, seconds the capture took)."""
        key = (case.model, case.config, case.seq_len, dtype)
        if key not in self._entries:
            from .capture import capture
            from .zoo import load_model, parse_config_overrides

            t = time.perf_counter()
            loaded = load_model(case.model, seq_len=case.seq_len, dtype=dtype, config=parse_config_overrides(case.config))
            captured = capture(
                loaded.model, loaded.example_inputs, loaded.example_kwargs, name=loaded.name, batch_size=loaded.batch_size
            )
            self._entries[key] = (loaded, captured, time.perf_counter() - t)
        return self._entries[key]


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """``"ilp,uniform"`` or a sequence -> a checked tuple (order kept, duplicates dropped)."""
    from .planner import ALL_METHODS

    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    items = list(dict.fromkeys(m for m in items if m))
    if not items:
        raise CompareError("--methods is empty; give a comma-separated list such as ilp,uniform,megatron")
    allowed = [m for m in ALL_METHODS if m != "manual"]
    for m in items:
        if m not in allowed:
            import difflib

            near = difflib.get_close_matches(m, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise CompareError(f"--methods: {m!r} is not one of {', '.join(allowed)}{hint}")
    return tuple(items)


def _load_case_cluster(case: Case):
    from .cluster import load_cluster

    return load_cluster(case.cluster, nodes=case.nodes, devices_per_node=case.gpus_per_node)


def _plan_key(plan) -> tuple:
    """What makes two plans the same plan (not who made it or how long it took)."""
    return (
        plan.mesh, plan.schedule, tuple((s.modules, s.recompute) for s in plan.stages),
        tuple(sorted(plan.sharding.items())),
    )


def run_case(
    case: Case,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    measure: MeasureSettings | None = None,
    profile: ProfileSettings | None = None,
    workdir: str | Path | None = None,
    captures: CaptureCache | None = None,
    progress: Callable[[str], None] | None = None,
) -> CaseResult:
    """Plan ``case`` with each method, and with ``measure`` run each distinct plan on this machine.

    With ``profile`` every method is priced by the costs measured on this machine
    (``partitioner.profile.profile_for_planning``, as ``autopart plan --profile``), so that the
    predictions describe this machine and can be held against ``measure``'s runs.

    A method that finds no plan (or fails) becomes a row that says why. ``workdir`` receives the
    plans (``plans/``) and the runs' logs and JSON (``measure/``); without it a temporary directory
    is used and removed. Errors in the case itself (unknown model, cluster or dtype) raise.
    """
    from cost_models import AnalyticCostModel

    from .baselines import Pins, plan_baseline
    from .errors import PlanError
    from .evaluate import Evaluator
    from .graph import build_partition_graph
    from .plan import Mesh, Training

    say = progress or (lambda _msg: None)
    methods = parse_methods(methods)
    started = time.perf_counter()
    cluster = _load_case_cluster(case)
    dtype = case.dtype or default_dtype(cluster)
    if dtype not in cluster.device.peak_flops:
        raise PlanError(
            f"--dtype {dtype}: {cluster.device.name} has no {dtype} peak; it has {', '.join(cluster.device.peak_flops)}"
        )
    pins_mesh = Mesh.parse(case.mesh) if case.mesh else {}
    pins = Pins(
        pp=pins_mesh.get("pp"),
        tp=pins_mesh.get("tp"),
        dp=pins_mesh.get("dp"),
        microbatches=case.microbatches,
        schedule=case.schedule,
        virtual_stages=case.virtual_stages,
        recompute=case.recompute,
    )
    captures = captures or CaptureCache()
    say(f"{case.title}: capturing {case.model}")
    loaded, captured, capture_s = captures.get(case, dtype)
    t = time.perf_counter()
    training = Training(
        global_batch=case.global_batch or 8 * cluster.world_size,
        dtype=dtype,
        optimizer=case.optimizer or "adam-mixed",
        dp_sharding="zero1" if case.zero1 else "none",
        memory_reserve=0.1 if case.memory_reserve is None else case.memory_reserve,
    )
    pgraph = build_partition_graph(captured, loaded.model)
    capture_s += time.perf_counter() - t
    cost_model, costs = AnalyticCostModel(cluster), "analytic"
    if profile is not None:
        say(f"{case.title}: profiling {case.model} on {profile.device}")
        cost_model, costs = _profiled_costs(pgraph, cluster, dtype, pins.tp, profile)
    # One evaluator for every method (what ``planner.prepare`` builds): the same costs judge all plans.
    ev = Evaluator(pgraph, cluster, cost_model, training)

    rows: list[Row] = []
    seen: dict[tuple, str] = {}
    for method in methods:
        say(f"{case.title}: planning with {method}")
        try:
            if method == "ilp":
                from .solver import plan_ilp

                res = plan_ilp(ev, pins, case.time_limit or 30.0)
                plan, sim = res.plan, res.sim
            else:
                plan, sim = plan_baseline(method, ev, pins)
        except AutopartError as exc:
            rows.append(Row(method, error=f"no plan: {_one_line(exc)}"))
            continue
        except Exception as exc:  # a bug in one planner must not hide the others' results
            rows.append(Row(method, error=f"failed: internal error {type(exc).__name__}: {_one_line(exc)}"))
            continue
        key = _plan_key(plan)
        rows.append(Row(method, plan, sim, same_as=seen.get(key)))
        seen.setdefault(key, method)

    if measure is not None:
        rows = _measure_rows(case, cluster, captured, rows, measure, workdir, say)
    elif workdir is not None:
        _save_plans(case, rows, Path(workdir))
    return CaseResult(
        case=case, cluster=cluster.describe(), params=captured.param_count, rows=tuple(rows),
        capture_s=capture_s, wall_s=time.perf_counter() - started, costs=costs,
    )


def _profiled_costs(pgraph, cluster, dtype: str, tp_pin: int | None, settings: ProfileSettings) -> tuple[Any, str]:
    """The measured cost model of ``autopart plan --profile``, and a line saying what it measured."""
    from .profile import ProfileCache, ProfileOptions, profile_for_planning

    # No bar of its own: compare's progress line says "profiling" (one live display at a time).
    options = ProfileOptions(device=settings.device, dtype=dtype, tp_degrees=tp_degrees(cluster, tp_pin),
                             budget_s=settings.budget_s, progress=False)
    with ProfileCache(settings.cache) as cache:
        prof = profile_for_planning(pgraph, cluster, cache, options)
        path = cache.path
    st = prof.result.stats
    budget = f", {st.unmeasured} left to the calibrated model (budget)" if st.unmeasured else ""
    aside = f"; the unreadable cache file was moved to {cache.moved_aside}" if cache.moved_aside else ""
    return prof.cost_model, (
        f"profiled on {prof.result.device}: {st.measured} measured, {st.cached} from the cache{budget} "
        f"in {st.profiling_s:.1f} s (cache {path}){aside}"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _save_plans(case: Case, rows: Sequence[Row], workdir: Path) -> dict[str, Path]:
    plans = workdir / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    paths = {}
    for r in rows:
        if r.ok:
            path = plans / f"{case.slug}-{r.method}.json"
            r.plan.save(path)
            paths[r.method] = path
    return paths


# --------------------------------------------------------------------------------------
# Measuring (see [Note: the runtime contract])
# --------------------------------------------------------------------------------------


def check_measurable(cluster_spec: str, nodes: int | None = None, gpus_per_node: int | None = None) -> None:
    """Fail early (one line) if nothing in a case could be measured: no runtime, or a remote cluster."""
    from .cluster import LOCAL_CPU

    cluster = _load_case_cluster(Case(cluster=cluster_spec, nodes=nodes, gpus_per_node=gpus_per_node))
    if cluster.name != LOCAL_CPU:
        raise CompareError(
            f"--measure runs the plans on this machine, but --cluster {cluster_spec} is {cluster.name!r}; "
            "use --cluster local-cpu:N (N processes here), or drop --measure"
        )


def _measure_rows(case, cluster, captured, rows, settings, workdir, say) -> list[Row]:
    from .cluster import LOCAL_CPU, Cluster

    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="autopart-compare-") if owned else workdir)
    out: list[Row] = []
    try:
        paths = _save_plans(case, rows, workdir)
        logs = workdir / "measure"
        logs.mkdir(parents=True, exist_ok=True)
        machine = Cluster.local(1)  # this machine: all its CPUs and memory as one device
        done: dict[str, Measurement] = {}
        for r in rows:
            if not r.ok:
                out.append(r)
                continue
            if r.same_as is not None:  # the same plan was measured already
                out.append(replace(r, measured=done[r.same_as]))
                continue
            if cluster.name != LOCAL_CPU:
                m = Measurement("skipped", f"{cluster.name} is not this machine; plan for local-cpu:N to measure")
            else:
                m = _too_large(r.plan, captured, settings, machine) or _run_plan(
                    case, r.method, paths[r.method], settings, logs, say
                )
            done[r.method] = m
            out.append(replace(r, measured=m))
        return out
    finally:
        # A temporary folder goes, unless a failed run's log in it is named in the table.
        if owned and not any(r.measured is not None and r.measured.status == "failed" for r in out):
            shutil.rmtree(workdir, ignore_errors=True)


def _too_large(plan, captured, settings: MeasureSettings, machine) -> Measurement | None:
    """A skip saying plainly why this plan cannot run here, or None if it can."""
    world = plan.mesh.world_size
    cpus = os.cpu_count() or 1
    if world > settings.max_world_size:
        return Measurement(
            "skipped", f"too large to measure here: {world} processes, this machine runs at most "
            f"{settings.max_world_size} ({cpus} CPUs)"
        )
    pred = plan.predicted
    if not pred.fits:
        return Measurement(
            "skipped", f"too large to measure here: needs {pred.peak_memory_bytes / GIB:.2f} GiB per process, "
            f"{pred.memory_limit_bytes / GIB:.2f} GiB allowed"
        )
    # Each rank may build the whole model before keeping its stage, so count the full weights per rank.
    weights = sum(p.bytes for p in captured.params.values())
    need = world * (weights + pred.peak_memory_bytes)
    have = machine.device.memory_bytes * settings.memory_fraction
    if need > have:
        return Measurement(
            "skipped", f"too large to measure here: about {need / GIB:.1f} GiB for {world} processes, "
            f"this machine has {machine.device.memory_bytes / GIB:.1f} GiB"
        )
    expected = pred.step_time_s * (settings.steps + settings.warmup)
    if expected > settings.timeout_s / 2:
        return Measurement(
            "skipped", f"too slow to measure here: predicted {pred.step_time_s:.1f} s per step, "
            f"{expected:.0f} s for {settings.steps + settings.warmup} steps (limit {settings.timeout_s:.0f} s)"
        )
    return None


def runtime_command(case: Case, plan_path: Path, world_size: int, settings: MeasureSettings, json_out: Path) -> list[str]:
    """The torchrun command line of [Note: the runtime contract] (``python -m torch.distributed.run`` is torchrun)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
        "-m", "partitioner.cli", "run", "--plan", str(plan_path), "--model", case.model,
    ]
    if case.config:
        cmd += ["--config", *case.config]
    if case.seq_len:  # a shared model option; only passed when the case sets it
        cmd += ["--seq-len", str(case.seq_len)]
    cmd += ["--steps", str(settings.steps), "--warmup", str(settings.warmup), "--json", str(json_out)]
    return cmd


def _run_plan(case: Case, method: str, plan_path: Path, settings: MeasureSettings, logs: Path, say) -> Measurement:
    from .plan import Plan

    plan = Plan.load(plan_path)
    world = plan.mesh.world_size
    json_out = logs / f"{case.slug}-{method}.json"
    log_path = logs / f"{case.slug}-{method}.log"
    cmd = runtime_command(case, plan_path, world, settings, json_out)
    env = dict(os.environ)
    # The workers must run this autopart, whatever is installed: put its root first on the path.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    say(f"{case.title}: running the {method} plan on {world} process{'es' if world > 1 else ''}")
    json_out.unlink(missing_ok=True)  # a stale result must not pass for this run's
    started = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # Its own session, so that on a timeout the whole group (torchrun and its workers) is ended by id.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return Measurement("failed", f"the run took longer than {settings.timeout_s:.0f} s; see {log_path}", log=str(log_path))
        except BaseException:
            _end_group(proc)
            raise
    if rc != 0:
        # Rank 0 writes the JSON whole (write, then rename) after the last step; a run that exits
        # badly after that (while shutting down) was still measured, and the row says how it ended.
        if json_out.exists() and json_out.stat().st_mtime >= started:
            try:
                m = _read_run_json(json_out, settings, log_path)
                return replace(m, reason=f"the run exited {rc} after writing its results; see {log_path}")
            except CompareError:
                pass
        last = _last_line(log_path)
        return Measurement("failed", f"the run exited {rc}: {last} (log {log_path})", log=str(log_path))
    try:
        return _read_run_json(json_out, settings, log_path)
    except CompareError as exc:
        return Measurement("failed", str(exc), log=str(log_path))


def _end_group(proc: subprocess.Popen) -> None:
    """End the process group this module started (torchrun and its workers), by its id."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    """The line that says why a run failed: a rank's ``autopart: ...`` error, else the last line.

    torchrun ends a failed job with its own banner of ``=`` lines, which says nothing."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("autopart: ")]
    if ours:
        return ours[0][:300]
    plain = [ln for ln in lines if ln.strip("=-") and not ln.startswith(("[", "W1", "E1", "I1"))]
    return (plain or lines or ["(no output)"])[-1][:300]


def _read_run_json(path: Path, settings: MeasureSettings, log_path: Path) -> Measurement:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"the run wrote no {path.name}; see {log_path}") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path} is not valid JSON ({exc.msg}); see {log_path}") from None
    times = data.get("step_times_s") if isinstance(data, dict) else None
    if not isinstance(times, list) or not times or not all(isinstance(t, (int, float)) for t in times):
        raise CompareError(f"{path}: step_times_s must be a non-empty list of seconds; see {log_path}")
    if len(times) == settings.steps + settings.warmup and settings.warmup:
        times = times[settings.warmup:]
    events = []
    for e in data.get("events") or []:
        try:
            events.append(MeasuredEvent(
                int(e["rank"]), int(e["stage"]), str(e["kind"]), int(e["microbatch"]), float(e["start_s"]), float(e["end_s"])
            ))
        except (KeyError, TypeError, ValueError):
            raise CompareError(f"{path}: an event lacks rank, stage, kind, microbatch, start_s or end_s: {e!r}") from None
    return Measurement("measured", step_times_s=tuple(float(t) for t in times), events=_last_step(events), log=str(log_path))


def _last_step(events: Sequence[MeasuredEvent]) -> tuple[MeasuredEvent, ...]:
    """The last occurrence of each (rank, stage, kind, micro-batch), timed from the earliest start."""
    last: dict[tuple, MeasuredEvent] = {}
    for e in events:
        key = (e.rank, e.stage, e.kind, e.microbatch)
        if key not in last or e.start_s >= last[key].start_s:
            last[key] = e
    if not last:
        return ()
    t0 = min(e.start_s for e in last.values())
    return tuple(
        sorted((replace(e, start_s=e.start_s - t0, end_s=e.end_s - t0) for e in last.values()), key=lambda e: (e.rank, e.start_s))
    )


# --------------------------------------------------------------------------------------
# The entry point behind `autopart compare`
# --------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """What the report records about where it ran."""
    import torch

    from .cluster import Cluster

    here = Cluster.local(1).device
    info = {
        "cpu": here.name,
        "cpus": str(os.cpu_count() or 1),
        "memory": f"{here.memory_bytes / GIB:.1f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(terse=True),
    }
    try:
        import ortools

        info["ortools"] = ortools.__version__
    except (ImportError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


def check_out_dir(out: str | Path, force: bool) -> Path:
    """``out`` as a directory to write into: refused if it holds anything, unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; give a directory (it is created if missing)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CompareError(f"--out {out} is not empty; pass --force to write into it (same-named files are replaced)")
    if not out.parent.exists():
        raise CompareError(f"--out {out}: directory {out.parent} does not exist")
    return out


def compare(
    model: str = "gpt2",
    cluster: str = "dgx-a100-80g",
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    config: Sequence[str] = (),
    seq_len: int | None = None,
    dtype: str | None = None,
    global_batch: int | None = None,
    mesh: str | None = None,
    microbatches: int | None = None,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    recompute: bool | None = None,
    optimizer: str | None = None,
    zero1: bool = False,
    memory_reserve: float | None = None,
    time_limit: float | None = None,
    methods: str | Sequence[str] | None = None,
    measure: bool = False,
    steps: int = 5,
    warmup: int = 2,
    profile: bool = False,
    device: str | None = None,
    cache: str | None = None,
    profile_budget: float | None = None,
    out: str | Path | None = None,
    force: bool = False,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> Comparison:
    """Plan one case with each of ``methods``; with ``measure`` run the plans here; with ``out`` write the report.

    Every keyword is the ``autopart compare`` option of the same name. ``profile`` (with ``device``,
    ``cache``, ``profile_budget``) prices every method with costs measured here, as ``autopart plan
    --profile`` does. Checks everything that can be checked (methods, ``out``, the runtime for
    ``measure``, the device for ``profile``) before the slow work starts. ``progress`` receives a line
    per step (capturing, profiling, planning with a method, running a plan); ``quiet`` drops them.
    """
    started = time.perf_counter()
    methods = parse_methods(DEFAULT_METHODS if methods is None else methods)
    profiling = None
    if profile:
        from .profile import check_device

        profiling = ProfileSettings(device=device or "cpu", cache=None if cache is None else str(cache),
                                    budget_s=profile_budget)
        check_device(_load_case_cluster(Case(cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node)),
                     profiling.device)
    elif device is not None or cache is not None or profile_budget is not None:
        raise CompareError("--device, --cache and --profile-budget go with --profile")
    out_dir = check_out_dir(out, force) if out is not None else None
    if out_dir is not None:
        _check_plotting()
    settings = MeasureSettings(steps=steps, warmup=warmup) if measure else None
    if measure:
        check_measurable(cluster, nodes, gpus_per_node)
    case = Case(
        model=model, cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node, config=tuple(config), seq_len=seq_len,
        dtype=dtype, global_batch=global_batch, mesh=mesh, microbatches=microbatches, schedule=schedule,
        virtual_stages=virtual_stages, recompute=recompute, optimizer=optimizer, zero1=zero1,
        memory_reserve=memory_reserve, time_limit=time_limit,
    )
    if out_dir is not None:
        out_dir.mkdir(exist_ok=True)
    result = run_case(case, methods, measure=settings, profile=profiling, workdir=out_dir,
                      progress=None if quiet else progress)
    comparison = Comparison(
        cases=(result,),
        command=command or _python_call(case, methods, measure, out, profiling),
        machine=machine_info(),
        measured=measure,
        wall_s=time.perf_counter() - started,
    )
    if out_dir is not None:
        write_report(comparison, out_dir, force=True)
    return comparison


def _python_call(case: Case, methods, measure, out, profiling: ProfileSettings | None = None) -> str:
    kw = {k: v for k, v in asdict(case).items() if v not in (None, (), False) and k != "label"}
    kw.update(methods=",".join(methods))
    if measure:
        kw["measure"] = True
    if profiling is not None:
        kw["profile"] = True
        for key, value in (("device", profiling.device), ("cache", profiling.cache), ("profile_budget", profiling.budget_s)):
            if value is not None and not (key == "device" and value == "cpu"):
                kw[key] = value
    if out is not None:
        kw["out"] = str(out)
    return "compare(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")"


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CompareError(
            "--out draws pictures with matplotlib, which is not installed; pip install 'autopart[plot]' "
            "(or matplotlib), or drop --out for the tables alone"
        ) from None


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

COLUMNS = (
    "method", "mesh", "schedule", "micro-batches", "step time", "samples/s", "TFLOP/s/dev", "MFU", "bubble",
    "peak mem/dev", "fits", "solver", "origin", f"vs {REFERENCE}",
)
RIGHT = {"micro-batches", "step time", "samples/s", "TFLOP/s/dev", "MFU", "bubble", "peak mem/dev", "solver",
         f"vs {REFERENCE}", "error"}
MEASURED_COLUMNS = ("measured", "error")


def _sig(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def row_cells(case: CaseResult, row: Row, measured: bool, notes: list[str] | None = None) -> list[str]:
    """The table cells of one row (shared by the terminal table and the markdown report).

    With ``notes``, long reasons (no plan, not measured) become a short cell and a note appended
    to ``notes``, for tables that must stay narrow.
    """
    name = row.method + (f" (= {row.same_as})" if row.same_as else "")

    def reason(text: str) -> str:
        if notes is None:
            return text
        notes.append(f"{row.method}: {text}")
        return text.split(":")[0] + " (see below)"

    if not row.ok:
        cells = [name, reason(row.error or "no plan")] + [""] * (len(COLUMNS) - 2)
        return cells + ([""] * len(MEASURED_COLUMNS) if measured else [])
    p = row.plan
    pred = p.predicted
    sched = p.schedule.name + (f" v={p.schedule.virtual_stages}" if p.schedule.virtual_stages > 1 else "")
    sp = case.speedup(row)
    cells = [
        name,
        str(p.mesh),
        sched,
        f"{p.schedule.microbatches} x {p.schedule.micro_batch_size}",
        fmt_time(pred.step_time_s),
        _sig(pred.samples_per_s),
        _sig(pred.tflops_per_device),
        f"{pred.mfu:.1%}",
        f"{pred.bubble_fraction:.1%}",
        fmt_bytes(pred.peak_memory_bytes),
        "yes" if pred.fits else "NO",
        f"{p.solver.wall_s:.2f} s",
        _origin_cell(p),
        f"{sp:.2f}x" if sp is not None else "—",
    ]
    if measured:
        m = row.measured
        if m is None:
            cells += ["—", ""]
        elif m.status == "measured":
            err = row.error_vs_measured()
            cells += [fmt_time(m.median_s) + ("*" if m.reason else ""), f"{err:+.1%}"]
            if m.reason and notes is not None and row.same_as is None:
                notes.append(f"{row.method}: * {m.reason}")
        else:
            cells += [reason(f"{m.status}: {m.reason}"), ""]
    return cells


def _origin_cell(plan) -> str:
    """``ilp (1.12x seed)`` for the solver's own plan, ``seed: expert`` for a seed nothing beat."""
    solver = plan.solver
    if solver.origin is None:
        return "—" if solver.method == "ilp" else solver.method
    if solver.origin != "ilp":
        return f"seed: {solver.origin}"
    step = plan.predicted.step_time_s
    return "ilp" + (f" ({solver.seed_step_s / step:.3f}x seed)" if solver.seed_step_s and step else "")


def _wins_line(cases: Sequence[CaseResult]) -> str | None:
    w = ilp_wins(cases)
    if not w.cases:
        return None
    line = f"ILP's own solve beat the best seed in {w.wins} of {w.cases} case(s)"
    if w.gain_geomean is not None:
        line += f" (by {w.gain_geomean:.3f}x geomean, at most {w.gain_max:.3f}x)"
    return line


def print_tables(comparison: Comparison, console: Any = None) -> None:
    """The table of each case, printed with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(190, Console().width))
    for case in comparison.cases:
        console.print(f"[bold]{case.case.model}[/bold] ({case.params / 1e6:,.1f}M params) on {case.cluster}")
        table = Table(show_lines=False)
        cols = COLUMNS + (MEASURED_COLUMNS if comparison.measured else ())
        for col in cols:
            table.add_column(col, justify="right" if col in RIGHT else "left", no_wrap=True)
        notes: list[str] = []
        for row in case.rows:
            cells = row_cells(case, row, comparison.measured, notes)
            style = "red" if (row.ok and not row.plan.predicted.fits) or not row.ok else None
            table.add_row(*cells, style=style)
        console.print(table)
        for note in notes:
            console.print(f"  {note}", highlight=False)
        console.print(f"[dim]costs: {case.costs}[/dim]", highlight=False)
        console.print(f"[dim]capture {case.capture_s:.1f} s · case {case.wall_s:.1f} s; "
                      f"vs {REFERENCE} = {REFERENCE}'s step time / this plan's; (= m): the same plan as method m; "
                      "origin: ilp = the solver's own plan, seed: m = baseline m's plan, which no solve beat[/dim]")
    wins = _wins_line(comparison.cases)
    if wins:
        console.print(wins, highlight=False)
    if comparison.measured:
        rho = comparison.spearman()
        n = len(comparison.measured_points())
        console.print(
            f"Spearman rank correlation of predicted and measured step time: "
            + (f"[bold]{rho:.2f}[/bold] over {n} distinct plans" if rho is not None else f"undefined ({n} distinct measured plans)")
        )
        if len(comparison.cases) > 1:
            for title, r in comparison.spearman_by_case().items():
                console.print(f"  within {title}: " + (f"{r:.2f}" if r is not None else "undefined (one plan, or no spread)"),
                              highlight=False)


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if h in RIGHT else "---" for h in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def measured_busy_s(m: Measurement) -> float | None:
    """The busiest rank's forward and backward time in the measured step (from the runtime's events)."""
    per_rank: dict[int, float] = {}
    for e in m.events:
        per_rank[e.rank] = per_rank.get(e.rank, 0.0) + (e.end_s - e.start_s)
    return max(per_rank.values()) if per_rank else None


def _error_cells(case: CaseResult, row: Row) -> list[str]:
    """One measured plan in the predicted-vs-measured table."""
    m = row.measured
    name = row.method + "".join(f", {r.method}" for r in case.rows if r.same_as == row.method)
    busy = measured_busy_s(m)
    return [
        case.case.title, name, str(row.plan.mesh), fmt_time(row.step_s), fmt_time(m.median_s),
        f"{fmt_time(min(m.step_times_s))} – {fmt_time(max(m.step_times_s))} ({len(m.step_times_s)})",
        f"{row.error_vs_measured():+.1%}",
        f"{fmt_time(max(row.sim.busy_s))} / {fmt_time(busy)}" if busy is not None else "—",
    ]


def results_json(comparison: Comparison) -> dict[str, Any]:
    """The raw figures (plans are written beside, in plans/)."""

    def row(case: CaseResult, r: Row) -> dict[str, Any]:
        d: dict[str, Any] = {"method": r.method, "error": r.error, "same_as": r.same_as}
        if r.ok:
            d.update(
                mesh=str(r.plan.mesh), schedule=asdict(r.plan.schedule), predicted=asdict(r.plan.predicted),
                solver=asdict(r.plan.solver), speedup_over_expert=case.speedup(r),
                stage_busy_s=list(r.sim.busy_s), stage_peak_memory_bytes=list(r.sim.peak_memory_bytes),
            )
        if r.measured is not None:
            m = r.measured
            d["measured"] = {
                "status": m.status, "reason": m.reason, "median_s": m.median_s, "step_times_s": list(m.step_times_s),
                "error": r.error_vs_measured(), "busiest_rank_compute_s": measured_busy_s(m),
            }
        return d

    return {
        "command": comparison.command,
        "machine": dict(comparison.machine),
        "wall_s": comparison.wall_s,
        "spearman": comparison.spearman() if comparison.measured else None,
        "ilp_wins": asdict(ilp_wins(comparison.cases)),
        "spearman_by_case": comparison.spearman_by_case() if comparison.measured else None,
        "cases": [
            {"case": asdict(c.case), "title": c.case.title, "cluster": c.cluster, "params": c.params, "costs": c.costs,
             "capture_s": c.capture_s, "wall_s": c.wall_s, "rows": [row(c, r) for r in c.rows]}
            for c in comparison.cases
        ],
    }


def write_report(
    comparison: Comparison,
    out: str | Path,
    *,
    name: str = "report",
    json_name: str = "results",
    pictures: str = "",
    intro: str = "",
    summary: str = "",
    timelines: Callable[[CaseResult], bool] | None = None,
    force: bool = False,
) -> Path:
    """Write ``NAME.md``, ``JSON_NAME.json`` and the pictures (PNG and SVG, under ``pictures/``) into ``out``.

    ``timelines`` picks the cases whose timeline and per-stage pictures are drawn (default: all).
    ``intro`` and ``summary`` are markdown placed before the cases. Refuses to replace any file
    unless ``force``. Returns the markdown file's path.
    """
    from . import plots

    out = Path(out)
    md_path, json_path = out / f"{name}.md", out / f"{json_name}.json"
    pic_dir = out / pictures if pictures else out
    if not force:
        for p in (md_path, json_path, *([pic_dir] if pictures else [])):
            if p.exists():
                raise CompareError(f"{p} already exists; pass --force to replace it")
    pic_dir.mkdir(parents=True, exist_ok=True)
    rel = (pictures + "/") if pictures else ""
    many = len(comparison.cases) > 1

    def picture(fig, stem: str, alt: str) -> str:
        for ext in ("png", "svg"):
            fig.savefig(pic_dir / f"{stem}.{ext}", dpi=110 if ext == "png" else None)
        return f"![{alt}]({rel}{stem}.png) ([SVG]({rel}{stem}.svg))"

    lines = [f"# autopart compare: {comparison.cases[0].case.title if not many else f'{len(comparison.cases)} cases'}", ""]
    if intro:
        lines += [intro.strip(), ""]
    lines += [
        "Command:", "", "```console", f"$ {comparison.command}", "```", "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in comparison.machine.items())
        + f". Date: {time.strftime('%Y-%m-%d')}. Wall time: {comparison.wall_s:.1f} s.",
        "",
        "Every method plans the same captured model and is priced by the same cost model and simulator. "
        f"*vs {REFERENCE}* is {REFERENCE}'s predicted step time divided by the plan's (above 1: faster than "
        f"{REFERENCE}, the tuned Megatron-style sweep); *(= m)* marks the same plan as method *m*; *micro-batches* "
        "is count x size per data-parallel replica; *origin* is where the ILP's plan came from (*ilp*: its own "
        "solve, with its gain over the best seed; *seed: m*: baseline *m*'s plan, which no solve beat).",
        "",
    ]
    wins = _wins_line(comparison.cases)
    if wins:
        lines += [wins + ".", ""]
    if summary:
        lines += [summary.strip(), ""]
    if comparison.measured:
        pts = comparison.measured_points()
        rho = comparison.spearman()
        lines += ["## Predicted vs measured", ""]
        if pts:
            lines += [
                f"Spearman rank correlation of predicted and measured step time over {len(pts)} distinct plans: "
                + (f"**{rho:.2f}**." if rho is not None else "undefined (needs two plans with different times)."),
                "",
            ]
            if many:
                lines += ["Within each case (only the plans differ): " + "; ".join(
                    f"{title} {r:.2f}" if r is not None else f"{title} undefined (one plan)"
                    for title, r in comparison.spearman_by_case().items()
                ) + ".", ""]
            lines += [
                _md_table(("case", "method", "mesh", "predicted", "measured", "warm steps", "error", "busiest rank F+B"),
                          [_error_cells(c, r) for c, r in pts]),
                "",
                "*measured* is the median of the warm steps, *warm steps* their range; *error* is "
                "(predicted - measured) / measured. *busiest rank F+B* is the forward and backward time of the "
                "busiest rank in one step, predicted / measured (the runtime's events of the last step): "
                "where it differs as much as the step, the error is in the compute; where it does not, in "
                "what the step does besides (communication, the optimizer, the pipeline's own work).",
                "",
                picture(plots.scatter_figure(pts, rho), "measured", "predicted vs measured step time"),
                "",
            ]
        else:
            lines += ["No plan was measured (see each case's *measured* column for why).", ""]
    for case in comparison.cases:
        stem = f"{case.case.slug}-" if many else ""
        lines += [
            f"## {case.case.title}", "",
            f"{case.params / 1e6:,.1f}M parameters on {case.cluster}. Global batch "
            f"{next((r.plan.training.global_batch for r in case.rows if r.ok), case.case.global_batch or '—')}; "
            f"capture {case.capture_s:.1f} s, case {case.wall_s:.1f} s. Costs: {case.costs}.",
            "",
            _md_table(COLUMNS + (MEASURED_COLUMNS if comparison.measured else ()),
                      [row_cells(case, r, comparison.measured) for r in case.rows]),
            "",
        ]
        if case.unique_rows() and (timelines is None or timelines(case)):
            lines += [
                picture(plots.timeline_figure(case), f"{stem}timeline", f"pipeline timelines of {case.case.title}"),
                "",
                picture(plots.stage_figure(case), f"{stem}stages", f"per-stage load and memory of {case.case.title}"),
                "",
            ]
    md_path.write_text("\n".join(lines).rstrip() + "\n")
    json_path.write_text(json.dumps(results_json(comparison), indent=1) + "\n")
    return md_path
