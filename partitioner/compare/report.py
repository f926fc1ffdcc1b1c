"""The comparison as terminal tables, a markdown report with pictures, and JSON."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from ..baselines import REFERENCE
from ..fmt import fmt_bytes, fmt_time
from .values import CaseResult, CompareError, Comparison, Measurement, Row, ilp_wins


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
            "Spearman rank correlation of predicted and measured step time: "
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
    from .. import plots

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

