"""Predicted vs measured: small models planned by every method, priced with measured costs, run here.

Each case goes through ``partitioner.compare.run_case`` with ``profile`` (the costs ``autopart plan
--profile`` measures on this CPU) and ``measure`` (every distinct plan run under ``torchrun`` with
``autopart run``), and the whole set is written as one report: the predicted-vs-measured error of
every plan, the Spearman rank correlation over all plans and within each case, the scatter, and
each case's simulated and measured timelines. This is the measured half of issue #6.

    python -m benchmarks.compare_measured [--report benchmarks/results/YYYY-MM-DD-compare-measured.md] \\
        [--cache PATH] [--steps 5] [--warmup 2] [--repeat 2] [--only TEXT] [--force]

With ``--repeat N`` every case is planned once and its plans run N times over; the report draws
the first repetition and tabulates every repetition's medians and Spearman figures, so that the
spread of the measurement (shared cores) shows beside the result.

The cases are small enough for a 2-core machine: 2 ranks of one thread each (``local-cpu:2``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from partitioner.compare import (
    DEFAULT_METHODS, CaptureCache, Case, CaseResult, CompareError, Comparison, MeasureSettings, ProfileSettings, machine_info,
    run_case, write_report,
)
from partitioner.errors import AutopartError

# A heterogeneous model small enough to train here: the zoo's hetero-lm with its mixed widths scaled down.
HETERO = ("vocab_size=4000", "d_model=128", "widths=64,1024,32,2048,128,512,64,256")
CASES = (
    Case(model="gpt2-tiny", cluster="local-cpu:2", dtype="fp32", global_batch=8, time_limit=10,
         label="gpt2-tiny on local-cpu:2"),
    Case(model="gpt2-tiny", cluster="local-cpu:2", dtype="fp32", global_batch=8, time_limit=10, mesh="pp=2",
         label="gpt2-tiny pp=2 on local-cpu:2"),
    Case(model="hetero-lm", config=HETERO, seq_len=64, cluster="local-cpu:2", dtype="fp32", global_batch=8,
         time_limit=10, label="hetero-lm (small) on local-cpu:2"),
    Case(model="hetero-lm", config=HETERO, seq_len=64, cluster="local-cpu:2", dtype="fp32", global_batch=8,
         time_limit=10, mesh="pp=2", label="hetero-lm (small) pp=2 on local-cpu:2"),
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_measured", description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default=None, metavar="PATH.md",
                    help="report to write; its .json and a folder of pictures go beside it "
                         "(default benchmarks/results/<today>-compare-measured.md)")
    ap.add_argument("--cache", default=None, metavar="PATH", help="profile cache file (as autopart plan --cache)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per plan (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps before them (default 2)")
    ap.add_argument("--repeat", type=int, default=2, help="run every plan this many times over (default 2)")
    ap.add_argument("--only", default=None, metavar="TEXT", help="run only the cases whose title contains TEXT")
    ap.add_argument("--force", action="store_true", help="replace an existing report")
    args = ap.parse_args(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(args, "python -m benchmarks.compare_measured" + (" " + shlex.join(words) if words else ""))
    except AutopartError as exc:
        print(f"compare_measured: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, command: str) -> int:
    report = Path(args.report or Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-compare-measured.md")
    if report.suffix != ".md":
        raise CompareError(f"--report {report} must end in .md")
    stem = report.stem
    if not args.force:
        for t in (report, report.with_suffix(".json"), report.parent / stem):
            if t.exists():
                raise CompareError(f"{t} already exists; pass --force to replace it")
    if not report.parent.is_dir():
        raise CompareError(f"--report {report}: directory {report.parent} does not exist")
    cases = [c for c in CASES if not args.only or args.only in c.title]
    if not cases:
        raise CompareError(f"--only {args.only!r} matches no case")
    if args.repeat < 1:
        raise CompareError(f"--repeat {args.repeat} must be >= 1")
    measure = MeasureSettings(steps=args.steps, warmup=args.warmup)
    profile = ProfileSettings(cache=args.cache)
    started = time.perf_counter()
    captures = CaptureCache()
    runs: list[list] = []  # per repetition, the cases' results
    loads: list[str] = []
    # Plans, logs and run JSON stay (outside the repository) for a failed run to be read.
    work = tempfile.mkdtemp(prefix="autopart-measured-")
    for rep in range(args.repeat):
        loads.append(_load())
        results = []
        for i, case in enumerate(cases, 1):
            t = time.perf_counter()
            # Profiling reads the cache after the first repetition and the ILP may take another
            # path under a different load, so every repetition plans anew: its plans are the ones it ran.
            res = run_case(case, DEFAULT_METHODS, measure=measure, profile=profile, captures=captures,
                           workdir=Path(work) / f"{rep}-{case.slug}",
                           progress=lambda msg: print(f"  {msg}", flush=True))
            results.append(res)
            parts = [
                f"{r.method}={r.step_s * 1e3:.1f}ms/"
                + (f"{r.measured.median_s * 1e3:.1f}ms" if r.measured and r.measured.median_s else "-")
                for r in res.unique_rows()
            ]
            print(f"[{rep + 1}.{i}/{len(cases)}] {case.title}: predicted/measured {' '.join(parts)}; "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        runs.append(results)
    loads.append(_load())
    wall = time.perf_counter() - started
    comparisons = [Comparison(tuple(r), command, machine_info(), measured=True, wall_s=wall) for r in runs]
    pooled = Comparison(tuple(_pool(c) for c in zip(*runs)), command, machine_info(), measured=True, wall_s=wall)
    path = write_report(
        pooled, report.parent, name=stem, json_name=stem, pictures=stem, force=True,
        intro=f"Every method's plan for {len(cases)} small cases, priced with costs measured on this CPU "
              f"(`--profile`) and run here under `torchrun` ({measure.steps} measured steps after {measure.warmup} "
              f"warm-up, one thread per rank), {args.repeat} time(s) over. The cores are shared with other "
              f"jobs (load average {', then '.join(loads)} on {os.cpu_count()} CPUs at the start of each "
              "repetition and at the end), so step times vary from run to run. Below, a plan's measured step "
              "time is the median of its warm steps over every repetition that ran the same plan; its timeline is "
              "the first repetition's last step. Each repetition alone is in the table that follows.",
        summary=_repeats_markdown(comparisons),
    )
    print(f"wrote {path}; the runs' plans, logs and JSON are in {work}")
    return 0


def _pool(results: Sequence[CaseResult]) -> CaseResult:
    """The first repetition's case, each plan's warm steps joined with those of every repetition
    that ran the same plan (a repetition plans anew; a different plan is not pooled)."""
    from dataclasses import replace

    from partitioner.compare.planning import plan_key

    first, rest = results[0], results[1:]
    rows: list = []
    pooled: dict[str, object] = {}
    for row in first.rows:
        m = row.measured
        if row.same_as is not None and row.same_as in pooled:  # the same plan: the same measurement
            rows.append(replace(row, measured=pooled[row.same_as]))
            continue
        if row.ok and m is not None and m.median_s is not None:
            key = plan_key(row.plan)
            times = list(m.step_times_s)
            for other in rest:
                o = other.row(row.method)
                if o is not None and o.ok and plan_key(o.plan) == key and o.measured and o.measured.median_s is not None:
                    times += o.measured.step_times_s
            row = replace(row, measured=replace(m, step_times_s=tuple(times)))
            pooled[row.method] = row.measured
        rows.append(row)
    return replace(first, rows=tuple(rows), wall_s=sum(r.wall_s for r in results))


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"


def _repeats_markdown(comparisons: Sequence[Comparison]) -> str:
    """Every repetition's Spearman figures and each plan's measured median, side by side."""
    from partitioner.fmt import fmt_time as _fmt_time

    lines = ["## Every repetition", ""]
    head = ["", *[f"run {i + 1}" for i in range(len(comparisons))]]
    rows = [["Spearman, all plans", *[_rho(c.spearman()) for c in comparisons]]]
    titles = list(comparisons[0].spearman_by_case())
    for title in titles:
        rows.append([f"Spearman within {title}", *[_rho(c.spearman_by_case().get(title)) for c in comparisons]])
    lines += [_table(head, rows), ""]
    head = ["case", "plan", *[f"run {i + 1}: predicted / measured (error)" for i in range(len(comparisons))]]
    rows = []
    for ci, case in enumerate(comparisons[0].cases):
        for row in case.unique_rows():
            cells = [case.case.title, row.method]
            for c in comparisons:
                r = c.cases[ci].row(row.method)
                m = r.measured if r is not None and r.ok else None
                if m is None or m.median_s is None:
                    cells.append("—" if r is None or not r.ok else f"{_fmt_time(r.step_s)} / {m.status if m else '—'}")
                else:
                    cells.append(f"{_fmt_time(r.step_s)} / {_fmt_time(m.median_s)} ({r.error_vs_measured():+.0%})"
                                 + (f" (= {r.same_as})" if r.same_as else ""))
            rows.append(cells)
    lines += [_table(head, rows), "",
              "A repetition plans anew (the ILP's search is limited in wall-clock time); *(= m)*: that run's plan "
              "was method *m*'s.", ""]
    return "\n".join(lines)


def _rho(r: float | None) -> str:
    return f"{r:.2f}" if r is not None else "undefined"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
