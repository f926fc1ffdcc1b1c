"""What ZeRO-1's optimizer step costs beyond the update and the broadcasts (issue 12: ``a_zero1``).

On every rank of a torchrun job, a model's trainable parameters (random gradients) are stepped by AdamW
over all of them, and by ``ZeroRedundancyOptimizer`` as the runtime makes it (``zero1_optimizer``:
each rank updates its share, then every tensor is broadcast from its owner), in interleaved rounds;
then every tensor is broadcast from rank 0 (async, then waited), as ZeRO's step does after its update.
Prints each one's median and mean time (ms).

    torchrun --standalone --nproc-per-node 2 -m benchmarks.zero1_step [--model llama-tiny] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each, per round (3 rounds)")
    args = ap.parse_args()
    from partitioner.devices import leave_distributed
    from partitioner.precision import adamw_factory
    from partitioner.runtime.state import zero1_optimizer
    from partitioner.zoo import load_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = load_model(args.model, seq_len=None, dtype="fp32", config=None, device="cpu").model
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    device = torch.device("cpu")

    def broadcasts() -> None:
        for h in [dist.broadcast(p.data, src=0, async_op=True) for p in params]:
            h.wait()

    runs = {"AdamW, every tensor": adamw_factory(device)(params).step,
            "ZeroRedundancyOptimizer": zero1_optimizer(adamw_factory(device), params, None).step,
            "the broadcasts alone": broadcasts}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn(), fn()
    for _ in range(3):
        for name, fn in runs.items():
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        print(f"{args.model}: {len(params)} tensors, {sum(p.numel() for p in params) * 4 / 2**20:.2f} MiB, "
              f"{dist.get_world_size()} ranks (gloo)")
        for name, t in times.items():
            print(f"  {name}: median {statistics.median(t) * 1e3:.2f} ms, mean {statistics.fmean(t) * 1e3:.2f} ms")
    leave_distributed()  # after a last barrier ([Note: the last barrier] in partitioner/devices.py)


if __name__ == "__main__":
    main()
