"""Predicted step time and peak memory of a tp=8 plan with and without sequence parallelism.

One case: Llama-2 13B's shape on one node of 8 A100-40GB, one pipeline stage, tp=8, micro-batches of
one sample, no recomputation. The same manual plan (Megatron's layout; ``manual_plan``) is priced
twice: as it is, and with Megatron's ``--sequence-parallel`` layout ([Note: sequence
parallelism] in partitioner/tp_strategies.py). With ``--ilp``, the ILP search (``plan_ilp``)
also plans the same mesh (tp=8, one stage) twice, free to choose sequence parallelism per node
and with it ruled out (``Pins(sequence_parallel=False)``), each choosing its own micro-batching and
recomputation. The figures are the simulator's (predicted).

    python -m benchmarks.sequence_parallel [--global-batch 32] [--ilp] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# Llama 2 13B's shape (40 x 5120, 40 heads) on the Llama 2 7B zoo entry, as benchmarks/zero3.py.
LLAMA13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40)


def run(global_batch: int, ilp: bool = False) -> list[dict]:
    from partitioner.baselines import Pins
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.graph import build_partition_graph
    from partitioner.errors import InfeasibleError
    from partitioner.planner import manual_plan, prepare
    from partitioner.solver import plan_ilp
    from partitioner.zoo import load_model

    lm = load_model("llama2-7b", device="meta", config=LLAMA13B, dtype="bf16")
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name="llama2-13b", batch_size=lm.batch_size)
    ev = prepare(build_partition_graph(cap, lm.model), cluster=Cluster.preset("dgx-a100-40g", 1),
                 global_batch=global_batch)
    rows = []
    for method in ("manual", "ilp") if ilp else ("manual",):
        for sp in (False, True):
            started = time.perf_counter()
            if method == "manual":
                pins = Pins(pp=1, tp=8, dp=1, microbatches=global_batch, recompute=False, sequence_parallel=sp)
                plan, sim = manual_plan(ev, [], pins)
            else:  # None: the ILP may choose it; False: ruled out
                try:
                    result = plan_ilp(ev, Pins(pp=1, tp=8, dp=1, sequence_parallel=None if sp else False), 60.0)
                except InfeasibleError as exc:
                    rows.append(dict(method=method, sequence_parallel=sp, error=str(exc).splitlines()[0]))
                    continue
                plan, sim = result.plan, result.sim
            p = plan.predicted
            rows.append(dict(
                method=method, sequence_parallel=sp, mesh=str(plan.mesh), microbatches=plan.schedule.microbatches,
                micro_batch_size=plan.schedule.micro_batch_size,
                recompute=f"{sum(s.recomputes for s in plan.stages)}/{len(plan.stages)}",
                step_s=p.step_time_s, peak_gib=p.peak_memory_bytes / 2**30, limit_gib=p.memory_limit_bytes / 2**30,
                activation_gib=sim.peak_activation_bytes[0] / 2**30, static_gib=sim.peak_parts[0].static / 2**30,
                strategies=sorted(set(plan.sharding.values())), wall_s=time.perf_counter() - started,
            ))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--global-batch", type=int, default=32, help="samples per step (default 32)")
    ap.add_argument("--ilp", action="store_true", help="also plan the mesh with the ILP search, with and without SP")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.global_batch < 1:
        print("--global-batch must be at least 1", file=sys.stderr)
        return 2
    rows = run(args.global_batch, args.ilp)
    for r in rows:
        head = f"Llama-2 13B, 1 x 8 A100-40GB  {r['method']:6s} sequence parallel {'on ' if r['sequence_parallel'] else 'off'}"
        if "error" in r:
            print(f"{head}  {r['error']}", flush=True)
            continue
        print(f"{head}  {r['mesh']:16s} {r['microbatches']:3d}x{r['micro_batch_size']} recompute {r['recompute']}"
              f"  step {r['step_s']:7.3f} s  peak {r['peak_gib']:5.1f}/{r['limit_gib']:.0f} GiB"
              f"  (activations {r['activation_gib']:5.2f} GiB, static {r['static_gib']:5.2f} GiB)"
              f"  {'+'.join(s for s in r['strategies'] if s in ('seq', 'row_seq')) or '-'}", flush=True)
    for i in range(0, len(rows), 2):
        off, on = rows[i], rows[i + 1]
        if "error" not in off and "error" not in on:
            print(f"{off['method']}: sequence parallelism: step x{on['step_s'] / off['step_s']:.3f}, "
                  f"activations x{on['activation_gib'] / off['activation_gib']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
