"""ILP planning speed at scale: gpt3-175b (global batch 1536, seq 2048) on 64 nodes of DGX A100 80GB.

Target (issue: ILP planner): the full search (mesh, micro-batches, schedule,
shards, recompute) in at most 30 s of solver time on 2 cores after capture,
peak RSS under 8 GB; the predicted MFU in the range published runs report
(Megatron-LM: 44-52% of peak on A100 at these scales).

    python -m benchmarks.ilp_speed [--nodes 64] [--time-limit 30]
"""

from __future__ import annotations

import argparse
import resource
import time

from partitioner.baselines import METHODS, plan_baseline
from partitioner.capture import capture
from partitioner.cluster import Cluster
from partitioner.errors import AutopartError
from partitioner.planner import prepare
from partitioner.solver import plan_ilp
from partitioner.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt3-175b")
    ap.add_argument("--cluster", default="dgx-a100-80g")
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=1536)
    ap.add_argument("--time-limit", type=float, default=30.0)
    args = ap.parse_args()
    t = time.perf_counter()
    lm = load_model(args.model, dtype="bf16")
    cap = capture(lm.model, lm.example_inputs, name=args.model, batch_size=lm.batch_size)
    ev = prepare(cap, cluster=Cluster.preset(args.cluster, args.nodes), global_batch=args.global_batch)
    print(f"capture + blocks: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    res = plan_ilp(ev, time_limit_s=args.time_limit)
    solver_s = time.perf_counter() - t
    p, rep = res.plan, res.report
    print(
        f"ilp: {p.mesh} {p.schedule.name} mbs={p.schedule.micro_batch_size} x{p.schedule.microbatches}, "
        f"recompute on {sum(s.recomputes for s in p.stages)}/{len(p.stages)} stages; "
        f"step {p.predicted.step_time_s:.2f} s (ILP objective {p.solver.objective:.2f} s, "
        f"{p.solver.objective / p.predicted.step_time_s - 1:+.2%}), MFU {p.predicted.mfu:.1%}, "
        f"peak memory {p.predicted.peak_memory_bytes / 2**30:.1f} GiB"
    )
    print(
        f"solver time {solver_s:.1f} s; {p.solver.status}, bound {rep.bound_s:.2f} s, gap {rep.gap:.1%}; "
        f"{rep.candidates} candidates, {rep.pruned_memory} dropped for memory, {rep.pruned_bound} by bound, "
        f"{len(rep.attempts)} CP-SAT solves, {rep.sharding_solves} block-sharding solves"
    )
    for method in METHODS:
        try:
            b, _ = plan_baseline(method, ev)
            print(f"  {method:10s} {str(b.mesh):20s} step {b.predicted.step_time_s:.2f} s "
                  f"({b.predicted.step_time_s / p.predicted.step_time_s:.2f}x the ilp's), MFU {b.predicted.mfu:.1%}")
        except AutopartError as exc:
            print(f"  {method:10s} no plan: {str(exc)[:110]}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
