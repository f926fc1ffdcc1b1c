"""How far apart calibrations of one quiet machine price the same plans, with one pass and with several
([Note: calibration passes] in partitioner/calibrate.py).

``autopart calibrate --passes 1`` and ``--passes P`` (default 3) run alternately, ``--each`` times each,
one after the other; each fixed plan (a fidelity run's recorded plans, each with the profile cache it was
priced from) is priced again on every calibrated cluster (``autopart plan --plan ... --profile``, a copy
of the cache). Per plan and arm: the predicted steps, their range over the arm's median and the median
absolute deviation from it; per arm the calibrations' compute slowdown and transfer wait. Nothing in
the plans or caches changes between calibrations, so the spread is the calibration's alone.

    python -m benchmarks.calibration_passes --report benchmarks/results/YYYY-MM-DD-calibration-passes.md

Run it with nothing else running: it times the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from benchmarks.fidelity import RunFailed, reprice, run_metered

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "benchmarks" / "results" / "2026-12-07-fidelity-session26"
PLANS = ("gpt2-tiny-pp2-1f1b-r1", "gpt2-tiny-dp2-r1", "llama-tiny-tp2-r1")  # 2-rank plans of three kinds


def figures(cluster: Path) -> tuple[float, float]:
    """(compute slowdown, transfer wait in us) of a calibrated cluster file."""
    o = tomllib.loads(cluster.read_text()).get("overheads", {})
    return o.get("compute_slowdown", 1.0), o.get("p2p_transfer_us", 0.0)


def spread(values: list[float]) -> tuple[float, float]:
    """(max - min) / median, and the median absolute deviation from the median over the median."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m, statistics.median(abs(v / m - 1) for v in values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--each", type=int, default=8, help="calibrations of each arm (default 8)")
    ap.add_argument("--passes", type=int, default=3, help="the passes of the second arm (default 3)")
    ap.add_argument("--plans", type=Path, default=RECORDED,
                    help="a fidelity run's folder: its LAYOUT-rN.plan.json and profile-rN.sqlite")
    ap.add_argument("--plan", action="append", default=None, metavar="SLUG",
                    help=f"a plan of --plans to price (repeatable; default {', '.join(PLANS)})")
    ap.add_argument("--report", type=Path, default=None,
                    help="write the markdown report here, its .json beside, and the calibrated files in a folder of its name")
    args = ap.parse_args(argv)
    if args.each < 2 or args.passes < 2:
        ap.error("--each and --passes: at least 2")
    slugs = args.plan or list(PLANS)
    missing = [s for s in slugs if not (args.plans / f"{s}.plan.json").exists()]
    if missing:
        ap.error(f"--plans {args.plans} has no {', '.join(m + '.plan.json' for m in missing)}")
    if args.report is not None and args.report.exists():
        ap.error(f"--report {args.report} exists; pass another path")
    arms = {1: [], args.passes: []}  # passes -> [(cluster file, seconds, other load)]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i in range(args.each):
            for passes in arms:  # alternately: both arms see the same stretch of the machine
                out = work / f"cal-p{passes}-{i + 1}.toml"
                t0 = time.perf_counter()
                try:
                    _, load = run_metered([sys.executable, "-m", "partitioner", "calibrate", "--nproc-per-node", "2",
                                           "--out", str(out), "--passes", str(passes)], f"calibrate --passes {passes}")
                except RunFailed as exc:
                    print(f"calibration_passes: {exc}", file=sys.stderr)
                    return 1
                arms[passes].append((out, time.perf_counter() - t0, load.fraction if load is not None else None))
                k, wait = figures(out)
                print(f"calibration {i + 1}/{args.each}, --passes {passes}: {arms[passes][-1][1]:.0f} s, "
                      f"compute slowdown {k:.3f}, transfer wait {wait:.0f} us", flush=True)
        clusters = {cal: tomllib.loads(cal.read_text()) for cals in arms.values() for cal, _, _ in cals}
        priced: dict[str, dict[int, list[float]]] = {}
        spreads: dict[tuple[str, int], tuple[float, float]] = {}  # (plan, passes) -> spread() of its prices
        for slug in slugs:
            made = json.loads((args.plans / f"{slug}.plan.json").read_text())
            cache = work / f"profile-{slug}.sqlite"  # a copy: the recorded cache is never written
            shutil.copy(args.plans / f"profile-{slug.rsplit('-', 1)[1]}.sqlite", cache)
            priced[slug] = {}
            for passes, cals in arms.items():
                steps = []
                for cal, _, _ in cals:
                    plan = dict(made, cluster=clusters[cal])  # priced on this calibration
                    steps.append(reprice(plan, made["model"]["name"], cal, cache, work / "in.json", work / "out.json",
                                         f"price {slug} on {cal.name}"))
                priced[slug][passes] = steps
                r, d = spreads[slug, passes] = spread(steps)
                print(f"{slug}, --passes {passes}: {' '.join(f'{s * 1e3:.1f}' for s in steps)} ms; range {r:.0%} "
                      f"of the median, median |deviation| {d:.1%}", flush=True)
        calibrations = {p: [dict(zip(("compute_slowdown", "p2p_transfer_us"), figures(c)), seconds=round(s, 1),
                                 other_load=load, file=c.name) for c, s, load in cals] for p, cals in arms.items()}
        if args.report is not None:  # every calibrated file beside the report: which figure moved can be read back
            keep = args.report.with_suffix("")
            keep.mkdir(parents=True, exist_ok=True)
            for cals in arms.values():
                for cal, _, _ in cals:
                    shutil.copy(cal, keep / cal.name)
    lines = [
        "| plan | --passes | predicted step on each calibration (ms) | range / median | median abs. deviation |",
        "|---|---:|---|---:|---:|",
    ]
    for slug, by in priced.items():
        for passes, steps in by.items():
            r, d = spreads[slug, passes]
            lines.append(f"| {slug} | {passes} | {' '.join(f'{s * 1e3:.1f}' for s in steps)} | {r:.0%} | {d:.1%} |")
    for passes, cals in calibrations.items():
        ks = [c["compute_slowdown"] for c in cals]
        waits = [c["p2p_transfer_us"] for c in cals]
        secs = [c["seconds"] for c in cals]
        lines.append(f"\n--passes {passes}: compute slowdown {min(ks):.3f}-{max(ks):.3f}, transfer wait "
                     f"{min(waits):.0f}-{max(waits):.0f} us, {statistics.median(secs):.0f} s a calibration (median)")
    print("\n".join(lines))
    if args.report is not None:
        command = "python -m benchmarks.calibration_passes " + " ".join(argv if argv is not None else sys.argv[1:])
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(
            "# Calibrations of one quiet machine: the same plans priced on one pass and on several\n\n"
            f"Command: `{command}` (started {started}). Plans and profile caches: `{args.plans}`.\n\n"
            + "\n".join(lines) + "\n")
        args.report.with_suffix(".json").write_text(json.dumps(
            {"command": command, "started": started, "plans": str(args.plans), "priced_s": priced,
             "calibrations": calibrations}, indent=1))
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
