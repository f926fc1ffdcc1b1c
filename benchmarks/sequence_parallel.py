"""Predicted step time and peak memory of a tp=8 plan with and without sequence parallelism.

One case: Llama-2 13B's shape on one node of 8 A100-40GB, one pipeline stage, tp=8, micro-batches of
one sample, no recomputation. The same manual plan (Megatron's layout; ``manual_plan``) is priced
twice: as it is, and with Megatron's ``--sequence-parallel`` layout ([Note: sequence
parallelism] in partitioner/tp_strategies.py). The figures are the simulator's (predicted).

    python -m benchmarks.sequence_parallel [--global-batch 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# Llama 2 13B's shape (40 x 5120, 40 heads) on the Llama 2 7B zoo entry, as benchmarks/zero3.py.
LLAMA13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40)


def run(global_batch: int) -> list[dict]:
    from partitioner.baselines import Pins
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.graph import build_partition_graph
    from partitioner.planner import manual_plan, prepare
    from partitioner.zoo import load_model

    lm = load_model("llama2-7b", device="meta", config=LLAMA13B, dtype="bf16")
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name="llama2-13b", batch_size=lm.batch_size)
    ev = prepare(build_partition_graph(cap, lm.model), cluster=Cluster.preset("dgx-a100-40g", 1),
                 global_batch=global_batch)
    rows = []
    for sp in (False, True):
        started = time.perf_counter()
        pins = Pins(pp=1, tp=8, dp=1, microbatches=global_batch, recompute=False, sequence_parallel=sp)
        plan, sim = manual_plan(ev, [], pins)
        p = plan.predicted
        rows.append(dict(
            sequence_parallel=sp, mesh=str(plan.mesh), microbatches=plan.schedule.microbatches,
            step_s=p.step_time_s, peak_gib=p.peak_memory_bytes / 2**30, limit_gib=p.memory_limit_bytes / 2**30,
            activation_gib=sim.peak_activation_bytes[0] / 2**30, static_gib=sim.peak_parts[0].static / 2**30,
            strategies=sorted(set(plan.sharding.values())), wall_s=time.perf_counter() - started,
        ))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--global-batch", type=int, default=32, help="samples per step (default 32)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.global_batch < 1:
        print("--global-batch must be at least 1", file=sys.stderr)
        return 2
    rows = run(args.global_batch)
    for r in rows:
        print(f"Llama-2 13B, 1 x 8 A100-40GB  {r['mesh']:16s} sequence parallel {'on ' if r['sequence_parallel'] else 'off'}"
              f"  step {r['step_s']:7.3f} s  peak {r['peak_gib']:5.1f}/{r['limit_gib']:.0f} GiB"
              f"  (activations {r['activation_gib']:5.2f} GiB, static {r['static_gib']:5.2f} GiB)", flush=True)
    off, on = rows
    print(f"sequence parallelism: step x{on['step_s'] / off['step_s']:.3f}, "
          f"activations x{on['activation_gib'] / off['activation_gib']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
