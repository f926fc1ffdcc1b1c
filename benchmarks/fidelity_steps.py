"""A fidelity run's predicted step against the mean, the median and the fastest of its measured steps.

``benchmarks/fidelity.py`` scores a prediction against the mean of a run's timed steps (what a step
costs over a training run). This reads the run files such a run keeps (``LAYOUT-rN.run.json`` in its
results folder) and scores the same predictions, each layout's mean over its rounds, against the
runs' median and fastest steps too: where the prediction meets the fastest steps and misses the
typical ones, what is missing is interference from step to step rather than a cost of every step.

    python -m benchmarks.fidelity_steps benchmarks/results/2026-12-05-fidelity-session10-a [...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

STATISTICS = {"mean": statistics.fmean, "median": statistics.median, "fastest": min}


def errors(folder: Path) -> dict[str, dict[str, float]]:
    """Layout -> statistic -> the mean prediction over the mean of that statistic of its rounds, less 1."""
    runs: dict[str, list[tuple[float, list[float]]]] = defaultdict(list)
    for path in sorted(folder.glob("*-r[0-9].run.json")):
        data = json.loads(path.read_text())
        runs[path.name.rsplit("-r", 1)[0]].append((data["plan_data"]["predicted"]["step_time_s"], data["step_times_s"]))
    if not runs:
        raise SystemExit(f"fidelity_steps: {folder} holds no LAYOUT-rN.run.json files of a fidelity run")
    out = {}
    for layout, rounds in runs.items():
        predicted = statistics.fmean(p for p, _ in rounds)
        out[layout] = {name: predicted / statistics.fmean(f(steps) for _, steps in rounds) - 1 for name, f in STATISTICS.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="a fidelity run's results folder (its plans and run files)")
    args = ap.parse_args(argv)
    for folder in args.folders:
        table = errors(folder)
        print(f"{folder.name}: prediction / measured - 1, against each statistic of the timed steps")
        for layout, e in table.items():
            print(f"  {layout:36s} " + "  ".join(f"{name} {x:+.1%}" for name, x in e.items()))
        print("  median |error| (worst): " + "; ".join(
            f"{name} {statistics.median(abs(e[name]) for e in table.values()):.1%} "
            f"({max(abs(e[name]) for e in table.values()):.1%})" for name in STATISTICS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
