"""One headline over matrix reports written piece by piece (``run_matrix --only MODEL`` per model).

On shared cores the whole matrix can outlast a session; running it a model at a time keeps every
finished model's report. This reads those reports' JSON and prints the headline the full run would
have printed: the ILP's predicted speedup over ``expert`` counting only its own solves (a seed that
no solve beat counts as no gain), overall and on the models ``matrix.toml`` marks ``unlike``; how
often the solve beat the best seed and by how much; each baseline against ``expert``.

    python -m benchmarks.matrix_summary benchmarks/results/2026-12-04-matrix [--matrix benchmarks/matrix.toml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.run_matrix import MATRIX, load_matrix


def _geomean(xs: Sequence[float]) -> float | None:
    return statistics.geometric_mean(xs) if xs else None


def _fits(row: dict[str, Any] | None) -> bool:
    return bool(row and not row.get("error") and row["predicted"]["fits"])


def summarize(cases: Sequence[dict[str, Any]], unlike: frozenset[str]) -> str:
    lines = []
    for label, group in (("all cases", cases), ("unlike-layer models", [c for c in cases if c["title"] in unlike])):
        own, planner, gains = [], [], []
        wins = n = 0
        for c in group:
            rows = {r["method"]: r for r in c["rows"]}
            ilp, ref = rows.get("ilp"), rows.get("expert")
            if not (_fits(ilp) and _fits(ref)):
                continue
            n += 1
            ratio = ref["predicted"]["step_time_s"] / ilp["predicted"]["step_time_s"]
            planner.append(ratio)
            if ilp["solver"].get("origin") == "ilp":
                wins += 1
                own.append(ratio)
                gains.append(ilp["solver"]["seed_step_s"] / ilp["predicted"]["step_time_s"])
            else:
                own.append(min(1.0, ratio))
        fmt = lambda x: f"{x:.3f}x" if x is not None else "n/a"  # noqa: E731
        lines.append(
            f"- {label} ({n} cases with a fitting ILP and expert plan): ILP's own solves over expert "
            f"**{fmt(_geomean(own))}** geomean; the solve beat the best seed in {wins} of {n} cases"
            + (f" (by {fmt(_geomean(gains))} geomean, at most {fmt(max(gains))})" if gains else "")
            + f"; with seeds counted, {fmt(_geomean(planner))}."
        )
    methods = sorted({r["method"] for c in cases for r in c["rows"]} - {"ilp", "expert"})
    for m in methods:
        ratios = []
        for c in cases:
            rows = {r["method"]: r for r in c["rows"]}
            if _fits(rows.get(m)) and _fits(rows.get("expert")):
                ratios.append(rows["expert"]["predicted"]["step_time_s"] / rows[m]["predicted"]["step_time_s"])
        g = _geomean(ratios)
        lines.append(f"- {m} over expert: {g:.3f}x geomean over {len(ratios)} cases." if g else f"- {m}: no case.")
    walls = sorted(r["solver"]["wall_s"] for c in cases for r in c["rows"] if r["method"] == "ilp" and not r.get("error"))
    if walls:
        lines.append(f"- ILP planning wall time (seeds included, shared cores): median {walls[len(walls) // 2]:.1f} s, "
                     f"max {walls[-1]:.1f} s over {len(walls)} cases.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="folder of run_matrix reports (their .json files are read)")
    ap.add_argument("--matrix", default=str(MATRIX), help="matrix TOML that marks the unlike-layer models")
    args = ap.parse_args(argv)
    files = sorted(Path(args.folder).glob("*.json"))
    if not files:
        print(f"matrix_summary: error: no .json report in {args.folder}; run benchmarks.run_matrix first", file=sys.stderr)
        return 2
    cases = [c for f in files for c in json.loads(f.read_text())["cases"]]
    print(f"{len(cases)} cases from {len(files)} reports")
    print(summarize(cases, load_matrix(args.matrix).unlike))
    return 0


if __name__ == "__main__":
    sys.exit(main())
