"""The pictures of ``autopart compare``: pipeline timelines, per-stage bars, predicted vs measured.

Drawn with matplotlib from a ``CaseResult`` (``partitioner/compare/``): the simulator's events
(``SimResult.events``) and each stage's predicted send and reduction times make the simulated
timeline; the runtime's events make the measured one. Figures are built with
``matplotlib.figure.Figure`` and never registered with pyplot, so drawing keeps no global state and
needs no display. matplotlib is an optional dependency (``pip install 'autopart[plot]'``), imported
only here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from .schedules import spec as schedule_spec, stage_rank

# The figures read compare's results (``compare.CaseResult`` and its ``Row``s) by attribute; compare
# imports this module to draw them, so the types are named here, not imported (no import cycle).
CaseResult = Row = Any

__all__ = ["timeline_figure", "stage_figure", "scatter_figure", "speedup_figure"]

GIB = 1 << 30
COLORS = {
    "F": "#4C72B0",  # forward
    "B": "#DD8452",  # backward
    "I": "#E8A87C",  # input-gradient half of a split backward
    "W": "#55A868",  # weight-gradient half of a split backward
    "p2p": "#8172B3",  # point-to-point send between stages
    "dp": "#C44E52",  # data-parallel gradient all-reduce
    "idle": "#ECECEC",
}
METHOD_COLORS = {
    "ilp": "#2A9D8F", "expert": "#264653", "uniform": "#8D99AE", "params": "#E9C46A", "pipedream": "#F4A261", "megatron": "#E76F51",
}
RASTERIZE_OVER = 1500  # actions per panel above which the bars of an SVG are rasterized (file size)


def _method_color(method: str, i: int) -> str:
    return METHOD_COLORS.get(method, f"C{i % 10}")


def _time_unit(span: float) -> tuple[float, str]:
    return (1e3, "ms") if span < 1 else (1.0, "s")


def _label(row: Row, case: CaseResult) -> str:
    same = [r.method for r in case.rows if r.same_as == row.method]
    return row.method + (f" (= {', '.join(same)})" if same else "")


def _row_heights(pps: Sequence[int]) -> list[float]:
    return [0.75 + 0.26 * min(p, 12) + 0.05 * max(0, p - 12) for p in pps]


def _rank_ticks(ax, ranks: int) -> None:
    step = 1 if ranks <= 16 else math.ceil(ranks / 16)
    ticks = list(range(0, ranks, step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"rank {r}" for r in ticks], fontsize=7)
    ax.set_ylim(ranks - 0.5, -0.5)


def _bars(ax, spans: dict, ranks: int, rasterize: bool) -> None:
    """``spans[(rank, kind)] = [(start, duration), ...]`` drawn as one collection per (rank, kind)."""
    lanes = {"F": (-0.38, 0.58), "B": (-0.38, 0.58), "I": (-0.38, 0.58), "W": (-0.38, 0.58), "p2p": (0.24, 0.14), "dp": (0.24, 0.14)}
    # Thin white edges separate actions; with hundreds of actions a row they would wash the colours out.
    busiest = max((len(xs) for xs in spans.values()), default=0)
    edge = dict(edgecolor="white", linewidth=0.3) if busiest <= 80 else dict(edgecolor="none", linewidth=0)
    for (r, kind), xs in spans.items():
        if not xs:
            continue
        off, h = lanes[kind]
        coll = ax.broken_barh(xs, (r + off, h), facecolors=COLORS[kind], **edge)
        coll.set_rasterized(rasterize)


def _label_microbatches(ax, events, span: float, ranks: int) -> None:
    """Write each action's micro-batch in its bar when bars are wide enough to hold it."""
    per_rank = len(events) / max(ranks, 1)
    if per_rank > 32 or ranks > 16:
        return
    for r, kind, mb, start, end in events:
        if end - start >= span / 45:
            ax.text((start + end) / 2, r - 0.09, str(mb), ha="center", va="center", fontsize=6, color="white")


