"""Never worse than a baseline: the ILP plan against every baseline over a matrix of models x clusters.

Target (issue: ILP planner): over at least 5 models (one heterogeneous) x at
least 4 clusters, the ILP plan's simulated step time is <= the best of
uniform, params, pipedream and megatron in every case; the geometric-mean
speedup over each baseline is reported. Also prints, per case, the ILP's own
objective against the simulator's step time (they must agree within 2%).

    python -m benchmarks.ilp_matrix [--time-limit 10] [--out benchmarks/results/ilp_matrix.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

from partitioner.baselines import METHODS, plan_baseline
from partitioner.capture import capture
from partitioner.cluster import Cluster
from partitioner.errors import AutopartError
from partitioner.planner import prepare
from partitioner.solver import plan_ilp
from partitioner.zoo import load_model

MODELS = {  # name -> (zoo name, config overrides, global batch per device)
    "gpt2": ("gpt2", {}, 8),
    "gpt2-xl": ("gpt2-xl", {}, 8),
    "llama2-7b": ("llama2-7b", {}, 4),
    "bert-large": ("bert-large", {}, 8),
    "gpt-bigvocab": ("gpt-bigvocab", {}, 8),
    "hetero-lm": ("hetero-lm", {}, 8),
}
CLUSTERS = {  # name -> (preset, nodes, dtype)
    "1x dgx-a100-80g": ("dgx-a100-80g", 1, "bf16"),
    "4x dgx-a100-80g": ("dgx-a100-80g", 4, "bf16"),
    "16x dgx-h100": ("dgx-h100", 16, "bf16"),
    "2x p3-v100": ("p3-v100", 2, "fp16"),
    "64x dgx-a100-80g": ("dgx-a100-80g", 64, "bf16"),
}
# The full product of MODELS x the first four CLUSTERS, plus large models where pipelining and
# tensor parallelism are needed at all: (model, cluster, global batch).
LARGE = [
    ("llama2-70b", "4x dgx-a100-80g", 128),
    ("llama2-70b", "16x dgx-h100", 512),
    ("gpt3-175b", "64x dgx-a100-80g", 1536),
]
LARGE_MODELS = {"llama2-70b": ("llama2-70b", {}), "gpt3-175b": ("gpt3-175b", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=10.0, help="ILP limit for the small models (large: 30 s)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    cases = [
        (m, c, per_device * Cluster.preset(CLUSTERS[c][0], CLUSTERS[c][1]).world_size)
        for m, (_, _, per_device) in MODELS.items()
        for c in list(CLUSTERS)[:4]
    ] + LARGE
    captured = {}
    for mname, cname, global_batch in cases:
        preset, nodes, dtype = CLUSTERS[cname]
        zoo, cfg = (MODELS[mname][:2] if mname in MODELS else LARGE_MODELS[mname])
        if (mname, dtype) not in captured:
            lm = load_model(zoo, dtype=dtype, config=cfg)
            captured[(mname, dtype)] = capture(lm.model, lm.example_inputs, name=mname, batch_size=lm.batch_size)
        cap = captured[(mname, dtype)]
        cluster = Cluster.preset(preset, nodes)
        ev = prepare(cap, cluster=cluster, global_batch=global_batch, dtype=dtype)
        row = {"model": mname, "cluster": cname, "baselines": {}}
        for method in METHODS:
            try:
                plan, _ = plan_baseline(method, ev)
                row["baselines"][method] = plan.predicted.step_time_s
            except AutopartError:
                row["baselines"][method] = None  # no plan fits
        t = time.perf_counter()
        res = plan_ilp(ev, time_limit_s=args.time_limit if mname in MODELS else 30.0)
        p = res.plan
        row.update(
            ilp=p.predicted.step_time_s, ilp_objective=p.solver.objective, status=p.solver.status,
            gap=res.report.gap, wall_s=time.perf_counter() - t, mesh=str(p.mesh), mfu=p.predicted.mfu,
        )
        best = min(v for v in row["baselines"].values() if v is not None)
        row["never_worse"] = p.predicted.step_time_s <= best * (1 + 1e-9)
        row["agree"] = abs(p.solver.objective / p.predicted.step_time_s - 1)
        rows.append(row)
        bl = " ".join(f"{m}={v:.4g}" if v else f"{m}=none" for m, v in row["baselines"].items())
        print(
            f"{mname:13s} {cname:16s} ilp={row['ilp']:.4g}s ({row['mesh']}, {row['status']}, gap {row['gap']:.1%}, "
            f"{row['wall_s']:.1f}s, objective vs simulator {row['agree']:.2%}) | {bl} | "
            f"{'ok' if row['never_worse'] else 'WORSE'}",
            flush=True,
        )
    print()
    for method in METHODS:
        ratios = [r["baselines"][method] / r["ilp"] for r in rows if r["baselines"][method]]
        gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else float("nan")
        missing = sum(1 for r in rows if not r["baselines"][method])
        print(f"geometric-mean speedup of ilp over {method:10s}: {gm:.3f}x over {len(ratios)} cases"
              + (f" ({missing} cases where {method} has no plan that fits)" if missing else ""))
    worst = min(min(v for v in r["baselines"].values() if v) / r["ilp"] for r in rows)
    print(f"never worse: {sum(r['never_worse'] for r in rows)}/{len(rows)} cases; worst ratio best-baseline/ilp {worst:.3f}")
    print(f"objective vs simulator: max disagreement {max(r['agree'] for r in rows):.2%}")
    print(f"ilp wall time: max {max(r['wall_s'] for r in rows):.1f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
