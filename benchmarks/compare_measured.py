"""Predicted vs measured: small models planned by every method, priced with measured costs, run here.

Each case goes through ``partitioner.compare.run_case`` with ``profile`` (the costs ``autopart plan
--profile`` measures on this CPU) and ``measure`` (every distinct plan run under ``torchrun`` with
``autopart run``), and the whole set is written as one report: the predicted-vs-measured error of
every plan, the Spearman rank correlation over all plans and within each case, the scatter, and
each case's simulated and measured timelines. This is the measured half of issue #6.

    python -m benchmarks.compare_measured [--report benchmarks/results/YYYY-MM-DD-compare-measured.md] \\
        [--cache PATH] [--steps 5] [--warmup 2] [--only TEXT] [--force]

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
    DEFAULT_METHODS, CaptureCache, Case, CompareError, Comparison, MeasureSettings, ProfileSettings, machine_info,
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
    measure = MeasureSettings(steps=args.steps, warmup=args.warmup)
    profile = ProfileSettings(cache=args.cache)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    captures = CaptureCache()
    results = []
    with tempfile.TemporaryDirectory(prefix="autopart-measured-") as work:
        for i, case in enumerate(cases, 1):
            t = time.perf_counter()
            res = run_case(case, DEFAULT_METHODS, measure=measure, profile=profile, captures=captures,
                           workdir=Path(work) / case.slug, progress=lambda msg: print(f"  {msg}", flush=True))
            results.append(res)
            parts = [
                f"{r.method}={r.step_s * 1e3:.1f}ms/"
                + (f"{r.measured.median_s * 1e3:.1f}ms" if r.measured and r.measured.median_s else "-")
                for r in res.unique_rows()
            ]
            print(f"[{i}/{len(cases)}] {case.title}: predicted/measured {' '.join(parts)}; "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
    comparison = Comparison(tuple(results), command, machine_info(), measured=True,
                            wall_s=time.perf_counter() - started)
    path = write_report(
        comparison, report.parent, name=stem, json_name=stem, pictures=stem, force=True,
        intro=f"Every method's plan for {len(results)} small cases, priced with costs measured on this CPU "
              f"(`--profile`) and run here under `torchrun` ({measure.steps} measured steps after {measure.warmup} "
              f"warm-up, one thread per rank). Load average {load:.1f} on {os.cpu_count()} CPUs at the start: "
              "the cores are shared with other jobs, so step times vary from run to run.",
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
