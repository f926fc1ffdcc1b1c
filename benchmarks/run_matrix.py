"""The standing benchmark matrix: every model on every cluster, compared method by method.

Reads ``benchmarks/matrix.toml`` (models x clusters, the methods, the ILP's time limit per model),
runs each case through ``partitioner.compare.run_case`` (one capture per model, shared by its
clusters), and writes a dated report: the headline (geometric-mean speedup of the ILP over the
``expert`` reference, overall and on the models whose layers are not all alike, counting only the
ILP's own solves; how often its solve beat the best seed; every baseline against the reference;
solver time), a speedup chart, every case's table, and timelines for the cases the TOML names. It supersedes ``benchmarks/ilp_matrix.py`` (the never-worse check is the
headline's worst case). Another matrix may take its ``[models]`` from a second file
(``models_from = "matrix.toml"``, relative to it: ``benchmarks/matrix-v100.toml``).

    python -m benchmarks.run_matrix [--matrix benchmarks/matrix.toml] \\
        [--report benchmarks/results/YYYY-MM-DD-matrix.md] [--only TEXT] [--force]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from partitioner.baselines import REFERENCE
from partitioner.compare import (
    CaptureCache, Case, CaseResult, CompareError, Comparison, geomean, ilp_wins, machine_info, parse_methods,
    write_report,
)
from partitioner.errors import AutopartError

MATRIX = Path(__file__).with_name("matrix.toml")
TOP_KEYS = {"methods", "timelines", "clusters", "models", "models_from"}
CLUSTER_KEYS = {"cluster", "nodes"}
MODEL_KEYS = {"batch_per_device", "time_limit", "config", "seq_len", "dtype", "unlike"}


@dataclass(frozen=True, slots=True)
class Matrix:
    """A parsed matrix file."""

    methods: tuple[str, ...]
    cases: tuple[Case, ...]
    timelines: frozenset[str]  # case titles whose pictures are drawn
    unlike: frozenset[str] = frozenset()  # case titles of models whose layers are not all alike


def _keys(where: str, table: Any, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise CompareError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CompareError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return table


def load_matrix(path: str | Path) -> Matrix:
    """Parse and check a matrix TOML file; errors name the file and the field."""
    from partitioner.cluster import load_cluster

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise CompareError(f"cannot read matrix file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CompareError(f"{path}: not valid TOML: {exc}") from None
    _keys(str(path), data, TOP_KEYS)
    methods = parse_methods(data.get("methods", ["ilp", "expert", "uniform", "params", "pipedream", "megatron"]))
    clusters = _keys(f"{path}: [clusters]", data.get("clusters", {}), set(data.get("clusters", {})))
    if "models_from" in data:  # another matrix's [models], so that two matrices cannot drift apart
        if "models" in data:
            raise CompareError(f"{path}: give [models.NAME] tables or models_from, not both")
        source = path.parent / data["models_from"]
        try:
            data["models"] = tomllib.loads(source.read_text()).get("models", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CompareError(f"{path}: models_from = {data['models_from']!r}: cannot read {source}: {exc}") from None
    models = _keys(f"{path}: [models]", data.get("models", {}), set(data.get("models", {})))
    if not clusters or not models:
        raise CompareError(f"{path}: needs at least one [clusters] entry and one [models.NAME] table")
    cases = []
    unlike = set()
    for mname, m in models.items():
        m = _keys(f"{path}: [models.{mname}]", m, MODEL_KEYS)
        for cname, c in clusters.items():
            c = _keys(f"{path}: [clusters] {cname!r}", c, CLUSTER_KEYS)
            if "cluster" not in c:
                raise CompareError(f"{path}: [clusters] {cname!r} needs cluster = PRESET or a TOML path")
            world = load_cluster(c["cluster"], nodes=c.get("nodes")).world_size
            cases.append(Case(
                model=mname, cluster=c["cluster"], nodes=c.get("nodes"), config=tuple(m.get("config", ())),
                seq_len=m.get("seq_len"), dtype=m.get("dtype"),
                global_batch=int(m.get("batch_per_device", 8)) * world,
                time_limit=m.get("time_limit"), label=f"{mname} on {cname}",
            ))
            if m.get("unlike", False):
                unlike.add(cases[-1].title)
    titles = {c.title for c in cases}
    timelines = frozenset(data.get("timelines", ()))
    unknown = sorted(timelines - titles)
    if unknown:
        raise CompareError(f"{path}: timelines names unknown case(s) {', '.join(unknown)}; cases are 'MODEL on CLUSTER'")
    return Matrix(methods, tuple(cases), timelines, frozenset(unlike))


def headline(cases: Sequence[CaseResult], baselines: Sequence[str], unlike: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The ILP against the ``expert`` reference (its own solves only, overall and on unlike-layer models),
    how often its solve beat the seeds, each baseline against the reference, the worst case, solver time."""
    out: dict[str, Any] = {"speedup": {}, "vs_reference": {}}
    for name, group in (("all", list(cases)), ("unlike", [c for c in cases if c.case.title in unlike])):
        w = ilp_wins(group)
        ratios = [c.speedup(c.row("ilp")) for c in group if c.row("ilp") is not None]
        vals = [r for r in ratios if r is not None]
        out["speedup"]["ilp (own solves)" if name == "all" else "ilp (own solves), unlike-layer models"] = {
            "geomean": w.own_speedup_geomean, "cases": w.cases, "without": len(group) - w.cases,
        }
        out["vs_reference"][name] = {"planner_geomean": geomean(vals), "cases": len(vals), "wins": asdict(w)}
    for b in baselines:
        if b == REFERENCE:
            continue
        ratios = [c.speedup(c.row(b)) for c in cases if c.row(b) is not None]
        vals = [r for r in ratios if r is not None]
        out["speedup"][f"{b} (a baseline)"] = {"geomean": geomean(vals), "cases": len(vals), "without": len(ratios) - len(vals)}
    worst = None
    never_worse = compared = 0
    for c in cases:
        ilp = c.row("ilp")
        best = [c.speedup(ilp, over=b) for b in baselines]
        best = [x for x in best if x is not None]
        if ilp is None or not best:
            continue
        ratio = min(best)  # the ILP against the best baseline of this case
        compared += 1
        never_worse += ratio >= 1 - 1e-9
        if worst is None or ratio < worst[0]:
            worst = (ratio, c.case.title)
    walls = [c.row("ilp").plan.solver.wall_s for c in cases if c.row("ilp") is not None and c.row("ilp").ok]
    out.update(
        worst=worst, never_worse=never_worse, compared=compared,
        solver_max_s=max(walls, default=0.0), solver_median_s=statistics.median(walls) if walls else 0.0,
        solver_total_s=sum(walls),
        no_plan=[c.case.title for c in cases if not any(r.ok and r.plan.predicted.fits for r in c.rows)],
    )
    return out