def _draw_simulated(ax, row: Row, unit: float) -> None:
    plan, sim = row.plan, row.sim
    ranks = sim.ranks
    sends = [st.predicted.send_s for st in plan.stages]
    n_stages = len(plan.stages)
    spans: dict = {}
    events = []
    last_b: dict[int, tuple[float, float]] = {}
    for e in sim.events:
        a = e.action
        spans.setdefault((e.rank, a.kind), []).append((e.start_s * unit, (e.end_s - e.start_s) * unit))
        events.append((e.rank, a.kind, a.microbatch, e.start_s * unit, e.end_s * unit))
        if a.kind == "F" and a.stage + 1 < n_stages and sends[a.stage] > 0:
            spans.setdefault((e.rank, "p2p"), []).append((e.end_s * unit, sends[a.stage] * unit))
        if a.kind in ("B", "W"):
            last_b[e.rank] = (e.start_s, e.end_s)
        if a.kind in ("B", "I"):
            if a.stage > 0 and sends[a.stage - 1] > 0:
                spans.setdefault((e.rank, "p2p"), []).append((e.end_s * unit, sends[a.stage - 1] * unit))
    for r in range(ranks):
        reduce_s = sum(st.predicted.dp_reduce_s for st in plan.stages[r::ranks])
        if reduce_s > 0 and r in last_b:
            b_start, b_end = last_b[r]
            start = b_start if plan.training.overlap_dp else b_end
            spans.setdefault((r, "dp"), []).append((start * unit, reduce_s * unit))
    step = sim.step_time_s * unit
    ax.broken_barh([(0, step)], (-0.45, 0.9), facecolors=COLORS["idle"])
    for r in range(1, ranks):
        ax.broken_barh([(0, step)], (r - 0.45, 0.9), facecolors=COLORS["idle"])
    _bars(ax, spans, ranks, rasterize=len(sim.events) > RASTERIZE_OVER)
    _label_microbatches(ax, events, step, ranks)
    _rank_ticks(ax, ranks)
    ax.axvline(step, color="black", linewidth=0.8, linestyle="--")


def _draw_measured(ax, row: Row, unit: float) -> bool:
    """The measured last step per pipeline rank; False (and a note) if there is nothing to draw."""
    m = row.measured
    plan = row.plan
    pp = plan.mesh.pp
    if m is None or m.status != "measured" or not m.events:
        why = "not measured" if m is None else (m.reason or "the run reported no events")
        ax.text(0.5, 0.5, why if len(why) < 90 else why[:87] + "...", ha="center", va="center", fontsize=8,
                transform=ax.transAxes, wrap=True)
        ax.set_axis_off()
        return False
    # One rank per pipeline rank: the one at dp=0, tp=0, or else the lowest that reported.
    chosen: dict[int, int] = {}
    layout = schedule_spec(plan.schedule.name).layout
    for e in m.events:
        p = stage_rank(e.stage, pp, layout)
        want = plan.mesh.rank(p)
        if p not in chosen or (e.rank == want and chosen[p] != want) or (chosen[p] != want and e.rank < chosen[p]):
            chosen[p] = e.rank
    spans: dict = {}
    events = []
    end = 0.0
    for e in m.events:
        p = stage_rank(e.stage, pp, layout)
        if chosen.get(p) != e.rank:
            continue
        spans.setdefault((p, e.kind if e.kind in ("F", "B", "I", "W") else "F"), []).append(
            (e.start_s * unit, (e.end_s - e.start_s) * unit)
        )
        events.append((p, e.kind, e.microbatch, e.start_s * unit, e.end_s * unit))
        end = max(end, e.end_s * unit)
    # The step is longer than its last backward: gradient reduction and the optimizer follow.
    step = max(end, (m.median_s or 0.0) * unit)
    for r in range(pp):
        ax.broken_barh([(0, step)], (r - 0.45, 0.9), facecolors=COLORS["idle"])
    _bars(ax, spans, pp, rasterize=len(events) > RASTERIZE_OVER)
    _label_microbatches(ax, events, step, pp)
    _rank_ticks(ax, pp)
    ax.axvline(step, color="black", linewidth=0.8, linestyle="--")
    return True


