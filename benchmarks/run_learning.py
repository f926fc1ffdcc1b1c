"""``autopart run`` learns: 200 steps of a pp=2 plan on the fixed synthetic corpus, the loss falling.

    PYTHONPATH=. python benchmarks/run_learning.py [--steps 200] [--out benchmarks/results/DATE-run-learning]

Plans gpt2-tiny for ``local-cpu:2`` (pp=2, 1F1B, the ``params`` baseline), runs it with
``torchrun --nproc-per-node 2 -m partitioner run --steps N --json OUT.json`` and writes
``OUT.md``: the losses at the start and the end (means over 10 steps), the corpus, the
chain's entropy (the lowest loss reachable) and ``ln(vocab)`` (what random tokens give).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rel(arg: str) -> str:
    return str(Path(arg).relative_to(ROOT)) if arg.startswith(str(ROOT)) else arg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-run-learning"))
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    plan = out.with_suffix(".plan.json")
    record = out.with_suffix(".json")
    for f in (plan, record):
        f.unlink(missing_ok=True)
    model = ["--model", "gpt2-tiny"]
    subprocess.run([sys.executable, "-m", "partitioner", "plan", *model, "--cluster", "local-cpu:2", "--mesh", "pp=2",
                    "--global-batch", "8", "--method", "params", "--json", str(plan)], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    cmd = ["torchrun", "--nproc-per-node", "2", "-m", "partitioner", "run", "--plan", str(plan), *model,
           "--steps", str(args.steps), "--json", str(record)]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    data = json.loads(record.read_text())
    losses = data["losses"]
    from partitioner.corpus import successors_entropy
    from partitioner.zoo import load_model

    vocab = load_model("gpt2-tiny", device="meta").model.config.vocab_size
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    lines = [
        f"# `autopart run` learns ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `PYTHONPATH=. python benchmarks/run_learning.py --steps {args.steps}`, which runs",
        f"`{' '.join(_rel(c) for c in cmd)}` on a plan for gpt2-tiny, pp=2, 1F1B, global batch 8.",
        "",
        f"- data: {data['data']}",
        f"- random tokens would give ln(vocab) = ln({vocab}) = {math.log(vocab):.3f}; the corpus's entropy "
        f"(the lowest loss reachable) is {successors_entropy(vocab):.3f}",
        f"- mean loss of steps 1-10: **{first:.3f}**; of steps {args.steps - 9}-{args.steps}: **{last:.3f}**",
        f"- loss at step 1 {losses[0]:.3f}, at step {args.steps} {losses[-1]:.3f}; {wall:.0f} s wall on 2 busy shared cores",
        "",
        "Loss every 20 steps: " + ", ".join(f"{i + 1}: {losses[i]:.3f}" for i in range(0, len(losses), 20)),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if last < first else 1


if __name__ == "__main__":
    raise SystemExit(main())
