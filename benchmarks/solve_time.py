"""`autopart plan` once, in this process, with the CPU seconds spent inside CP-SAT's solves.

The issue's figure "gpt3-175b on 64 DGX A100 nodes within 30 s of solver time" asks for CP-SAT's
own share besides the planning command's CPU time. ``CpSolver.solve`` is wrapped (nothing else
changes): each call's process CPU time, and CP-SAT's own ``user_time``/``wall_time`` (elapsed, so
they grow on a loaded machine), are summed. Run it under ``/usr/bin/time -v`` for the whole
process; the arguments are ``autopart plan``'s:

    PYTHONPATH=$PWD /usr/bin/time -v python benchmarks/solve_time.py --model gpt3-175b \\
        --cluster dgx-a100-80g --nodes 64 --global-batch 4096 --json plan.json --force

Results: benchmarks/results/2026-12-05-solve-time-3.md.
"""

import sys
import time

from ortools.sat.python import cp_model

calls = [0, 0.0, 0.0, 0.0]  # count, process CPU inside, CP-SAT user_time, CP-SAT wall_time
_solve = cp_model.CpSolver.solve


def solve(self, *a, **k):
    t = time.process_time()
    out = _solve(self, *a, **k)
    calls[0] += 1
    calls[1] += time.process_time() - t
    calls[2] += self.user_time
    calls[3] += self.wall_time
    return out


cp_model.CpSolver.solve = solve
from partitioner.cli import main  # noqa: E402  (after the wrap, so every solve is counted)

t0 = time.process_time()
rc = main(["plan", *sys.argv[1:]])
print(f"CP-SAT: {calls[0]} solves, {calls[1]:.1f} s process CPU inside Solve, user_time {calls[2]:.1f} s, "
      f"wall_time {calls[3]:.1f} s; process CPU total {time.process_time() - t0:.1f} s", flush=True)
sys.exit(rc)
