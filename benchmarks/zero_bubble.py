"""Where the bubble binds: predicted bubble and step time of the zero-bubble schedules vs 1F1B.

Plans one model on one node of 8 devices as an 8-deep pipeline with few
micro-batches (pp = 8, M = 8 .. 32), where 1F1B idles a large part of each
step. For each M the same stage split (the ``uniform`` baseline's: equal
layers per stage) is priced under every schedule that runs it, so the rows
differ only in the schedule: ``1f1b`` against ``zb`` on 8 stages, and
``interleaved`` against ``zb``, ``zbv`` and ``dualpipev`` on 16 (two per
rank). The figures are the simulator's (predicted); the weight-gradient share
of the backward is ``evaluate.WEIGHT_GRAD_SHARE``. Then the ILP planner, free
to choose its schedule, and pinned to 1F1B, for the same pp and M: does it
pick a zero-bubble schedule, and what does that buy?

    python -m benchmarks.zero_bubble [--model gpt2-xl] [--cluster dgx-h100] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def idle_s(sim) -> float:  # type: ignore[no-untyped-def]
    """The bubble in seconds: the pipeline's span less the mean rank's compute (= fraction x span)."""
    return sim.pipeline_time_s - sum(sim.busy_s) / len(sim.busy_s)


def schedule_idle_s(sim) -> float:  # type: ignore[no-untyped-def]
    """The schedule's bubble: the span less the busiest rank's compute, what no split can remove.

    ``idle_s`` is this plus ``imbalance_s``. The split's imbalance (the uniform split gives the
    first and last stages the embedding and the head) grows with M, as every lighter rank idles
    its difference each micro-batch; the schedule's bubble (warm-up and cool-down) does not, and
    it is what a zero-bubble schedule removes.
    """
    return sim.pipeline_time_s - max(sim.busy_s)


def imbalance_s(sim) -> float:  # type: ignore[no-untyped-def]
    """The split's share of the bubble: the busiest rank's compute less the mean rank's."""
    return max(sim.busy_s) - sum(sim.busy_s) / len(sim.busy_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-xl", help="a zoo model (default gpt2-xl, 48 layers)")
    ap.add_argument("--cluster", default="dgx-h100", help="a cluster preset; one node is used")
    ap.add_argument("--pp", type=int, default=8, help="pipeline depth (default 8)")
    ap.add_argument("--microbatches", default="8,16,32", help="micro-batch counts to try (default 8,16,32)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds for each ILP search (default 20)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    from partitioner.baselines import Pins, plan_baseline
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.errors import AutopartError
    from partitioner.graph import build_partition_graph
    from partitioner.planner import prepare
    from partitioner.solver import plan_ilp
    from partitioner.zoo import load_model

    cluster = Cluster.preset(args.cluster, 1)
    lm = load_model(args.model, device="meta")
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=args.model, batch_size=lm.batch_size)
    pg = build_partition_graph(cap, lm.model)
    pp, world = args.pp, cluster.world_size
    if world % pp:
        print(f"--pp {pp} does not divide the {world} devices of one {args.cluster} node", file=sys.stderr)
        return 2
    dp = world // pp
    rows, ilp_rows = [], []
    groups = (("1f1b", 1), ("zb", 1)), (("interleaved", 2), ("zb", 2), ("zbv", 2), ("dualpipev", 2))
    for m in (int(x) for x in args.microbatches.split(",")):
        ev = prepare(pg, cluster=cluster, global_batch=m * dp)
        for group in groups:
            ref = None
            for name, v in group:
                try:
                    plan, sim = plan_baseline("uniform", ev, Pins(pp=pp, dp=dp, microbatches=m, schedule=name,
                                                                  virtual_stages=v, recompute=False))
                except AutopartError as exc:
                    rows.append(dict(microbatches=m, schedule=name, v=v, error=str(exc).splitlines()[0]))
                    continue
                ref = ref or sim
                rows.append(dict(
                    microbatches=m, schedule=name, v=v, step_s=plan.predicted.step_time_s,
                    bubble=sim.bubble_fraction, bubble_s=idle_s(sim), vs_base=idle_s(sim) / idle_s(ref),
                    fraction_vs_base=sim.bubble_fraction / ref.bubble_fraction,
                    schedule_bubble_s=schedule_idle_s(sim), imbalance_s=imbalance_s(sim),
                    schedule_vs_base=schedule_idle_s(sim) / schedule_idle_s(ref),
                    speedup=ref.step_time_s / sim.step_time_s, peak_gib=max(sim.peak_memory_bytes) / 2**30,
                    fits=plan.predicted.fits, stages=[list(st.modules) for st in plan.stages][:1],
                ))
        for pinned in (None, "1f1b"):
            started = time.perf_counter()
            res = plan_ilp(ev, Pins(pp=pp, dp=dp, microbatches=m, schedule=pinned), time_limit_s=args.time_limit)
            p = res.plan
            ilp_rows.append(dict(
                microbatches=m, pinned=pinned or "free", schedule=p.schedule.name, v=p.schedule.virtual_stages,
                step_s=p.predicted.step_time_s, bubble=p.predicted.bubble_fraction, status=p.solver.status,
                wall_s=time.perf_counter() - started,
            ))

    print(f"{args.model} on 1x {args.cluster}: pp={pp}, dp={dp}, tp=1, uniform split, predicted\n")
    print("Bubble: idle seconds per rank (span less mean compute) and as a fraction of the span; 'vs base'")
    print("divides by the first row of its group (1f1b for v=1, interleaved for v=2). The bubble is the sum of")
    print("the schedule's (span less the busiest rank's compute: warm-up and cool-down, what a schedule")
    print("can remove) and the split's imbalance (the busiest rank's compute less the mean rank's).\n")
    print("| M | schedule | v | step (s) | bubble (ms) | vs base | schedule's bubble (ms) | vs base | imbalance (ms) "
          "| bubble fraction | vs base | speed-up | peak mem (GiB) | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['microbatches']} | {r['schedule']} | {r['v']} | - | - | - | - | - | - | - | - | - | - | {r['error']} |")
            continue
        print(f"| {r['microbatches']} | {r['schedule']} | {r['v']} | {r['step_s']:.4f} | {r['bubble_s'] * 1e3:.1f} | "
              f"{r['vs_base']:.2f}x | {r['schedule_bubble_s'] * 1e3:.1f} | {r['schedule_vs_base']:.2f}x | "
              f"{r['imbalance_s'] * 1e3:.1f} | {r['bubble']:.1%} | {r['fraction_vs_base']:.2f}x | {r['speedup']:.3f}x | "
              f"{r['peak_gib']:.1f} | {'yes' if r['fits'] else 'no'} |")
    print("\nILP planner (same pp, dp, M; recompute and split its own choice):\n")
    print("| M | schedule pin | chosen | v | step (s) | bubble | status |")
    print("|---|---|---|---|---|---|---|")
    for r in ilp_rows:
        print(f"| {r['microbatches']} | {r['pinned']} | {r['schedule']} | {r['v']} | {r['step_s']:.4f} | "
              f"{r['bubble']:.1%} | {r['status']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, cluster=args.cluster, pp=pp, dp=dp, rows=rows, ilp=ilp_rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
