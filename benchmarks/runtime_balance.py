"""Balance pays: the ILP's pipeline split vs the uniform one, planned with measured costs and run for real.

The model is zoo ``hetero-lm`` at a small size with layers of mixed widths
(narrow ones first, wide ones last, next to a 16k-vocabulary head), so a split
with an equal number of layers per stage leaves the last stage far heavier.
Both plans are for ``local-cpu:2`` with pp=2 pinned, 1F1B, 4 micro-batches of
one sample, and are made from the same measured cost model
(``partitioner.profile.profile_for_planning``, one thread, as one rank of that
cluster gets). Each plan is then trained for real with
``torchrun --nproc-per-node 2 -m partitioner.cli run`` (one thread per rank),
the two plans alternating, ``--rounds`` times, so that load from other work on
the machine hits both alike. Rank 0 of each run writes its step times and the
stages' forward/backward events (``autopart run --json``).

Reported: each round's median step per plan and their ratio, the spread over
rounds, the simulator's predicted ratio and whether it lies within 15% of the
measured one, and each stage's measured forward/backward next to its
prediction.

    python -m benchmarks.runtime_balance [--rounds 3] [--steps 10] [--seq-len 64] [--clock cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "hetero-lm"
CONFIG = ("vocab_size=16000", "d_model=256", "widths=256,256,256,256,4096,4096,4096,4096")
SEQ = 64
MICROBATCHES = 4


def plan_both(out: Path, clock: str, optimizer: str, seq: int) -> tuple[dict[str, dict], Any]:
    """Profile the model (a fresh cache) and plan it with the ILP and uniform; write the plans under ``out``."""
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.graph import build_partition_graph
    from partitioner.planner import plan_parallelism
    from partitioner.profile import ProfileCache, ProfileOptions, profile_for_planning
    from partitioner.zoo import load_model, parse_config_overrides

    cluster = Cluster.local(2)
    lm = load_model(MODEL, seq_len=seq, dtype="fp32", config=parse_config_overrides(CONFIG))
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=lm.name, batch_size=lm.batch_size)
    pg = build_partition_graph(cap, lm.model)
    with ProfileCache(out / "profile.sqlite") as cache:
        prof = profile_for_planning(pg, cluster, cache, ProfileOptions(dtype="fp32", clock=clock))
    plans, results = {}, {}
    for method in ("ilp", "uniform"):
        result = plan_parallelism(pg, cluster=cluster, global_batch=MICROBATCHES, dtype="fp32", optimizer=optimizer,
                                  cost_model=prof.cost_model, pp=2, tp=1, dp=1, microbatches=MICROBATCHES,
                                  schedule="1f1b", time_limit_s=20, method=method)
        path = out / f"{method}.json"
        result.plan.save(path)
        plans[method] = json.loads(path.read_text())
        results[method] = result
    return plans, (pg, results)


def simulate_measured(planned, method: str, stage_s: list[tuple[float, float]]) -> float:
    """The schedule simulator run on measured (forward, backward) stage times instead of predicted ones."""
    from dataclasses import replace

    from partitioner.simulate import simulate

    pg, results = planned
    plan = results[method].plan
    specs = [results[method].evaluator.spec_of(st) for st in plan.stages]
    costs = results[method].evaluator.stage_costs(specs, plan.mesh, plan.schedule, plan.sharding)
    costs = [replace(c, forward_s=f, backward_s=b) for c, (f, b) in zip(costs, stage_s)]
    return simulate(costs, plan.schedule.name, plan.schedule.microbatches).step_time_s


def run_plan(plan: Path, out: Path, steps: int, warmup: int, seq: int) -> dict:
    """``autopart run`` of ``plan`` on 2 ranks of one thread each; rank 0's --json record."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "partitioner.cli", "run", "--plan", str(plan), "--model", MODEL, "--config", *CONFIG,
           "--seq-len", str(seq), "--steps", str(steps), "--warmup", str(warmup), "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"autopart run of {plan} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def stage_times(record: dict, stage: int, clock: str = "wall") -> tuple[float, float]:
    """Median forward and backward of ``stage`` over the micro-batches of the recorded step
    (``clock="cpu"``: the CPU time the rank spent in them)."""
    ev = [e for e in record["events"] if e["stage"] == stage]

    def took(e: dict) -> float:
        return e["cpu_s"] if clock == "cpu" else e["end_s"] - e["start_s"]

    f = [took(e) for e in ev if e["kind"] == "F"]
    b = [took(e) for e in ev if e["kind"] == "B"]
    return statistics.median(f), statistics.median(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="times each plan is run (alternating)")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per run")
    ap.add_argument("--clock", default="cpu", choices=("wall", "cpu"),
                    help="profiler clock: process CPU time (default; other jobs on shared cores do not inflate it) or wall")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adam-mixed"),
                    help="the plans' optimizer, which autopart run uses (sgd: SGD, adam*: AdamW)")
    ap.add_argument("--seq-len", type=int, default=SEQ, help=f"sequence length (default {SEQ})")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        torch.set_num_threads(1)
        plans, planned = plan_both(out, args.clock, args.optimizer, args.seq_len)
        rounds = []
        for r in range(args.rounds):
            order = ("ilp", "uniform") if r % 2 == 0 else ("uniform", "ilp")
            load = os.getloadavg()[0]  # other work on the machine's cores, before the round
            rec = {m: run_plan(out / f"{m}.json", out / f"run-{m}-{r}.json", args.steps, args.warmup, args.seq_len) for m in order}
            med = {m: statistics.median(rec[m]["step_times_s"]) for m in rec}
            rounds.append(dict(median_s=med, ratio=med["uniform"] / med["ilp"], load_before=load,
                               stages={m: [stage_times(rec[m], s["index"]) for s in plans[m]["stages"]] for m in rec},
                               stages_cpu={m: [stage_times(rec[m], s["index"], "cpu") for s in plans[m]["stages"]]
                                           for m in rec},
                               losses={m: rec[m]["losses"] for m in rec}))
            print(f"round {r + 1}: ilp {med['ilp'] * 1e3:.1f} ms, uniform {med['uniform'] * 1e3:.1f} ms, "
                  f"measured speedup {rounds[-1]['ratio']:.3f}x (load average before: {load:.2f})", flush=True)
    wall = time.perf_counter() - started

    predicted = {m: plans[m]["predicted"]["step_time_s"] for m in plans}
    pred_ratio = predicted["uniform"] / predicted["ilp"]
    ratios = [r["ratio"] for r in rounds]
    measured = {m: statistics.median(r["median_s"][m] for r in rounds) for m in plans}
    meas_ratio = statistics.median(ratios)
    err = (pred_ratio - meas_ratio) / meas_ratio
    print()
    for m in ("ilp", "uniform"):
        split = [st["modules"][-1] for st in plans[m]["stages"][:-1]]
        print(f"{m:7s} split after {split[0]}: predicted step {predicted[m] * 1e3:.1f} ms, "
              f"measured median {measured[m] * 1e3:.1f} ms (rounds: "
              f"{', '.join(format(r['median_s'][m] * 1e3, '.1f') for r in rounds)})")
        for st in plans[m]["stages"]:
            f = statistics.median(r["stages"][m][st["index"]][0] for r in rounds)
            b = statistics.median(r["stages"][m][st["index"]][1] for r in rounds)
            fc = statistics.median(r["stages_cpu"][m][st["index"]][0] for r in rounds)
            bc = statistics.median(r["stages_cpu"][m][st["index"]][1] for r in rounds)
            p = st["predicted"]
            print(f"    stage {st['index']} ({st['modules'][0]}..{st['modules'][-1]}): fwd predicted "
                  f"{p['forward_s'] * 1e3:6.2f} ms measured {f * 1e3:6.2f} ms (cpu {fc * 1e3:6.2f}); bwd predicted "
                  f"{p['backward_s'] * 1e3:6.2f} ms measured {b * 1e3:6.2f} ms (cpu {bc * 1e3:6.2f})")
    # Load-proof figure: the simulator on the stages' measured CPU times (what a quiet machine would run).
    cpu_step = {
        m: simulate_measured(planned, m, [
            tuple(statistics.median(r["stages_cpu"][m][st["index"]][k] for r in rounds) for k in (0, 1))
            for st in plans[m]["stages"]
        ])
        for m in plans
    }
    cpu_ratio = cpu_step["uniform"] / cpu_step["ilp"]
    print(f"measured speedup ILP/uniform: {meas_ratio:.3f}x (rounds {min(ratios):.3f}..{max(ratios):.3f}; target >= 1.2x: "
          f"{'yes' if meas_ratio >= 1.2 else 'NO'})")
    print(f"predicted speedup: {pred_ratio:.3f}x, {err:+.1%} off the measured ({'within' if abs(err) <= 0.15 else 'NOT within'} 15%)")
    print(f"simulator on the stages' measured CPU times: ilp {cpu_step['ilp'] * 1e3:.1f} ms, uniform "
          f"{cpu_step['uniform'] * 1e3:.1f} ms, speedup {cpu_ratio:.3f}x (predicted {pred_ratio:.3f}x, "
          f"{(pred_ratio - cpu_ratio) / cpu_ratio:+.1%})")
    print(f"model {MODEL} {' '.join(CONFIG)} seq {args.seq_len}, {MICROBATCHES} micro-batches of 1, 1f1b, "
          f"optimizer {args.optimizer}, profiler clock {args.clock}, torch {torch.__version__}, {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            model=MODEL, config=CONFIG, seq=args.seq_len, optimizer=args.optimizer, clock=args.clock, rounds=rounds,
            predicted_s=predicted, predicted_ratio=pred_ratio, measured_s=measured, measured_ratio=meas_ratio,
            simulated_from_cpu_s=cpu_step, simulated_from_cpu_ratio=cpu_ratio,
            splits={m: [st["modules"] for st in plans[m]["stages"]] for m in plans}, wall_s=wall), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
