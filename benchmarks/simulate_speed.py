"""Wall time of the event simulator on large schedules (tests check its results, never its speed).

Replays every schedule of the registry on equal stages at a size far beyond
any plan the search prices (64 ranks, 512 micro-batches, 4 stages per rank
where the schedule takes several), best of ``--repeat`` runs each, and prints
the events replayed and the seconds. A quadratic regression in the
simulator's event loop shows here as minutes instead of seconds.

    python -m benchmarks.simulate_speed [--ranks 64] [--microbatches 512] [--chunks 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from partitioner.schedules import REGISTRY, check_schedule
from partitioner.simulate import StageCost, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=64, help="pipeline ranks (default 64)")
    ap.add_argument("--microbatches", type=int, default=512, help="micro-batches (default 512)")
    ap.add_argument("--chunks", type=int, default=4, help="stages per rank where any number runs (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per schedule; the best is printed (default 3)")
    args = ap.parse_args()
    print(f"{'schedule':<12} {'stages':>7} {'events':>9} {'best s':>8}")
    for name, sp in REGISTRY.items():
        v = sp.virtual_stages or args.chunks
        check_schedule(name, args.ranks, args.microbatches, v)
        costs = [StageCost(1.0 / v, 2.0 / v, backward_weight_s=1.0 / v if sp.splits_backward else 0.0)
                 for _ in range(args.ranks * v)]
        best = float("inf")
        for _ in range(args.repeat):
            began = time.perf_counter()
            result = simulate(costs, name, args.microbatches, virtual_stages=v)
            best = min(best, time.perf_counter() - began)
        print(f"{name:<12} {args.ranks * v:>7} {len(result.events):>9} {best:>8.2f}")


if __name__ == "__main__":
    main()
