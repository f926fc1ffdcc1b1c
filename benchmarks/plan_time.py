"""End-to-end `autopart plan` wall time for every baseline method on a large case.

Target (issue: foundation): any baseline for gpt3-175b on 128 nodes of DGX
A100 in under 60 s end to end (process start, capture, planning, printing).

    python -m benchmarks.plan_time [--model gpt3-175b] [--cluster dgx-a100-80g] [--nodes 128] [--global-batch 1536]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

from partitioner.baselines import METHODS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt3-175b")
    ap.add_argument("--cluster", default="dgx-a100-80g")
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=1536)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args()
    exe = shutil.which("autopart")
    base = [exe] if exe else [sys.executable, "-m", "partitioner.cli"]
    for method in args.methods:
        cmd = [*base, "plan", "--model", args.model, "--cluster", args.cluster, "--nodes", str(args.nodes),
               "--global-batch", str(args.global_batch), "--method", method]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        lines = (out.stdout + out.stderr).strip().splitlines()
        summary = next((l for l in lines if l.startswith("step time") or "error" in l), lines[-1] if lines else "")
        mesh = next((l.split("·")[1].strip() for l in lines if l.startswith("method ")), "")
        print(f"{method:10s} exit {out.returncode}  {wall:6.1f} s  {mesh:28s} {summary[:150]}")


if __name__ == "__main__":
    main()
