"""The ILP's zero-bubble (or ZeRO-3) plan against its best plan without it, both run here (issue 14's CPU figure).

For each case of ``benchmarks.measured_quality`` the ILP plans once with every choice open. Where
its plan uses a schedule that splits the backward (``zb``, ``zbv``, ``dualpipev``), the same model
is planned again by the ILP with the schedule pinned to each one that does not (``gpipe``, ``1f1b``,
``interleaved``; the search still chooses the split, micro-batches and virtual stages), and the
fastest of those predicted plans is "without it": every freedom but the one the comparison is
about. Both plans then run under ``torchrun`` in alternating rounds with ``measured_quality``'s own
``plan_case`` and ``alternate_runs``; the measured ratio without / with is set beside the predicted
one. Where the ILP's plan uses ``dp_sharding`` ``zero3`` the row says so; where it uses neither,
nothing is run.

    python -m benchmarks.zero_bubble_measured [--report benchmarks/results/YYYY-MM-DD-zero-bubble-measured.md] \\
        [--rounds 3] [--steps 4] [--warmup 2] [--only TEXT ...] [--no-calibrate] [--cache PATH] [--force]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from benchmarks.measured_quality import (WORLD, PlanSummary, add_run_arguments, alternate_runs, cases, cluster_said, load,
                                         plan_case, plan_cell, report_path, run_main, start_runs, summarize, write_report)
from partitioner.compare import CaptureCache, Case, CompareError, MeasureSettings, ProfileSettings, machine_info
from partitioner.schedules import REGISTRY as SCHEDULE_REGISTRY

ROOT = Path(__file__).resolve().parents[1]
SPLIT_BACKWARD = tuple(n for n, s in SCHEDULE_REGISTRY.items() if s.splits_backward)
WHOLE_BACKWARD = tuple(n for n, s in SCHEDULE_REGISTRY.items() if not s.splits_backward)


@dataclass(frozen=True, slots=True)
class ZBOutcome:
    """One case: the ILP's free plan, its best plan without the option it chose, and their runs."""

    title: str
    costs: str
    free: PlanSummary | None
    option: str  # "zero-bubble (zb)", "zero3", or "" where the free plan uses neither
    without: PlanSummary | None = None  # the fastest predicted plan with the option pinned out
    without_tried: tuple[str, ...] = ()  # "1f1b: 1533 ms" per pinned re-plan, or its error
    without_steps_s: tuple[tuple[float, ...], ...] = ()
    with_steps_s: tuple[tuple[float, ...], ...] = ()
    note: str = ""

    @property
    def predicted_ratio(self) -> float | None:
        """without / with, predicted: above 1 says the option should pay."""
        return self.without.predicted_s / self.free.predicted_s if self.without and self.free else None

    @property
    def measured_ratio(self) -> float | None:
        w = [t for r in self.without_steps_s for t in r]
        f = [t for r in self.with_steps_s for t in r]
        return statistics.median(w) / statistics.median(f) if w and f else None

    @property
    def round_ratios(self) -> tuple[float, ...]:
        return tuple(statistics.median(w) / statistics.median(f)
                     for w, f in zip(self.without_steps_s, self.with_steps_s) if w and f)


def compare_case(title: str, case: Case, rounds: int, settings: MeasureSettings, profile: ProfileSettings,
                 captures: CaptureCache, work: Path, loads: list[float | None]) -> ZBOutcome:
    res, costs = plan_case(replace(case, label=f"{title} [free]"), ("ilp",), profile, captures, work)
    row = res.row("ilp")
    if not row.ok:
        return ZBOutcome(title, costs, None, "", note=f"no ILP plan: {row.error}")
    free = summarize(row.plan)
    sch = row.plan.schedule.name
    if sch in SPLIT_BACKWARD:
        option = f"zero-bubble ({sch})"
    elif row.plan.training.dp_sharding == "zero3":
        return ZBOutcome(title, costs, free, "zero3", note="ILP chose ZeRO-3; re-planning without it is not "
                         "implemented here (compare.Case has no dp_shardings pin)")
    else:
        return ZBOutcome(title, costs, free, "", note="ILP chose neither a zero-bubble schedule nor ZeRO-3: not run")
    best, best_path, tried = None, None, []
    for base in WHOLE_BACKWARD:
        pinned = replace(case, schedule=base, label=f"{title} [{base}]")
        r, _ = plan_case(pinned, ("ilp",), profile, captures, work)
        prow = r.row("ilp")
        if not prow.ok:
            tried.append(f"{base}: {prow.error}")
            continue
        tried.append(f"{base}: {prow.plan.predicted.step_time_s * 1e3:.0f} ms")
        if best is None or prow.plan.predicted.step_time_s < best.predicted.step_time_s:
            best, best_path = prow.plan, work / "plans" / f"{pinned.slug}-ilp.json"
    if best is None:
        return ZBOutcome(title, costs, free, option, without_tried=tuple(tried), note="no plan without it")
    paths = {"without": best_path, "with": work / "plans" / f"{replace(case, label=f'{title} [free]').slug}-ilp.json"}
    steps, note = alternate_runs(case, paths, rounds, settings, work / "measure", loads)
    return ZBOutcome(title, costs, free, option, summarize(best), tuple(tried), steps["without"], steps["with"], note)


