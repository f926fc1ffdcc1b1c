"""Whole-stage fidelity on this CPU: each pipeline stage of a profiled plan, run for real, vs its prediction.

Plans a GPT-2-style model for ``local-cpu:2`` with measured costs
(``--profile``), then runs each stage's blocks together in one process
(``partitioner.profile.measure_blocks``: one micro-batch forward and
backward, with the thread count one rank of that cluster gets) and compares
the measured stage times with the plan's predicted ones. The step is compared
the same way: the schedule simulator run on the *measured* stage times against
the plan's predicted step. Both the ILP's split and the uniform one, each
planned with measured and with analytic (datasheet) costs. Until the runtime (issue 5) runs plans across processes, this is the
single-process stage run the profiler issue asks for.

    python -m benchmarks.stage_fidelity [--clock cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

CONFIG = dict(n_layer=6, n_embd=384, n_head=6, n_positions=512, vocab_size=16000)
SEQ = 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="wall time, or process CPU time (shared machine)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    from cost_models import AnalyticCostModel
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.graph import build_partition_graph
    from partitioner.planner import plan_parallelism
    from partitioner.profile import ProfileCache, ProfileOptions, cpu_threads_for, measure_blocks, profile_for_planning
    from partitioner.simulate import simulate
    from partitioner.zoo import load_model

    cluster = Cluster.local(2)
    lm = load_model("hf:GPT2LMHeadModel", dtype="fp32", config=CONFIG, seq_len=SEQ)
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name="gpt2-6L-d384", batch_size=lm.batch_size)
    pg = build_partition_graph(cap, lm.model)
    opts = ProfileOptions(clock=args.clock)
    rows, steps = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ProfileCache(Path(tmp) / "c.sqlite") as cache:
        prof = profile_for_planning(pg, cluster, cache, opts)
        threads = torch.get_num_threads()
        torch.set_num_threads(cpu_threads_for(cluster))
        try:
            pp, microbatches = 2, 4
            for method in ("ilp", "uniform"):
                for label, cost in (("profiled", prof.cost_model), ("analytic", AnalyticCostModel(cluster))):
                    result = plan_parallelism(pg, cluster=cluster, global_batch=microbatches, dtype="fp32",
                                              cost_model=cost, pp=pp, tp=1, dp=1, microbatches=microbatches,
                                              schedule="1f1b", time_limit_s=20, method=method)
                    plan = result.plan
                    measured = []
                    for st in plan.stages:
                        m = measure_blocks(pg, [pg.block_index(b) for b in st.modules], opts)
                        measured.append((m.forward.median_s, m.backward.median_s))
                        rows.append(dict(method=method, costs=label, stage=st.index, modules=f"{st.modules[0]}..{st.modules[-1]}",
                                         predicted=(st.predicted.forward_s, st.predicted.backward_s), measured=measured[-1]))
                    stage_costs = [
                        replace(c, forward_s=f, backward_s=b)
                        for c, (f, b) in zip(result.evaluator.stage_costs(
                            [_spec(pg, st) for st in plan.stages], plan.mesh, plan.schedule, plan.sharding), measured)
                    ]
                    sim = simulate(stage_costs, plan.schedule.name, plan.schedule.microbatches)
                    steps.append(dict(method=method, costs=label, predicted=plan.predicted.step_time_s,
                                      simulated_from_measured=sim.step_time_s,
                                      split=[st.modules[-1] for st in plan.stages[:-1]]))
        finally:
            torch.set_num_threads(threads)
    wall = time.perf_counter() - started

    print(f"{'method':7s} {'costs':9s} {'stage':>5s} {'modules':34s} {'pred fwd':>9s} {'meas fwd':>9s} {'err':>6s} "
          f"{'pred bwd':>9s} {'meas bwd':>9s} {'err':>6s}")
    for r in rows:
        (pf, pb), (mf, mb) = r["predicted"], r["measured"]
        print(f"{r['method']:7s} {r['costs']:9s} {r['stage']:5d} {r['modules']:34s} {pf * 1e3:8.2f}m {mf * 1e3:8.2f}m "
              f"{(pf - mf) / mf:+6.0%} {pb * 1e3:8.2f}m {mb * 1e3:8.2f}m {(pb - mb) / mb:+6.0%}")
    print()
    for s in steps:
        err = (s["predicted"] - s["simulated_from_measured"]) / s["simulated_from_measured"]
        print(f"{s['method']:7s} {s['costs']:9s} step: predicted {s['predicted'] * 1e3:8.1f} ms, simulator on measured stages "
              f"{s['simulated_from_measured'] * 1e3:8.1f} ms ({err:+.1%}); split after {s['split']}")
    print(f"model {cap.name}, seq {SEQ}, 1 thread per rank, clock {args.clock}, torch {torch.__version__}, {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, steps=steps, clock=args.clock, wall_s=wall,
                                                   config=CONFIG, seq=SEQ, torch=torch.__version__), indent=1))
    return 0


def _spec(pg, stage):
    from partitioner.evaluate import StageSpec

    return StageSpec(tuple(pg.block_index(b) for b in stage.modules), tuple(pg.block_index(b) for b in stage.recompute),
                     stage.selective)


if __name__ == "__main__":
    sys.exit(main())
