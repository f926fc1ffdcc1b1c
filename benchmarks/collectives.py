"""gloo's collectives against the ring model on the transfers' link ([Note: fitting alpha-beta] in
partitioner/calibrate.py).

``autopart calibrate`` fits a link's latency and bandwidth to a ping-pong's transfers and prices each
collective as the ring algorithm over that link, times the kind's measured factor. This benchmark
runs the calibration's own measurements (``run_calibration`` without the overhead experiments)
``--rounds`` times on every rank of a torchrun job and prints, per round: the transfers' fit, the
fit of transfers and collectives together (what calibrate did up to 2026-12-05, with the
all-gather then sized by its input, not its output) with its mean error on each kind, and each
collective's time over the ring model on the transfers' link, per size and their median (the
factor calibrate writes).

    torchrun --standalone --nproc-per-node 2 -m benchmarks.collectives [--rounds 3] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch.distributed as dist

from cost_models.base import COLLECTIVES


def _joint_fit(samples):  # type: ignore[no-untyped-def]
    """Transfers and collectives fitted together, as calibrate did before ([Note: fitting alpha-beta])."""
    from cost_models.calibrated import nnls_relative
    from partitioner.calibrate import LinkFit, ring_coefficients

    rows = [(ring_coefficients(s.kind, s.ranks)[0], ring_coefficients(s.kind, s.ranks)[1] * s.nbytes) for s in samples]
    alpha, beta = nnls_relative(rows, [s.seconds for s in samples])
    return LinkFit(alpha, 1.0 / beta, len(samples), 0.0)


def _error(samples, fit, kind: str) -> float:  # type: ignore[no-untyped-def]
    errs = [abs(fit.time(s.kind, s.ranks, s.nbytes) - s.seconds) / s.seconds for s in samples if s.kind == kind]
    return sum(errs) / len(errs)


def main() -> None:
    from partitioner.calibrate import run_calibration
    from partitioner.devices import leave_distributed

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="calibrations of the links, one after another")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per measurement (as calibrate's --reps)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    medians: dict[str, list[float]] = {k: [] for k in COLLECTIVES}
    for r in range(args.rounds):
        report = run_calibration(reps=args.reps, overheads=False)
        if rank:
            continue
        samples = [s for s in report.samples if s.link == "intra"]
        fit = report.links["intra"]
        before = [replace(s, nbytes=s.nbytes // s.ranks) if s.kind == "all_gather" else s
                  for s in samples if s.kind != "broadcast"]  # calibrate timed no broadcast then
        old = _joint_fit(before)
        print(f"round {r + 1}: {report.world_size} ranks; transfers' link {fit.latency * 1e6:.1f} us, "
              f"{fit.bandwidth / 1e9:.2f} GB/s (mean error {fit.mape:.0%} on the transfers); fitted with the "
              f"collectives: {old.latency * 1e6:.1f} us, {old.bandwidth / 1e9:.2f} GB/s, mean error "
              + ", ".join(f"{k} {_error(before, old, k):.0%}" for k in ("p2p", *COLLECTIVES) if k != "broadcast"))
        for kind in COLLECTIVES:
            ring = replace(fit, factors={})
            ratios = [(s.nbytes, s.seconds / ring.time(kind, s.ranks, s.nbytes)) for s in samples if s.kind == kind]
            medians[kind].append(fit.factors[kind])
            print(f"  {kind:15s} measured / ring on the link: "
                  + " ".join(f"{n >> 10} KiB {x:.2f}" for n, x in ratios) + f"; median {fit.factors[kind]:.2f}")
    if rank == 0:
        print("factor per round (the median over sizes): "
              + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in medians.items()))
        print("median over rounds: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in medians.items()))
    leave_distributed()  # after a last barrier ([Note: the last barrier] in partitioner/devices.py)


if __name__ == "__main__":
    main()
