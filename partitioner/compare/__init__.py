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

The package follows the flow of one comparison: ``values`` (cases, rows, measurements, results and
their statistics), ``planning`` (each method plans a case, priced by one evaluator), ``measuring``
(each plan runs for real; [Note: the runtime contract]) and ``report`` (tables, markdown, JSON); this
module is the entry point, ``compare``.

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

import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from .measuring import check_measurable, run_plan, runs_here, runtime_command
from .planning import CaptureCache, parse_methods, run_case
from .report import print_tables, results_json, write_report
from .values import (
    DEFAULT_METHODS,
    GIB,
    Case,
    CaseResult,
    CompareError,
    Comparison,
    IlpWins,
    MeasuredEvent,
    MeasureSettings,
    Measurement,
    ProfileSettings,
    Row,
    geomean,
    ilp_wins,
    load_case_cluster,
    spearman,
)

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
    "runtime_command",
    "run_plan",
    "runs_here",
    "spearman",
    "geomean",
    "IlpWins",
    "ilp_wins",
    "machine_info",
    "print_tables",
    "results_json",
    "write_report",
    "check_out_dir",
    "check_measurable",
]


# --------------------------------------------------------------------------------------
# The entry point behind `autopart compare`
# --------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """What the report records about where it ran."""
    import torch

    from ..cluster import Cluster

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
    vocab_chunks: int = 1,
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
    profile_sizes: int | None = None,
    out: str | Path | None = None,
    force: bool = False,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> Comparison:
    """Plan one case with each of ``methods``; with ``measure`` run the plans here; with ``out`` write the report.

    Every keyword is the ``autopart compare`` option of the same name. ``profile`` (with ``device``,
    ``cache``, ``profile_budget``, ``profile_sizes``) prices every method with costs measured here, as ``autopart plan
    --profile`` does. Checks everything that can be checked (methods, ``out``, the runtime for
    ``measure``, the device for ``profile``) before the slow work starts. ``progress`` receives a line
    per step (capturing, profiling, planning with a method, running a plan); ``quiet`` drops them.
    """
    started = time.perf_counter()
    methods = parse_methods(DEFAULT_METHODS if methods is None else methods)
    profiling = None
    if profile:
        from ..profile import check_device

        profiling = ProfileSettings(device=device or "cpu", cache=None if cache is None else str(cache),
                                    budget_s=profile_budget, sizes=profile_sizes)
        check_device(load_case_cluster(Case(cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node)),
                     profiling.device)
    elif device is not None or cache is not None or profile_budget is not None or profile_sizes is not None:
        raise CompareError("--device, --cache, --profile-budget and --profile-sizes go with --profile")
    out_dir = check_out_dir(out, force) if out is not None else None
    if out_dir is not None:
        _check_plotting()
    settings = MeasureSettings(steps=steps, warmup=warmup) if measure else None
    if measure:
        check_measurable(cluster, nodes, gpus_per_node)
    case = Case(
        model=model, cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node, config=tuple(config), seq_len=seq_len,
        vocab_chunks=vocab_chunks, dtype=dtype, global_batch=global_batch, mesh=mesh, microbatches=microbatches, schedule=schedule,
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
    kw = {k: v for k, v in asdict(case).items()
          if v not in (None, (), False) and k != "label" and not (k == "vocab_chunks" and v == 1)}
    kw.update(methods=",".join(methods))
    if measure:
        kw["measure"] = True
    if profiling is not None:
        kw["profile"] = True
        for key, value in (("device", profiling.device), ("cache", profiling.cache), ("profile_budget", profiling.budget_s),
                           ("profile_sizes", profiling.sizes)):
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


