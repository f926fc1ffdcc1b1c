"""How a running plan uses a CPU's cores: each rank's CPU time a step, and each action's share of a core (issue 12).

The evaluator prices ranks that outnumber the cores by giving a computing rank the cores that the
waiting ranks leave ([Note: ranks sharing cores] in partitioner/evaluate.py): with ``n`` pipeline ranks
computing on ``c`` cores, each gets ``min(1, c / n)`` of a core, and a rank that waits uses none.
This runs a plan as ``autopart run`` does (the same model, data and steps) and, over the recorded
steps, reads what the ranks really got:

* per rank and step: wall time, the process's CPU time (every thread: gloo's too), the main thread's,
  and that of its forward and backward actions (``StepEvent.cpu_s``), and the cores the rank uses
  outside its actions: its CPU time outside them over its wall time outside them (a rank that only
  waited there would read 0);
* per action: its CPU time over its wall time (the share of a core it got), grouped by how many
  actions of other ranks ran beside it (time-averaged over the action, on one clock:
  ``time.perf_counter``, CLOCK_MONOTONIC, which the processes of one machine share), beside the
  share the model gives.

    torchrun --standalone --nproc-per-node N -m benchmarks.core_use --plan PLAN.json [--steps 10] [--warmup 2]

A benchmark: it prints figures and changes nothing. ``run_plan`` builds ``ParallelModel``; this
script has it build a subclass that also reads the clocks around each recorded step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict
from typing import Any

import torch.distributed as dist

from partitioner.runtime import loop
from partitioner.runtime.model import ParallelModel


_RECORDED: list[dict[str, Any]] = []  # this rank's recorded steps


class _Metered(ParallelModel):
    """``ParallelModel`` that keeps each recorded step's clock origin, events and CPU times in ``_RECORDED``."""

    def step(self, *inputs: Any, target: Any, record: bool = False, track_memory: bool = False) -> float:
        p0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
        loss = super().step(*inputs, target=target, record=record, track_memory=track_memory)
        p1, t1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
        if record:
            _RECORDED.append(dict(origin=self.stages[0].origin, events=[asdict(e) for e in self.events],
                                       process_s=p1 - p0, thread_s=t1 - t0, wall_s=w1 - w0))
        return loss

    def close(self) -> None:  # every rank's steps to rank 0 while the process group is up
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, _RECORDED)
        if dist.get_rank() == 0:
            report(gathered, len(os.sched_getaffinity(0)))
        super().close()


def _others_beside(iv: list[tuple[int, float, float]], rank: int, a: float, b: float) -> float:
    """The time-averaged number of other ranks' actions running during ``[a, b]``."""
    cuts = sorted({a, b} | {x for r, s, e in iv if r != rank for x in (s, e) if a < x < b})
    total = 0.0
    for t0, t1 in zip(cuts, cuts[1:]):
        mid = (t0 + t1) / 2
        total += (t1 - t0) * sum(1 for r, s, e in iv if r != rank and s <= mid < e)
    return total / (b - a)


def report(gathered: list[list[dict[str, Any]]], cores: int) -> None:
    world, steps = len(gathered), min(len(g) for g in gathered)
    print(f"\n{world} ranks on {cores} cores, {steps} recorded steps")
    print("per rank, the mean of the recorded steps (ms): wall | process CPU | main thread | forward and backward "
          "(CPU, wall) | cores used outside them")
    for r, mine in enumerate(gathered):
        mean = lambda f: statistics.fmean(f(s) for s in mine[:steps]) * 1e3  # noqa: E731
        wall, cpu = mean(lambda s: s["wall_s"]), mean(lambda s: s["process_s"])
        act_cpu = mean(lambda s: sum(e["cpu_s"] for e in s["events"]))
        act_wall = mean(lambda s: sum(e["end_s"] - e["start_s"] for e in s["events"]))
        print(f"  rank {r}: {wall:6.1f} | {cpu:6.1f} | {mean(lambda s: s['thread_s']):6.1f} | {act_cpu:6.1f}, "
              f"{act_wall:6.1f} | {(cpu - act_cpu) / max(wall - act_wall, 1e-9):.2f}")
    groups: dict[int, list[tuple[float, float]]] = {}
    used = []
    for k in range(steps):
        iv = [(r, g[k]["origin"] + e["start_s"], g[k]["origin"] + e["end_s"], e["cpu_s"])
              for r, g in enumerate(gathered) for e in g[k]["events"] if e["end_s"] > e["start_s"]]
        used.append(sum(g[k]["process_s"] for g in gathered) / max(g[k]["wall_s"] for g in gathered))
        plain = [(r, s, e) for r, s, e, _ in iv]
        for r, s, e, cpu in iv:
            groups.setdefault(round(_others_beside(plain, r, s, e)), []).append((cpu, e - s))
    print(f"cores in use over a step (every rank's process CPU over the step's wall time): "
          f"{statistics.fmean(used):.2f} of {cores}")
    print("forward and backward actions by the other ranks' actions beside them: the share of a core each got "
          "(CPU / wall; median, and over all their time) against the model's min(1, cores / computing)")
    for n in sorted(groups):
        v = groups[n]
        print(f"  {n} beside: {len(v):4d} actions, median {statistics.median(c / w for c, w in v):.2f}, "
              f"over their time {sum(c for c, _ in v) / sum(w for _, w in v):.2f}; model {min(1.0, cores / (n + 1)):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", required=True, help="a plan JSON (autopart plan --json)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps before the recorded ones (default 10)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    loop.ParallelModel = _Metered  # run_plan builds the model through this name
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the run's --json (it records steps only with one)
        loop.run_plan(args.plan, steps=args.steps, warmup=args.warmup, json_path=os.path.join(tmp, "run.json"))


if __name__ == "__main__":
    main()
