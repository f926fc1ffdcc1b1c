"""Where memory binds: the ILP's plan with recomputation per block and selective recomputation
against the same search with whole-stage recomputation only.

For each case (a model on a cluster whose memory binds), the ILP search (``plan_ilp``, with
the baselines as its seeds) plans twice under the same deterministic budget: **with** = free
to re-choose recomputation per block and selectively ([Note: recompute per block in the
search] in partitioner/solver/search.py), and **without** = ``Pins(recompute_blocks=False)``,
whole stages only, as before. Both runs may choose every data-parallel sharding level (the
ZeRO-2/3 comparison is benchmarks/zero3.py). A third line, **before**, also limits the
sharding levels to ``none`` and ``zero1`` and keeps sequence parallelism out: the search space
before issue 14 (but for the zero-bubble schedules, which no pin turns off), so that
``before / with`` is what the new options of issue 14 (ZeRO-2/3, HSDP, recomputation per block,
selective, sequence parallelism) buy together. The figures are the simulator's (predicted).

    python -m benchmarks.recompute [--cases 13b,70b,175b] [--runs before,without,with] [--json OUT]

``--runs`` plans only some of the three (the ratios are printed where both of theirs ran).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.zero3 import BEFORE, CASES


RUNS = ("before", "without", "with")


def plan_case(name: str, runs: tuple[str, ...] = RUNS) -> dict:
    from partitioner.baselines import Pins
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.errors import InfeasibleError
    from partitioner.graph import build_partition_graph
    from partitioner.planner import prepare
    from partitioner.solver import plan_ilp
    from partitioner.zoo import load_model

    case = CASES[name]
    lm = load_model(case.model, device="meta", config=case.config, dtype="bf16")  # as `autopart plan` on an A100
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=case.model, batch_size=lm.batch_size)
    ev = prepare(build_partition_graph(cap, lm.model), cluster=Cluster.preset(case.cluster, case.nodes),
                 global_batch=case.global_batch)
    out = {"case": case.name}
    pins_of = {"before": Pins(dp_shardings=BEFORE, recompute_blocks=False, sequence_parallel=False),
               "without": Pins(recompute_blocks=False), "with": Pins()}
    for tag in runs:
        pins = pins_of[tag]
        started = time.perf_counter()
        try:
            plan = plan_ilp(ev, pins, time_limit_s=case.time_limit_s).plan
        except InfeasibleError as exc:
            out[tag] = dict(error=str(exc).splitlines()[0], step_s=float("inf"))
            continue
        p = plan.predicted
        blocks = sum(len(s.modules) for s in plan.stages)
        out[tag] = dict(
            mesh=str(plan.mesh), schedule=plan.schedule.name, microbatches=plan.schedule.microbatches,
            micro_batch_size=plan.schedule.micro_batch_size, virtual_stages=plan.schedule.virtual_stages,
            dp_sharding=plan.training.dp_sharding,
            recompute=f"{sum(len(s.recompute) for s in plan.stages)}/{blocks}",
            selective=f"{sum(s.selective for s in plan.stages)}/{len(plan.stages)}",
            per_stage=[len(s.recompute) for s in plan.stages],
            sequence_parallel=sum(v in ("seq", "row_seq") for v in plan.sharding.values()),
            step_s=p.step_time_s, peak_gib=p.peak_memory_bytes / 2**30, limit_gib=p.memory_limit_bytes / 2**30,
            bubble=p.bubble_fraction, origin=plan.solver.origin, status=plan.solver.status,
            wall_s=time.perf_counter() - started,
        )
    if "with" in out and "without" in out:
        out["speedup"] = out["without"]["step_s"] / out["with"]["step_s"]
    if "with" in out and "before" in out:
        out["speedup_all"] = out["before"]["step_s"] / out["with"]["step_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"which cases (default all: {','.join(CASES)})")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"which runs (default all: {','.join(RUNS)})")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"--cases: unknown case {unknown[0]!r}; cases are {', '.join(CASES)}", file=sys.stderr)
        return 2
    runs = tuple(r for r in args.runs.split(",") if r)
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        print(f"--runs: unknown run {bad[0] if bad else ''!r}; runs are {', '.join(RUNS)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        row = plan_case(name, runs)
        rows.append(row)
        for tag in runs:
            r = row[tag]
            if "error" in r:
                print(f"{row['case']:32s} {tag:8s} {r['error']}", flush=True)
                continue
            print(f"{row['case']:32s} {tag:8s} {r['mesh']:18s} {r['schedule']:11s} {r['microbatches']:3d}x{r['micro_batch_size']}"
                  f" v={r['virtual_stages']} {r['dp_sharding']:5s} recompute {r['recompute']:7s} selective {r['selective']:5s}"
                  f" sp nodes {r['sequence_parallel']:4d}"
                  f" step {r['step_s']:8.3f} s  peak {r['peak_gib']:5.1f}/{r['limit_gib']:.0f} GiB"
                  f"  bubble {r['bubble']:5.1%}  from {r['origin']} ({r['status']}, {r['wall_s']:.0f} s)", flush=True)
        if "speedup" in row and "speedup_all" in row:
            print(f"{row['case']:32s} speedup {row['speedup']:.3f}x (without / with), "
                  f"{row['speedup_all']:.3f}x (before / with)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
