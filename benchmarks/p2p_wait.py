"""When does a gloo point-to-point transfer arrive, with its sender computing or idle? (issue 12)

The calibrated link (``autopart calibrate``'s ping-pong) prices a transfer between idle ranks;
in a pipeline the sender computes its next action while its transfer is due. This times one
64 KiB transfer from rank 0 to rank 1 four ways, the receive posted after the send (``late``) or
before it (``early``), and the sender computing a GEMM loop after the send (``busy``) or sleeping
(``idle``) for the same time. The figure is the delivery: from when both sides have posted to
when the receive returns, read on one clock (``time.perf_counter``, CLOCK_MONOTONIC, which the
processes of one machine share). Prints the median and quartiles per case ([Note: software
overheads] in cost_models/overheads.py: ``a_p2p``).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.p2p_wait [--reps 30]

With more ranks (``--nproc-per-node 4``), ranks 2 and up are bystanders: at each transfer they wait
in the next barrier (``--bystanders idle``, as calibrate's link measurement leaves the ranks that
take no part) or run the GEMM loop for as long as the transfer's sides do (``--bystanders busy``,
as every rank of a running pipeline does); on a 2-core machine 4 busy ranks share its cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from partitioner.devices import leave_distributed

CASES = ("late_idle", "late_busy", "early_idle", "early_busy")
NBYTES = 64 << 10  # a small model's activation per micro-batch (gpt2-tiny: 2 x 64 x 128 fp32)
LEAD_S = 0.003  # how long the later side computes or sleeps before posting
AFTER_S = 0.008  # how long the sender computes or sleeps after its send


def _busy(a: torch.Tensor) -> Callable[[float], None]:
    def compute(seconds: float) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, a)

    return compute


def _one(case: str, rank: int, x: torch.Tensor, compute: Callable[[float], None],
         busy_bystanders: bool = False) -> float | None:
    """One transfer; rank 1 returns the delivery in seconds, the other ranks None (ranks 2 and up stand by)."""
    late = case.startswith("late")
    work = compute if case.endswith("busy") else time.sleep
    stamp = torch.zeros(1, dtype=torch.float64)
    dist.barrier()
    if rank >= 2:
        if busy_bystanders:
            compute(LEAD_S + AFTER_S)
        return None
    if rank == 0:
        if not late:
            work(LEAD_S)
        stamp[0] = time.perf_counter()
        send = dist.isend(x, 1)
        work(AFTER_S)
        send.wait()
        dist.send(stamp, 1)
        return None
    if late:
        work(LEAD_S)
    posted = time.perf_counter()
    dist.irecv(x, 0).wait()
    arrived = time.perf_counter()
    dist.recv(stamp, 0)
    return arrived - max(posted, float(stamp.item()))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30, help="transfers per case (interleaved rounds)")
    ap.add_argument("--bystanders", choices=("idle", "busy"), default="idle",
                    help="what ranks 2 and up do during each transfer (with more than 2 ranks)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    done = False
    try:
        rank = dist.get_rank()
        world = dist.get_world_size()
        if world < 2:
            raise SystemExit("p2p_wait: run with --nproc-per-node 2 (or more: bystanders)")
        x = torch.randn(NBYTES // 4)
        compute = _busy(torch.randn(128, 128))
        times: dict[str, list[float]] = {c: [] for c in CASES}
        for _ in range(args.reps):  # interleaved: every case sees the same spread of load
            for case in CASES:
                t = _one(case, rank, x, compute, args.bystanders == "busy")
                if t is not None:
                    times[case].append(t)
        if rank == 1:
            others = f"; {world - 2} bystanders {args.bystanders}" if world > 2 else ""
            print(f"delivery of a {NBYTES >> 10} KiB gloo transfer after both sides posted it ({args.reps} each{others}):")
            for case, ts in times.items():
                q1, med, q3 = statistics.quantiles(ts, n=4)
                print(f"  {case:10s} median {med * 1e3:6.2f} ms  quartiles {q1 * 1e3:6.2f} - {q3 * 1e3:6.2f} ms  "
                      f"mean {statistics.fmean(ts) * 1e3:6.2f} ms")
        done = True
    finally:  # after a last barrier unless a rank failed ([Note: the last barrier] in partitioner/devices.py)
        leave_distributed(synchronize=done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