def headline_markdown(h: Mapping[str, Any], wall_s: float, n_cases: int) -> str:
    lines = ["## Headline", "", f"Every figure is a predicted speedup over **{REFERENCE}** (the tuned Megatron-style sweep).", ""]
    for b, s in h["speedup"].items():
        gm = f"**{s['geomean']:.3f}x**" if s["geomean"] is not None else "n/a"
        extra = f" ({s['without']} cases without a fitting plan)" if s["without"] else ""
        lines.append(f"- Geometric-mean speedup of **{b}** over {REFERENCE}: {gm} over {s['cases']} cases{extra}.")
    for name, v in h["vs_reference"].items():
        w = v["wins"]
        label = "all cases" if name == "all" else "unlike-layer models"
        gm = f"{v['planner_geomean']:.3f}x" if v["planner_geomean"] is not None else "n/a"
        gain = (f", by {w['gain_geomean']:.3f}x geomean (at most {w['gain_max']:.3f}x)" if w["gain_geomean"] else "")
        lines.append(
            f"- {label}: the ILP's own solve beat the best seed in {w['wins']} of {w['cases']} cases{gain}; "
            f"with the seeds counted, the planner's plan is {gm} over {REFERENCE} (geomean)."
        )
    if h["worst"]:
        lines.append(
            f"- Worst case against the best baseline: {h['worst'][0]:.2f}x ({h['worst'][1]}); "
            f"the ILP is never worse in {h['never_worse']} of {h['compared']} cases."
        )
    lines.append(
        f"- ILP solver time: median {h['solver_median_s']:.1f} s, max {h['solver_max_s']:.1f} s, "
        f"total {h['solver_total_s']:.0f} s."
    )
    if h["no_plan"]:
        lines.append(f"- No method has a plan that fits in: {', '.join(h['no_plan'])}.")
    lines.append(f"- The whole matrix ({n_cases} cases, simulated) ran in {wall_s / 60:.1f} minutes.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", default=str(MATRIX), help="matrix TOML (default benchmarks/matrix.toml)")
    ap.add_argument("--report", default=None, metavar="PATH.md",
                    help="report to write; its .json and a folder of pictures go beside it "
                         "(default benchmarks/results/<today>-matrix.md)")
    ap.add_argument("--only", default=None, metavar="TEXT", help="run only the cases whose title contains TEXT")
    ap.add_argument("--force", action="store_true", help="replace an existing report")
    args = ap.parse_args(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(args, "python -m benchmarks.run_matrix" + (" " + shlex.join(words) if words else ""))
    except AutopartError as exc:
        print(f"run_matrix: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, command: str) -> int:
    from partitioner.plots import speedup_figure

    matrix = load_matrix(args.matrix)
    report = Path(args.report or Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-matrix.md")
    if report.suffix != ".md":
        raise CompareError(f"--report {report} must end in .md")
    stem = report.stem
    targets = [report, report.with_suffix(".json"), report.parent / stem]
    if not args.force:
        for t in targets:
            if t.exists():
                raise CompareError(f"{t} already exists; pass --force to replace it")
    if not report.parent.is_dir():
        raise CompareError(f"--report {report}: directory {report.parent} does not exist")
    cases = [c for c in matrix.cases if not args.only or args.only in c.title]
    if not cases:
        raise CompareError(f"--only {args.only!r} matches no case")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # shared cores make the ILP's limit noisy
    started = time.perf_counter()
    captures = CaptureCache()
    results = []
    for i, case in enumerate(cases, 1):
        res = run_case_logged(case, matrix.methods, captures, i, len(cases))
        results.append(res)
    wall = time.perf_counter() - started
    comparison = Comparison(tuple(results), command, machine_info(), measured=False, wall_s=wall)
    baselines = [m for m in matrix.methods if m != "ilp"]
    h = headline(results, baselines, matrix.unlike)
    summary = headline_markdown(h, wall, len(results))
    pics = report.parent / stem
    pics.mkdir(exist_ok=True)
    if "ilp" in matrix.methods and baselines:
        fig = speedup_figure(results, baselines)
        for ext in ("png", "svg"):
            fig.savefig(pics / f"speedup.{ext}", dpi=110 if ext == "png" else None)
        summary += f"\n\n![ILP speedup over each baseline]({stem}/speedup.png) ([SVG]({stem}/speedup.svg))"
    path = write_report(
        comparison, report.parent, name=stem, json_name=stem, pictures=stem, force=True,
        intro=f"The standing matrix ({_shown(args.matrix)}): {len(results)} cases, methods {', '.join(matrix.methods)}. "
              "Simulated; nothing here was run on the clusters. The ILP's budget is deterministic work (CP-SAT's "
              "deterministic time and solve counts), so its plans do not depend on how busy the machine was; "
              f"only the wall times below do (load average {load:.1f} on {os.cpu_count()} CPUs at the start).",
        summary=summary, timelines=lambda c: c.case.title in matrix.timelines,
    )
    print(summary)
    print(f"wrote {path}")
    return 0


def _shown(path: str) -> str:
    """``path`` relative to the repository when it is inside it (reports must not name this machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(MATRIX.parent.parent))
    except ValueError:
        return str(path)


def run_case_logged(case: Case, methods, captures: CaptureCache, i: int, n: int) -> CaseResult:
    from partitioner.compare import run_case

    t = time.perf_counter()
    res = run_case(case, methods, captures=captures)
    parts = []
    for r in res.rows:
        parts.append(f"{r.method}={r.step_s:.4g}s" if r.ok else f"{r.method}=none")
    ilp = res.row("ilp")
    solver = f" ilp {ilp.plan.solver.wall_s:.1f}s {ilp.plan.mesh}" if ilp is not None and ilp.ok else ""
    print(f"[{i}/{n}] {case.title}: {' '.join(parts)};{solver}; case {time.perf_counter() - t:.1f}s", flush=True)
    return res


if __name__ == "__main__":
    raise SystemExit(main())