def timeline_figure(case: CaseResult) -> Figure:
    """One step of each distinct plan as a Gantt chart; measured ones beside, on the same time axis.

    Simulated and measured panels share one axis, so that a bar's length says how far the
    prediction is from the run as well as how the plans compare.
    """
    from .fmt import fmt_time

    rows = case.unique_rows()
    measured = any(r.measured is not None for r in rows)
    heights = _row_heights([r.sim.ranks for r in rows])
    fig = Figure(figsize=(15 if measured else 11, min(30.0, sum(heights) + 1.2)), layout="constrained")
    grid = fig.add_gridspec(len(rows), 2 if measured else 1, height_ratios=heights)
    m_spans = [
        max([e.end_s for e in r.measured.events] + [r.measured.median_s or 0.0])
        for r in rows if r.measured and r.measured.events
    ]
    span = max([r.sim.step_time_s for r in rows] + m_spans)
    unit, unit_name = _time_unit(span)
    m_unit, m_unit_name = unit, unit_name
    first = last = None
    m_last = None
    for i, row in enumerate(rows):
        ax = fig.add_subplot(grid[i, 0], sharex=first)
        first = first or ax
        last = ax
        _draw_simulated(ax, row, unit)
        p = row.plan
        sched = p.schedule.name + (f" v={p.schedule.virtual_stages}" if p.schedule.virtual_stages > 1 else "")
        ax.set_title(
            f"{_label(row, case)}: {p.mesh}, {sched}, {p.schedule.microbatches} micro-batches; "
            f"step {fmt_time(p.predicted.step_time_s)}, bubble {p.predicted.bubble_fraction:.0%}",
            fontsize=9, loc="left",
        )
        if i < len(rows) - 1:
            ax.tick_params(labelbottom=False)
        if measured:
            mx = fig.add_subplot(grid[i, 1], sharex=first)
            if _draw_measured(mx, row, m_unit):
                m_last = mx
                err = row.error_vs_measured()
                mx.set_title(f"{row.method}: measured, median step {fmt_time(row.measured.median_s)} "
                             f"(predicted {err:+.0%})", fontsize=9, loc="left")
                if i < len(rows) - 1:
                    mx.tick_params(labelbottom=False)
    last.set_xlabel(f"simulated time in the step ({unit_name})")
    last.set_xlim(0, span * unit * 1.01)
    if m_last is not None:
        m_last.set_xlabel(f"measured time in the last step ({m_unit_name})")
    handles = [Patch(facecolor=COLORS[k], label=label) for k, label in (
        ("F", "forward"), ("B", "backward"), ("I", "input gradients"), ("W", "weight gradients"),
        ("p2p", "send to next/previous stage"),
        ("dp", "data-parallel all-reduce"), ("idle", "idle"),
    )]
    fig.suptitle(f"Pipeline timeline of one step: {case.case.title}", fontsize=11)
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    return fig


def stage_figure(case: CaseResult) -> Figure:
    """Per pipeline rank: compute time per step and peak memory per device, grouped by method."""
    rows = case.unique_rows()
    max_pp = max(r.sim.ranks for r in rows)
    fig = Figure(figsize=(min(18.0, max(9.0, 4 + 0.22 * max_pp * len(rows))), 7), layout="constrained")
    load_ax, mem_ax = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(rows)
    limit = rows[0].plan.predicted.memory_limit_bytes / GIB
    top = max(max(r.sim.peak_memory_bytes) for r in rows) / GIB
    # A small model against a big device: drawn to the limit, its bars would not show; say the limit instead.
    small = top < 0.05 * limit
    mem_unit, mem_name = ((1 << 20), "MiB") if small and top < 1 else (GIB, "GiB")
    span = max(max(r.sim.busy_s) for r in rows)
    unit, unit_name = _time_unit(span)
    for i, row in enumerate(rows):
        xs = [r + (i - (len(rows) - 1) / 2) * width for r in range(row.sim.ranks)]
        color = _method_color(row.method, i)
        label = f"{_label(row, case)} ({row.plan.mesh})"
        load_ax.bar(xs, [b * unit for b in row.sim.busy_s], width, color=color, label=label)
        mem_ax.bar(xs, [m / mem_unit for m in row.sim.peak_memory_bytes], width, color=color)
    if small:
        mem_ax.text(0.995, 0.97, f"device memory less reserve: {limit:.1f} GiB (off the scale)", va="top",
                    ha="right", fontsize=7, transform=mem_ax.transAxes)
    else:
        mem_ax.axhline(limit, color="black", linestyle="--", linewidth=0.8)
        mem_ax.text(0.995, limit, "device memory less reserve", va="bottom", ha="right", fontsize=7,
                    transform=mem_ax.get_yaxis_transform())
    load_ax.set_ylabel(f"compute per step ({unit_name})")
    load_ax.set_title("Load: forward + backward time per step of each pipeline rank (even is better)", fontsize=9, loc="left")
    mem_ax.set_ylabel(f"peak memory per device ({mem_name})")
    mem_ax.set_title("Memory: weights, gradients, optimizer state and in-flight activations, per device", fontsize=9, loc="left")
    mem_ax.set_xlabel("pipeline rank")
    step = 1 if max_pp <= 32 else math.ceil(max_pp / 32)
    mem_ax.set_xticks(list(range(0, max_pp, step)))
    mem_ax.set_ylim(0, (top * GIB / mem_unit if small else max(limit, top)) * 1.12)
    fig.suptitle(f"Per-stage load and memory: {case.case.title}", fontsize=11)
    fig.legend(loc="outside lower center", ncol=min(3, len(rows)), fontsize=8, frameon=False)
    return fig


