"""`autopart plan`'s wall time in two checkouts, alternating, and whether they write the same plan.

A change that only speeds the planner up must leave every plan as it was. This runs the same
`autopart plan ... --json` from checkout A and checkout B (each with its own tree first on the path),
in alternating order over ``--rounds`` rounds, and prints each run's wall time, the median ratio A / B
per case, and whether every run's plan file agrees with the others once their timing fields are
dropped (``solver.wall_s``).

    python -m benchmarks.plan_speed_ab --a /tmp/old --b . --rounds 2 \\
        --case "--model gpt3-175b --cluster dgx-a100-80g --nodes 64 --global-batch 1536" \\
        --case "--model gpt2 --cluster dgx-a100-80g --nodes 2"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(root: Path, case: str, out: Path) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "partitioner.cli", "plan", *shlex.split(case), "--quiet", "--json", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"plan_speed_ab: `{shlex.join(cmd)}` in {root} exited {proc.returncode}: "
                         f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    return wall


def plan_without_timing(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.get("solver", {}).pop("wall_s", None)
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout A (the reference)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B")
    ap.add_argument("--case", action="append", required=True, help="autopart plan's arguments, quoted")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    for root in (args.a, args.b):
        if not (root / "partitioner" / "cli.py").is_file():
            raise SystemExit(f"plan_speed_ab: {root} is not an autopart checkout (no partitioner/cli.py)")
    work = Path(tempfile.mkdtemp(prefix="plan-speed-ab-"))
    print(f"A = {args.a.resolve()}, B = {args.b.resolve()}; plans in {work}")
    for i, case in enumerate(args.case):
        walls: dict[str, list[float]] = {"A": [], "B": []}
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for side in order:
                root = args.a if side == "A" else args.b
                wall = run(root, case, work / f"case{i}-{side}-r{r + 1}.json")
                walls[side].append(wall)
                print(f"  round {r + 1} {side}: {wall:7.2f} s  ({case})", flush=True)
        plans = [plan_without_timing(p) for p in sorted(work.glob(f"case{i}-*.json"))]
        same = all(p == plans[0] for p in plans)
        ratios = [a / b for a, b in zip(walls["A"], walls["B"])]
        print(f"{case}: A {statistics.median(walls['A']):.2f} s, B {statistics.median(walls['B']):.2f} s, "
              f"A / B {statistics.median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
              f"every run the same plan: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
