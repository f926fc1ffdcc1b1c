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

    python -m benchmarks.recompute [--cases 13b,70b,175b] [--runs before,without,with]
                                   [--mesh-sweep before,...] [--json OUT]

``--runs`` plans only some of the three (the ratios are printed where both of theirs ran).
``--mesh-sweep`` also plans the named runs once per mesh (tp a power of two inside a node, pp
dividing the rest), each with the same pins and budget and the mesh pinned, and keeps the fastest
of those and the free search: a check that a run's figure is not an artifact of where its search
went, since a search that misses a mesh's best plan would show here as a faster pinned plan.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from benchmarks.zero3 import BEFORE, CASES


RUNS = ("before", "without", "with")


def meshes(world: int, per_node: int) -> list[tuple[int, int]]:
    """``(pp, tp)`` of every mesh a sweep pins: tp a power of two inside a node, pp dividing the rest."""
    tps = [t for t in (1, 2, 4, 8, 16) if t <= min(per_node, world) and world % t == 0]
    return [(pp, tp) for tp in tps for pp in range(1, world // tp + 1) if (world // tp) % pp == 0]


def plan_case(name: str, runs: tuple[str, ...] = RUNS, sweep: tuple[str, ...] = ()) -> dict:
    from partitioner.baselines import Pins
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.errors import AutopartError, InfeasibleError
    from partitioner.graph import build_partition_graph
    from partitioner.planner import prepare
    from partitioner.solver import plan_ilp
    from partitioner.zoo import load_model

    case = CASES[name]
    lm = load_model(case.model, device="meta", config=case.config, dtype="bf16")  # as `autopart plan` on an A100
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=case.model, batch_size=lm.batch_size)
    ev = prepare(build_partition_graph(cap, lm.model), cluster=Cluster.preset(case.cluster, case.nodes),
                 global_batch=case.global_batch)
    cluster = ev.cluster
    out = {"case": case.name}
    pins_of = {"before": Pins(dp_shardings=BEFORE, recompute_blocks=False, sequence_parallel=False),
               "without": Pins(recompute_blocks=False), "with": Pins()}
    def best(pins: Pins, tag: str):
        """The free search's plan and, where ``tag`` is swept, each pinned mesh's: the fastest, and
        the sweep's rows (None: not swept)."""
        plans, rows = [], None
        try:
            plans.append(plan_ilp(ev, pins, time_limit_s=case.time_limit_s).plan)
        except InfeasibleError as exc:
            error = str(exc).splitlines()[0]
        if tag in sweep:
            rows = []
            for pp, tp in meshes(cluster.world_size, cluster.devices_per_node):
                try:
                    plan = plan_ilp(ev, replace(pins, pp=pp, tp=tp), time_limit_s=case.time_limit_s).plan
                except AutopartError as exc:  # no plan fits this mesh, or it does not suit the model
                    rows.append(dict(pp=pp, tp=tp, error=str(exc).splitlines()[0]))
                    continue
                plans.append(plan)
                rows.append(dict(pp=pp, tp=tp, step_s=plan.predicted.step_time_s, mesh=str(plan.mesh),
                                 schedule=plan.schedule.name, microbatches=plan.schedule.microbatches))
                print(f"{case.name:32s} {tag:8s} pinned pp={pp} tp={tp}: {plan.predicted.step_time_s:.3f} s", flush=True)
        if not plans:
            return None, rows, error
        return min(plans, key=lambda p: p.predicted.step_time_s), rows, None

    for tag in runs:
        pins = pins_of[tag]
        started = time.perf_counter()
        plan, swept, error = best(pins, tag)
        if plan is None:
            out[tag] = dict(error=error, step_s=float("inf"), **({"sweep": swept} if swept is not None else {}))
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
            **({"sweep": swept} if swept is not None else {}),
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
    ap.add_argument("--mesh-sweep", default="", help="runs to also plan once per pinned mesh, keeping the fastest")
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
    sweep = tuple(r for r in args.mesh_sweep.split(",") if r)
    if any(r not in runs for r in sweep):
        print(f"--mesh-sweep: {next(r for r in sweep if r not in runs)!r} is not among --runs ({', '.join(runs)})",
              file=sys.stderr)
        return 2
    rows = []
    for name in names:
        row = plan_case(name, runs, sweep)
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
