"""The compute slowdown under a moment of someone else's load: wall time against CPU time.

``autopart calibrate`` scales every op's compute by ``overheads.compute_slowdown``, the slowest rank's
time of a GEMM and an add with every rank at once over rank 0's alone ([Note: measured device
efficiencies] in partitioner/calibrate.py). This benchmark runs those rounds for a while, on every
rank of a torchrun job, and starts a busy process of its own (a Python loop, one core) for the first
``--load-seconds``. Each round prints both ratios: the slowest rank's wall time over rank 0's alone (what
calibrate used up to 2026-12-05), and its CPU time over rank 0's alone (what it uses now). Then it
prints each ratio's median during the load, after it, and over a calibration's 9 rounds taken at
either moment.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.slowdown_load [--seconds 12] [--load-seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=12.0, help="how long to take rounds")
    ap.add_argument("--load-seconds", type=float, default=5.0, help="how long the busy process runs, from the start")
    args = ap.parse_args()
    from partitioner.devices import leave_distributed

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    n, m = 1024, 16 << 20  # calibrate's GEMM and add on a CPU
    a, b = torch.randn(n, n), torch.randn(n, n)
    x, y = torch.ones(m // 4), torch.ones(m // 4)
    out = torch.empty_like(x)

    def work() -> None:
        torch.mm(a, b)
        torch.add(x, y, out=out)

    work()
    load = None
    dist.barrier()
    if rank == 0 and args.load_seconds > 0:
        load = subprocess.Popen([sys.executable, "-c", f"import time\nt = time.time() + {args.load_seconds}\nwhile time.time() < t: pass"])
    start = time.perf_counter()
    rounds: list[tuple[float, float, float]] = []  # (seconds since start, wall ratio, CPU ratio)
    while True:
        flag = torch.tensor([time.perf_counter() - start < args.seconds], dtype=torch.int32)
        dist.broadcast(flag, 0)
        if not flag.item():
            break
        dist.barrier()
        c0 = time.process_time()
        if rank == 0:
            work()
        alone = time.process_time() - c0
        dist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        work()
        t = torch.tensor([time.perf_counter() - w0, time.process_time() - c0, alone], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rounds.append((time.perf_counter() - start, t[0].item() / t[2].item(), t[1].item() / t[2].item()))
    if load is not None:
        load.wait()
    if rank == 0:
        print(f"{dist.get_world_size()} ranks, {len(rounds)} rounds, a busy process for the first {args.load_seconds:g} s")
        for s, wall, cpu in rounds:
            print(f"{s:6.2f} s  wall/alone {wall:5.2f}  cpu/alone {cpu:5.2f}")
        for label, part in (("during the load", [r for r in rounds if r[0] <= args.load_seconds]),
                            ("after it", [r for r in rounds if r[0] > args.load_seconds + 0.5])):
            if part:
                print(f"{label}: {len(part)} rounds, median wall/alone {statistics.median(r[1] for r in part):.3f}, "
                      f"median cpu/alone {statistics.median(r[2] for r in part):.3f}; the first 9 rounds: wall "
                      f"{statistics.median(r[1] for r in part[:9]):.3f}, cpu {statistics.median(r[2] for r in part[:9]):.3f}")
    leave_distributed()  # after a last barrier ([Note: the last barrier] in partitioner/devices.py)


if __name__ == "__main__":
    main()
