"""Where memory binds: the per-device peak of the lightest plan of each mesh, and what it is made of.

For one case of benchmarks/zero3.py (a model on a cluster whose memory binds), each mesh
(pp, tp, dp) is priced with the lightest choices the search has for it: every block recomputed,
micro-batches of one sample, 1F1B, Megatron's tensor-parallel layout with sequence parallelism,
equal layers per stage (the ``uniform`` split), and each data-parallel sharding level. It prints
the heaviest rank's predicted peak, when in the step it falls, and its parts: static (weights,
gradients, optimizer state), activations in flight, and workspace (buffers, kept input gradients,
the running backward's or the optimizer step's), with the heaviest stage's resident bytes and
workspaces. The figures are the evaluator's and simulator's (predicted), for reading why no plan
fits; the search itself may split unevenly and do better.

    python -m benchmarks.memory_breakdown [--case 70b] [--shardings zero3,none]
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.zero3 import CASES

GIB = 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="70b", help=f"which case ({', '.join(CASES)}; default 70b)")
    ap.add_argument("--shardings", default="zero3,hsdp,zero1",
                    help="data-parallel sharding levels to price where dp > 1 (default zero3,hsdp,zero1)")
    args = ap.parse_args()
    if args.case not in CASES:
        print(f"--case: unknown case {args.case!r}; cases are {', '.join(CASES)}", file=sys.stderr)
        return 2

    from partitioner.baselines import uniform_partition, with_dp_sharding
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.evaluate import StageSpec
    from partitioner.graph import build_partition_graph
    from partitioner.plan import Mesh, Schedule
    from partitioner.planner import prepare
    from partitioner.sharding import megatron_sharding, sharded_params
    from partitioner.zoo import load_model

    case = CASES[args.case]
    lm = load_model(case.model, device="meta", config=case.config, dtype="bf16")  # as `autopart plan` on an A100
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=case.model, batch_size=lm.batch_size)
    base = prepare(build_partition_graph(cap, lm.model), cluster=Cluster.preset(case.cluster, case.nodes),
                   global_batch=case.global_batch)
    world = base.cluster.world_size
    print(f"{case.name}: {base.usable_memory_bytes / GIB:.2f} GiB usable of {base.memory_limit_bytes / GIB:.2f} GiB; "
          f"optimizer {base.optimizer.name}, global batch {case.global_batch}")
    n_layers = sum(b.is_layer for b in base.pgraph.blocks)
    for tp in (1, 2, 4, 8):
        for pp in (p for p in range(1, world // tp + 1) if (world // tp) % p == 0 and p <= n_layers):
            dp = world // (pp * tp)
            if case.global_batch % dp:
                continue
            schedule = Schedule("1f1b", case.global_batch // dp, 1, 1)
            sharding = megatron_sharding(base.captured, tp, True) if tp > 1 else {}
            split = sharded_params(base.captured, sharding) if tp > 1 else set()
            for level in (args.shardings.split(",") if dp > 1 else ["none"]):
                ev = with_dp_sharding(base, level)
                specs = [StageSpec.whole(b, True) for b in uniform_partition([b.is_layer for b in ev.pgraph.blocks], pp)]
                mesh = Mesh(pp, tp, dp)
                plan, sim = ev.make_plan(specs, mesh, schedule, sharding=sharding, method="breakdown")
                rank = max(range(len(sim.peak_memory_bytes)), key=lambda r: sim.peak_memory_bytes[r])
                at = sim.peak_parts[rank]
                costs = ev.stage_costs(specs, mesh, schedule, sharding)
                s = max(range(len(specs)), key=lambda i: costs[i].static_bytes)
                params = [p for b in specs[s].blocks for p in ev.pgraph.blocks[b].params]
                resident, grads = ev.resident_bytes(params, tp, dp, split)
                print(f"{str(mesh):16s} {level:5s} peak {sim.peak_memory_bytes[rank] / GIB:6.2f} GiB at {at.moment:14s} "
                      f"static {at.static / GIB:6.2f} activations {at.activations / GIB:5.2f} workspace {at.workspace / GIB:5.2f}"
                      f" | stage {s}: resident {resident / GIB:6.2f} (gradients {grads / GIB:5.2f}), optimizer step "
                      f"{costs[s].optimizer_workspace_bytes / GIB:5.2f}, backward {costs[s].backward_workspace_bytes / GIB:5.2f},"
                      f" activations per micro-batch {costs[s].activation_bytes / GIB:5.2f}"
                      f"{'' if plan.predicted.fits else '  (does not fit)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
