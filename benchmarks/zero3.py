"""Where memory binds: the ILP's plan with ZeRO-2/3 and HSDP against the same search without them.

For each case (a model on a cluster whose memory binds), the ILP search
(``plan_ilp``, with the baselines as its seeds) plans twice under the same
deterministic budget: once free to choose any data-parallel sharding level
(``none``, ``zero1``, ``zero2``, ``zero3``, ``hsdp``; partitioner/dp_sharding.py)
and once limited to ``none`` and ``zero1``, the search space before ZeRO-2/3
existed. The figures are the simulator's (predicted); the overlap of FSDP's
collectives with compute is the assumption in docs/solver.md ("Sharded data
parallelism").

    python -m benchmarks.zero3 [--cases 13b,70b,175b] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    """One planning problem."""

    name: str
    model: str  # a zoo name
    config: dict = field(default_factory=dict)  # overrides of the zoo config
    cluster: str = "dgx-a100-80g"
    nodes: int = 1
    global_batch: int = 32
    time_limit_s: float = 20.0


# Llama 2 13B's shape (40 x 5120, 40 heads) on the Llama 2 7B zoo entry.
LLAMA13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40)
CASES = {
    "13b": Case("Llama-2 13B, 1 x 8 A100-40GB", "llama2-7b", LLAMA13B, "dgx-a100-40g", 1, 32, 20.0),
    "70b": Case("Llama-2 70B, 2 x 8 A100-80GB", "llama2-70b", {}, "dgx-a100-80g", 2, 32, 20.0),
    "175b": Case("GPT-3 175B, 8 x 8 A100-80GB", "gpt3-175b", {}, "dgx-a100-80g", 8, 192, 30.0),
}
BEFORE = ("none", "zero1")  # the levels the search chose from before ZeRO-2/3 and HSDP


def plan_case(case: Case) -> dict:
    from partitioner.baselines import Pins
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.errors import InfeasibleError
    from partitioner.graph import build_partition_graph
    from partitioner.planner import prepare
    from partitioner.solver import plan_ilp
    from partitioner.zoo import load_model

    lm = load_model(case.model, device="meta", config=case.config, dtype="bf16")  # as `autopart plan` on an A100
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=case.model, batch_size=lm.batch_size)
    ev = prepare(build_partition_graph(cap, lm.model), cluster=Cluster.preset(case.cluster, case.nodes),
                 global_batch=case.global_batch)
    out = {"case": case.name}
    for tag, pins in (("without", Pins(dp_shardings=BEFORE)), ("with", Pins())):
        started = time.perf_counter()
        try:
            plan = plan_ilp(ev, pins, time_limit_s=case.time_limit_s).plan
        except InfeasibleError as exc:
            out[tag] = dict(error=str(exc).splitlines()[0], step_s=float("inf"))
            continue
        p = plan.predicted
        out[tag] = dict(
            mesh=str(plan.mesh), schedule=plan.schedule.name, microbatches=plan.schedule.microbatches,
            micro_batch_size=plan.schedule.micro_batch_size, virtual_stages=plan.schedule.virtual_stages,
            dp_sharding=plan.training.dp_sharding, recompute=f"{sum(s.recomputes for s in plan.stages)}/{len(plan.stages)}",
            step_s=p.step_time_s, peak_gib=p.peak_memory_bytes / 2**30, limit_gib=p.memory_limit_bytes / 2**30,
            bubble=p.bubble_fraction, origin=plan.solver.origin, status=plan.solver.status,
            wall_s=time.perf_counter() - started,
        )
    out["speedup"] = out["without"]["step_s"] / out["with"]["step_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"which cases (default all: {','.join(CASES)})")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"--cases: unknown case {unknown[0]!r}; cases are {', '.join(CASES)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        row = plan_case(CASES[name])
        rows.append(row)
        for tag in ("without", "with"):
            r = row[tag]
            if "error" in r:
                print(f"{row['case']:32s} {tag:8s} {r['error']}", flush=True)
                continue
            print(f"{row['case']:32s} {tag:8s} {r['mesh']:18s} {r['schedule']:11s} {r['microbatches']:3d}x{r['micro_batch_size']}"
                  f" v={r['virtual_stages']} {r['dp_sharding']:5s} recompute {r['recompute']:5s} step {r['step_s']:8.3f} s"
                  f"  peak {r['peak_gib']:5.1f}/{r['limit_gib']:.0f} GiB  bubble {r['bubble']:5.1%}  from {r['origin']}",
                  flush=True)
        print(f"{row['case']:32s} speedup {row['speedup']:.3f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
