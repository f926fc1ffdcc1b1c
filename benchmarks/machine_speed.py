"""How steady this machine's speed is: the error a perfect model would still show here.

``benchmarks/fidelity.py`` calibrates, profiles and plans a layout, then runs it about a minute
later and sets the prediction against the run. A model that priced every op exactly would still
be off by however much the machine's own speed moved between the two. This benchmark measures
that floor with no model at all: ``--procs`` processes (2 by default, as the 2-rank layouts run;
one intra-op thread each, as every rank of ``autopart run`` here) each repeat one fixed piece of
work (a small MLP block's forward and backward, the size of the tiny models' ops) for
``--seconds``, and record when each repetition ended and how long it took. The record is then cut
into windows of ``--window`` seconds (a fidelity run times 2-8 s of steps); a window's figure is
the mean repetition time over every process. For each lag (the gap between a calibration and its
run), it prints the ratio of every window to the window that lag earlier:

* ``|later / earlier - 1|``: median, 90th percentile and worst over all pairs (the error a model
  calibrated in the earlier window, exact in every other way, would show in the later one);
* the fastest and slowest window over the median window (how far the machine's speed ranges);
* the same for each process's CPU time, which tracks wall time where the slowdown is the
  hardware's (a virtual machine's cores shared below it) rather than time-slicing by other jobs.

    python -m benchmarks.machine_speed [--seconds 240] [--window 4] [--lags 30,60,120] [--procs 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Sequence


def _work(iters: int) -> None:
    import torch

    x = torch.randn(128, 64)
    w1 = torch.randn(64, 256, requires_grad=True)
    w2 = torch.randn(256, 64, requires_grad=True)
    for _ in range(iters):
        h = torch.nn.functional.gelu(x @ w1)
        torch.nn.functional.layer_norm(h @ w2, (64,)).sum().backward()


def _worker(seconds: float, start_at: float, queue: "mp.Queue[list[tuple[float, float, float]]]") -> None:
    """Repeat the work from ``start_at`` (a shared perf_counter instant) for ``seconds``; put
    ``(end time, wall seconds, CPU seconds)`` per repetition."""
    import torch

    torch.set_num_threads(1)
    _work(20)  # warm-up
    while time.perf_counter() < start_at:
        time.sleep(0.001)
    out: list[tuple[float, float, float]] = []
    stop = start_at + seconds
    while True:
        t0, c0 = time.perf_counter(), time.thread_time()
        _work(10)
        t1, c1 = time.perf_counter(), time.thread_time()
        out.append((t1 - start_at, t1 - t0, c1 - c0))
        if t1 >= stop:
            break
    queue.put(out)


def windows(records: Sequence[Sequence[tuple[float, float, float]]], window: float,
            seconds: float) -> list[tuple[float, float]]:
    """Per window of ``window`` seconds: the mean (wall, CPU) seconds of a repetition that ended in it, over
    every process; a window where some process finished nothing is left out."""
    out = []
    n = int(seconds // window)
    for i in range(n):
        lo, hi = i * window, (i + 1) * window
        walls = [w for rec in records for (t, w, _) in rec if lo <= t < hi]
        cpus = [c for rec in records for (t, _, c) in rec if lo <= t < hi]
        if walls and all(any(lo <= t < hi for t, _, _ in rec) for rec in records):
            out.append((statistics.fmean(walls), statistics.fmean(cpus)))
    return out


def lag_errors(series: Sequence[float], lag: int) -> list[float]:
    """``|series[i + lag] / series[i] - 1|`` over every ``i``."""
    return [abs(series[i + lag] / series[i] - 1) for i in range(len(series) - lag)]


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="how long every process repeats the work (default 240)")
    ap.add_argument("--window", type=float, default=4.0, help="seconds a window (default 4: a fidelity run's steps)")
    ap.add_argument("--lags", default="30,60,120",
                    help="gaps between an earlier and a later window, seconds, comma-separated (default 30,60,120)")
    ap.add_argument("--procs", type=int, default=2, help="processes at once (default 2)")
    args = ap.parse_args(argv)
    try:
        lags = [float(x) for x in args.lags.split(",")]
    except ValueError:
        raise SystemExit(f"machine_speed: --lags {args.lags!r}: give seconds, comma-separated") from None
    if args.procs < 1 or args.window <= 0 or args.seconds < 2 * args.window or any(l < args.window for l in lags):
        raise SystemExit("machine_speed: need --procs >= 1, --seconds >= 2 windows, and every lag at least a window")
    ctx = mp.get_context("spawn")
    queue: "mp.Queue[list[tuple[float, float, float]]]" = ctx.Queue()
    start_at = time.perf_counter() + 5.0  # after every process has started and warmed up
    procs = [ctx.Process(target=_worker, args=(args.seconds, start_at, queue)) for _ in range(args.procs)]
    for p in procs:
        p.start()
    print(f"{args.procs} process(es) repeating the work for {args.seconds:.0f} s ...", flush=True)
    records = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    ws = windows(records, args.window, args.seconds)
    if len(ws) < 2:
        raise SystemExit("machine_speed: fewer than 2 windows; run longer")
    wall = [w for w, _ in ws]
    cpu = [c for _, c in ws]
    print(f"{len(ws)} windows of {args.window:g} s; a repetition's mean wall time per window, ms: "
          + " ".join(f"{w * 1e3:.1f}" for w in wall))
    for name, series in (("wall", wall), ("CPU", cpu)):
        med = statistics.median(series)
        print(f"{name}: median window {med * 1e3:.2f} ms; fastest {min(series) / med:.2f}x, slowest "
              f"{max(series) / med:.2f}x of it")
    print("| lag | pairs | wall: median / 90th pct / worst |later/earlier - 1| | CPU: median / 90th pct / worst |")
    print("|---:|---:|---|---|")
    for lag in lags:
        k = int(round(lag / args.window))
        if k >= len(ws):
            print(f"| {lag:g} s | 0 | (run longer) | |")
            continue
        row = []
        for series in (wall, cpu):
            e = lag_errors(series, k)
            row.append(f"{statistics.median(e):.1%} / {quantile(e, 0.9):.1%} / {max(e):.1%}")
        print(f"| {lag:g} s | {len(ws) - k} | {row[0]} | {row[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
