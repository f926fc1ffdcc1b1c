"""Build chosen ranks of 512- and 128-rank plans on meta, each in a fresh process, and time them.

    PYTHONPATH=. python benchmarks/meta_build.py [--out benchmarks/results/DATE-meta-build.md]

The plans are tests/plans/*.json, Megatron's layouts (ZeRO-1, which a meta build does not model,
is never chosen by `--method megatron` unless asked), made with

    autopart plan --model gpt3-175b --cluster dgx-a100-80g --nodes 64 --global-batch 1536 --method megatron --json ...
    autopart plan --model llama2-70b --cluster dgx-a100-80g --nodes 16 --global-batch 512 --method megatron --json ...

For each plan it builds rank 0, a middle rank and the last rank (``chosen_ranks``) with
``partitioner.meta_build.build_rank`` in a new process, prints one line per rank (wall and CPU
seconds of the build, peak RSS) and every disagreement with the plan, and writes a Markdown table.
Target (issue 13): each GPT-3 rank within 60 s on 2 cores; bytes equal to the plan's exactly.
On a shared machine the wall time counts other people's work; the CPU time is this build's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioner.meta_build import build_rank_isolated, chosen_ranks, summary  # noqa: E402
from partitioner.plan import Plan  # noqa: E402

PLANS = [
    (ROOT / "tests/plans/gpt3-175b-64x-dgx-a100-80g.json", "gpt3-175b"),
    (ROOT / "tests/plans/llama2-70b-16x-dgx-a100-80g.json", "llama2-70b"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    ap.add_argument("--ranks", default=None, help="comma-separated ranks instead of first, middle, last")
    args = ap.parse_args()
    rows = []
    failures = 0
    for path, model in PLANS:
        plan = Plan.load(path)
        ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else sorted(set(chosen_ranks(plan)))
        print(f"{model}: mesh {plan.mesh} ({plan.mesh.world_size} ranks), {plan.training.dtype}, "
              f"{plan.training.optimizer}; building ranks {ranks}", flush=True)
        for rank in ranks:
            t0 = time.perf_counter()
            build = build_rank_isolated(path, model, rank)
            total = time.perf_counter() - t0
            problems = build.problems()
            failures += bool(problems)
            print(f"  {summary(build)}; process {total:.1f} s, peak RSS {build.max_rss_bytes / 2**20:.0f} MiB", flush=True)
            for p in problems:
                print(f"    MISMATCH {p}")
            rows.append((model, str(plan.mesh), build, total, problems))
    if args.out:
        lines = [
            f"# Meta builds of large plans ({time.strftime('%Y-%m-%d')})", "",
            f"Command: `PYTHONPATH=. python benchmarks/meta_build.py --out {args.out}` on {os.cpu_count()} "
            "logical CPUs (shared with other work: wall time includes waiting; CPU time is the build's).", "",
            "| model | mesh | rank (pp, dp, tp) | stages | params (sharded) | bytes held | bytes planned | "
            "build wall | build CPU | process wall | peak RSS | as planned |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model, mesh, b, total, problems in rows:
            shards = sum(1 for p in b.params if p.placement.startswith("S"))
            lines.append(
                f"| {model} | {mesh} | {b.rank} {b.coords} | {','.join(map(str, b.stages))} | {len(b.params)} ({shards}) | "
                f"{b.held.total} | {b.predicted_resident_bytes}{' + recompute workspace' if b.recompute_workspace else ''} | "
                f"{b.build_s:.1f} s | {b.cpu_s:.1f} s | {total:.1f} s | {b.max_rss_bytes / 2**20:.0f} MiB | "
                f"{'yes' if not problems else 'NO: ' + problems[0]} |")
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