def scatter_figure(points: Sequence[tuple[CaseResult, Row]], rho: float | None) -> Figure:
    """Predicted vs measured median step time, one point per measured plan, with the y = x line."""
    fig = Figure(figsize=(7, 7.5 if len({c.case.title for c, _ in points}) > 1 else 6), layout="constrained")
    ax = fig.add_subplot()
    xs = [r.step_s for _, r in points]
    ys = [r.measured.median_s for _, r in points]
    lo, hi = min(xs + ys), max(xs + ys)
    log = hi / lo > 4
    titles = list(dict.fromkeys(c.case.title for c, _ in points))
    many = len(titles) > 1
    # Colour says the method, and with several cases the marker says the case (in the legend), so
    # that each point's label is only its error: long labels overlap where plans cluster.
    markers = "osD^vP*X<>"
    seen: set[str] = set()
    for i, (case, row) in enumerate(points):
        color = _method_color(row.method, i)
        marker = markers[titles.index(case.case.title) % len(markers)] if many else "o"
        ax.scatter([row.step_s], [row.measured.median_s], color=color, marker=marker, s=40, zorder=3,
                   label=row.method if row.method not in seen else None)
        seen.add(row.method)
        err = row.error_vs_measured()
        ax.annotate(f"{err:+.0%}" if many else f"{row.method} {err:+.0%}", (row.step_s, row.measured.median_s),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    if many:
        for j, title in enumerate(titles):
            ax.scatter([], [], color="gray", marker=markers[j % len(markers)], s=30, label=title)
    pad = 1.6 if log else 1.15
    ax.plot([lo / pad, hi * pad], [lo / pad, hi * pad], color="gray", linestyle="--", linewidth=0.8, label="measured = predicted")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlim(lo / pad, hi * pad)
    ax.set_ylim(lo / pad, hi * pad)
    ms = FuncFormatter(lambda v, _pos: f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s")
    ax.xaxis.set_major_formatter(ms)
    ax.yaxis.set_major_formatter(ms)
    ax.set_xlabel("predicted step time (simulator)")
    ax.set_ylabel("measured step time (median of warm steps)")
    ax.set_title("Predicted vs measured" + (f": Spearman ρ = {rho:.2f}" if rho is not None else ""), fontsize=10)
    # Outside the axes: inside, it would cover the points and their labels wherever they fall.
    fig.legend(fontsize=8, loc="outside lower center", ncol=2 if many else min(6, len(seen) + 1), frameon=False)
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    return fig


def speedup_figure(cases: Sequence[CaseResult], baselines: Sequence[str]) -> Figure:
    """A table of colours: for each case (row) and baseline (column), baseline step time / ILP step time."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    fig = Figure(figsize=(3.2 + 1.5 * len(baselines), 1.2 + 0.32 * len(cases)), layout="constrained")
    ax = fig.add_subplot()
    grid = [[None] * len(baselines) for _ in cases]
    for j, case in enumerate(cases):
        ilp = case.row("ilp")
        for i, b in enumerate(baselines):
            grid[j][i] = case.speedup(ilp, over=b) if ilp is not None else None
    values = [v for row in grid for v in row if v is not None]
    top = max(values + [2.0])
    norm = LogNorm(vmin=min(values + [1.0]), vmax=top)
    image = [[v if v is not None else math.nan for v in row] for row in grid]
    cmap = colormaps["Greens"].with_extremes(bad="#DDDDDD")
    ax.imshow(image, cmap=cmap, norm=norm, aspect="auto")
    for j, row in enumerate(grid):
        for i, v in enumerate(row):
            text = f"{v:.2f}x" if v is not None else "no plan"
            dark = v is not None and norm(v) > 0.6
            ax.text(i, j, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(baselines)))
    ax.set_xticklabels([f"over {b}" for b in baselines], fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([c.case.title for c in cases], fontsize=8)
    ax.set_title("ILP speedup: the baseline's predicted step time / the ILP's\n"
                 "(no plan: the baseline, or every method, has no plan that fits)", fontsize=10)
    return fig
