"""Planning one case with every method, priced by one evaluator (see the package's docstring)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..cluster import default_dtype, tp_degrees
from ..errors import AutopartError
from .values import Case, CaseResult, CompareError, DEFAULT_METHODS, MeasureSettings, ProfileSettings, Row, load_case_cluster
from .measuring import measure_rows, save_plans


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
        key = (case.model, case.config, case.seq_len, case.vocab_chunks, dtype)
        if key not in self._entries:
            from ..capture import capture
            from ..zoo import load_model, parse_config_overrides

            t = time.perf_counter()
            loaded = load_model(case.model, seq_len=case.seq_len, dtype=dtype, config=parse_config_overrides(case.config))
            captured = capture(
                loaded.model, loaded.example_inputs, loaded.example_kwargs, name=loaded.name, batch_size=loaded.batch_size,
                vocab_chunks=case.vocab_chunks,
            )
            self._entries[key] = (loaded, captured, time.perf_counter() - t)
        return self._entries[key]


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """``"ilp,uniform"`` or a sequence -> a checked tuple (order kept, duplicates dropped)."""
    from ..planner import ALL_METHODS

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


def plan_key(plan) -> tuple:
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

    from ..baselines import Pins, plan_baseline
    from ..errors import PlanError
    from ..evaluate import Evaluator
    from ..graph import build_partition_graph
    from ..plan import Mesh, Training

    say = progress or (lambda _msg: None)
    methods = parse_methods(methods)
    started = time.perf_counter()
    cluster = load_case_cluster(case)
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
        cost_model, costs = _profiled_costs(pgraph, cluster, dtype, pins, training.global_batch, loaded, profile)
    # One evaluator for every method (what ``planner.prepare`` builds): the same costs judge all plans.
    ev = Evaluator(pgraph, cluster, cost_model, training)

    rows: list[Row] = []
    seen: dict[tuple, str] = {}
    for method in methods:
        say(f"{case.title}: planning with {method}")
        try:
            if method == "ilp":
                from ..solver import plan_ilp

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
        key = plan_key(plan)
        rows.append(Row(method, plan, sim, same_as=seen.get(key)))
        seen.setdefault(key, method)

    if measure is not None:
        rows = measure_rows(case, cluster, captured, rows, measure, workdir, say)
    elif workdir is not None:
        save_plans(case, rows, Path(workdir))
    return CaseResult(
        case=case, cluster=cluster.describe(), params=captured.param_count, rows=tuple(rows),
        capture_s=capture_s, wall_s=time.perf_counter() - started, costs=costs,
    )


def _profiled_costs(pgraph, cluster, dtype: str, pins, global_batch: int, loaded,
                    settings: ProfileSettings) -> tuple[Any, str]:
    """The measured cost model of ``autopart plan --profile`` (its micro-batch sizes and its clock), and a
    line saying what it measured."""
    from ..profile import (PROFILED_SIZES, ProfileCache, ProfileOptions, micro_batches_to_profile, profile_clock,
                           profile_for_planning, recaptured)

    batch = pgraph.captured.batch_size
    sizes = micro_batches_to_profile(batch, cluster.world_size, global_batch, pp=pins.pp, tp=pins.tp, dp=pins.dp,
                                     microbatches=pins.microbatches, most=settings.sizes or PROFILED_SIZES)
    others, failed = recaptured(loaded.model, loaded.example_inputs, loaded.example_kwargs, loaded.name, sizes,
                                pgraph.captured.vocab_chunks)
    # No bar of its own: compare's progress line says "profiling" (one live display at a time).
    options = ProfileOptions(device=settings.device, dtype=dtype, tp_degrees=tp_degrees(cluster, pins.tp),
                             budget_s=settings.budget_s, progress=False, clock=profile_clock(cluster, settings.device))
    with ProfileCache(settings.cache) as cache:
        prof = profile_for_planning(pgraph, cluster, cache, options, others, failed)
        path = cache.path
    return prof.cost_model, prof.summary(batch, path, cache.moved_aside)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