def report_markdown(outs: Sequence[ZBOutcome], command: str, loads: Sequence[float | None], cluster: str,
                    settings: MeasureSettings, rounds: int, wall_s: float, work: str) -> str:
    machine = machine_info()
    ld = ", ".join(f"{x:.1f}" if x is not None else "?" for x in loads)
    lines = [
        "# Zero-bubble / ZeRO-3 plans of the ILP against its best plan without them, run here (issue 14)", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')} UTC, {wall_s:.0f} s).", "",
        f"Machine: {machine.get('cpu')}, {machine.get('cpus')} CPUs, torch {machine.get('torch')}. Cluster for "
        f"planning: `{cluster}`. \"Without\" is the fastest predicted ILP plan with the schedule pinned to each of "
        f"{', '.join(WHOLE_BACKWARD)}. Each plan runs under `torchrun` on {WORLD} ranks (gloo, OMP_NUM_THREADS=1), "
        f"{settings.warmup} warm-up + {settings.steps} measured steps per run, {rounds} rounds alternating the order. "
        "A measured step is the median of a plan's warm steps over all rounds. 1-minute load average at the "
        f"start, before each round and at the end: {ld}. The 2 cores are shared with other engineers' jobs.", "",
        "| case | ILP plan (free) | best plan without it | re-plans tried (predicted step) | predicted without / with "
        "| measured without / with | measured ratio (per round) | predicted / measured - 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outs:
        pred = (f"{o.without.predicted_s * 1e3:.0f} / {o.free.predicted_s * 1e3:.0f} ms = {o.predicted_ratio:.2f}x"
                if o.predicted_ratio else "—")
        m = o.measured_ratio
        if m:
            w = statistics.median(t for r in o.without_steps_s for t in r)
            f = statistics.median(t for r in o.with_steps_s for t in r)
            meas = f"{w * 1e3:.0f} / {f * 1e3:.0f} ms"
            ratio = f"{m:.2f}x ({', '.join(f'{x:.2f}' for x in o.round_ratios)})"
            err = f"{o.predicted_ratio / m - 1:+.1%}"
        else:
            meas, ratio, err = o.note or "—", "—", "—"
        tried = "; ".join(o.without_tried) or "—"
        lines.append(f"| {o.title} | {plan_cell(o.free)} | {plan_cell(o.without) if o.without else '—'} | {tried} | {pred} "
                     f"| {meas} | {ratio} | {err} |")
    chose3 = [o.title for o in outs if o.option == "zero3"]
    lines += ["", "ZeRO-3: " + (f"chosen by the ILP in {', '.join(chose3)}." if chose3 else
                                "the ILP chose it in none of these cases."), "",
              "What priced each case's plans:", ""]
    lines += [f"- {o.title}: {o.costs}" for o in outs]
    lines += ["", f"Plans, logs and run JSON: `{work}` (outside the repository).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.zero_bubble_measured", description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default=None, metavar="PATH.md",
                    help="report to write, with its .json beside it "
                         "(default benchmarks/results/<today>-zero-bubble-measured.md)")
    add_run_arguments(ap)
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="only the cases whose title contains TEXT (repeat for several)")
    return run_main(ap, argv, "zero_bubble_measured", _run)


def _run(args: argparse.Namespace, command: str) -> int:
    report = report_path(args, "zero-bubble-measured")
    todo = cases(None)
    if args.only:
        todo = [(t, c) for t, c in todo if any(o in t for o in args.only)]
        if not todo:
            raise CompareError(f"--only {' '.join(args.only)} matches no case; the cases are "
                               + "; ".join(t for t, _ in cases(None)))
    started = time.perf_counter()
    runs = start_runs(args, "autopart-zero-bubble-measured-")
    outs = []
    for i, (title, case) in enumerate(todo, 1):
        t = time.perf_counter()
        o = compare_case(title, replace(case, cluster=runs.cluster), args.rounds, runs.settings, runs.profile,
                         runs.captures, runs.work / f"case-{i}", runs.loads)
        outs.append(o)
        got = f"measured {o.measured_ratio:.2f}x" if o.measured_ratio else o.note
        pred = f"{o.predicted_ratio:.2f}x" if o.predicted_ratio else "—"
        print(f"[{i}/{len(todo)}] {title}: {o.option or 'neither'}; predicted {pred}, {got}; "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    runs.loads.append(load())
    wall = time.perf_counter() - started
    text = report_markdown(outs, command, runs.loads, cluster_said(args, runs), runs.settings, args.rounds, wall,
                           str(runs.work))
    write_report(report, text, args, runs, command, wall,
                 [dict(asdict(o), predicted_ratio=o.predicted_ratio, measured_ratio=o.measured_ratio,
                       round_ratios=o.round_ratios) for o in outs])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
