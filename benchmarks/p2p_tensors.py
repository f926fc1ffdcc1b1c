"""What the tensors of a pipeline transfer cost: calibrate's busy 1F1B pipeline with k tensors per transfer.

torch's ``PipelineStage`` sends each tensor of a stage boundary as its own point-to-point operation
(GPT-2's stages pass the attention mask beside the hidden state, Llama's also the rotary cosine and
sine tables), and the gradient back only of those that need one. This runs the busy pipeline of
``autopart calibrate`` ([Note: measuring overheads] in partitioner/calibrate.py: each rank a stage of
``BUSY_DEPTH`` linear layers of width ``BUSY_WIDTH``, ``BUSY_ROWS`` rows a micro-batch, torch's
``Schedule1F1B`` over gloo, M of 4 and 8) with the hidden state alone (k = 1) and with k - 1 small
bool tensors beside it (calibrate's ``EXTRA_TENSOR``: gpt2-tiny's mask of a micro-batch of 2, 8 KiB), in
interleaved rounds, and fits per k the wait per transfer, as calibrate fits ``a_p2p``, with the
per-action and per-step overheads left in it (both the same for every k: the differences between
k are the extra tensors' alone). One forward transfer then carries k tensors, its gradient one.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.p2p_tensors [--rounds 3]

Prints, per k, the fitted wait of each round and their median (rank 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from partitioner.devices import leave_distributed

TENSORS = (1, 2, 4)  # k: tensors per forward transfer


def fitted_wait(k: int, counts: tuple[int, ...], rounds: int) -> float:
    """The wait per transfer that makes the simulated 1F1B step equal the measured one, for k tensors."""
    from partitioner.calibrate import (BUSY_DEPTH, BUSY_ROWS, BUSY_WIDTH, BusyPipelineSample, pipeline_steps,
                                       transfer_overhead)

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(BUSY_WIDTH, BUSY_WIDTH) for _ in range(BUSY_DEPTH)))

    def finish() -> None:  # the step's own work outside the schedule, as calibrate's
        net.zero_grad(set_to_none=False)
        dist.all_reduce(torch.zeros(()))

    runs = pipeline_steps(net, counts, BUSY_ROWS, BUSY_WIDTH, torch.device("cpu"), finish, extra=k - 1)
    x1 = torch.randn(BUSY_ROWS, BUSY_WIDTH, requires_grad=rank > 0)
    forward, backward, steps = [], [], {m: [] for m in runs}

    def slowest(seconds: float) -> float:
        t = torch.tensor(seconds)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    for _ in range(rounds):  # interleaved: the stage's compute and the steps see the same load
        dist.barrier()
        t0 = time.perf_counter()
        net(x1).sum()
        f = time.perf_counter() - t0
        dist.barrier()
        t0 = time.perf_counter()
        net(x1).sum().backward()
        forward.append(f)
        backward.append(max(0.0, time.perf_counter() - t0 - f))
        for m, fn in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            steps[m].append(slowest(time.perf_counter() - t0))
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, (statistics.median(forward), statistics.median(backward)))
    samples = [BusyPipelineSample(m, statistics.median(steps[m]), tuple(r[0] for r in per_rank),
                                  tuple(r[1] for r in per_rank), 0.0) for m in runs]
    return transfer_overhead(samples, 0.0, 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every k (default 3)")
    args = ap.parse_args()
    from partitioner.calibrate import BUSY_PIPELINE_MICROBATCHES, ROUNDS

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    done = False
    waits: dict[int, list[float]] = {k: [] for k in TENSORS}
    try:
        for r in range(args.rounds):
            for k in TENSORS:
                waits[k].append(fitted_wait(k, BUSY_PIPELINE_MICROBATCHES, ROUNDS))
                if dist.get_rank() == 0:
                    print(f"round {r + 1}: k = {k}: {waits[k][-1] * 1e6:.0f} us per transfer", flush=True)
        if dist.get_rank() == 0:
            base = statistics.median(waits[1])
            for k in TENSORS:
                med = statistics.median(waits[k])
                print(f"k = {k}: median {med * 1e6:.0f} us per transfer ({med / base:.2f}x k = 1; "
                      f"rounds {', '.join(f'{w * 1e6:.0f}' for w in waits[k])})")
        done = True
    finally:  # after a last barrier unless a rank failed ([Note: the last barrier] in partitioner/devices.py)
        leave_distributed(synchronize=done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
