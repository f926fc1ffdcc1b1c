"""What ZeRO-1's optimizer step costs beyond the update and the broadcasts (issue 12: ``a_zero1``).

On every rank of a torchrun job, a model's trainable parameters (random gradients) are stepped by AdamW
over all of them, and by ``ZeroRedundancyOptimizer`` as the runtime makes it (``zero1_optimizer``:
each rank updates its share, then every tensor is broadcast from its owner), in interleaved rounds;
then every tensor is broadcast from rank 0 (async, then waited), as ZeRO's step does after its update.
Prints each one's median and mean time (ms).

    torchrun --standalone --nproc-per-node 2 -m benchmarks.zero1_step [--model llama-tiny] [--steps 30]

With ``--sets llama-tiny,gpt2-tiny,32x4096`` it compares tensor sets instead: each a model's parameter
list or ``TxN`` (T tensors of N elements; calibrate's ZeRO-1 experiment is 32x4096), ZeRO's step and
the broadcasts alone (each tensor from its owner, alternating ranks), in ``--rounds`` interleaved
rounds, each round's figure the median of ``--steps`` steps timed as calibrate times (``_timed``:
slowest rank). Prints per set the median over rounds, per tensor, and every round's figure; with
``--cluster cal.toml`` (from ``autopart calibrate``), beside each model the ZeRO-1 step the evaluator
prices on it (dp over the job's ranks, every parameter on one stage).
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
    ap.add_argument("--sets", default=None, help="compare tensor sets: models and TxN, comma-separated")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --sets")
    ap.add_argument("--cluster", default=None, help="with --sets: a calibrated cluster TOML to price the models on")
    args = ap.parse_args()
    if args.sets:
        return compare_sets(args.sets.split(","), args.steps, args.rounds, args.cluster)
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


def _uniform(name: str) -> bool:
    """Whether ``name`` is ``TxN`` (T tensors of N elements) rather than a model."""
    count, x, numel = name.partition("x")
    return bool(x) and count.isdigit() and numel.isdigit()


def _tensor_set(name: str) -> list[int]:
    """The element counts of ``name``: a zoo model's trainable parameters, or ``TxN``."""
    if _uniform(name):
        count, numel = name.split("x")
        return [int(numel)] * int(count)
    from partitioner.zoo import load_model

    return [p.numel() for p in load_model(name, seq_len=None, dtype="fp32", config=None, device="cpu").model.parameters()
            if p.requires_grad]


def predicted_step(model: str, cluster_toml: str, dp: int) -> float:
    """The evaluator's ZeRO-1 optimizer step of ``model`` on the calibrated cluster, every parameter on one stage."""
    from partitioner.cluster import Cluster
    from partitioner.planner import prepare
    from partitioner.zoo import load_model

    lm = load_model(model)
    ev = prepare(lm.model, lm.example_inputs, Cluster.from_toml(cluster_toml), global_batch=8, dtype="fp32",
                 dp_sharding="zero1")
    return ev.optimizer_time(list(ev.captured.params), 1, dp, set(), list(range(dp)))


def compare_sets(names: list[str], steps: int, rounds: int, cluster_toml: str | None = None) -> None:
    """ZeRO-1's step and its broadcasts alone over each tensor set, interleaved rounds (see the module doc)."""
    from partitioner.calibrate import _timed
    from partitioner.devices import leave_distributed
    from partitioner.precision import adamw_factory
    from partitioner.runtime.state import zero1_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    device, world = torch.device("cpu"), dist.get_world_size()
    sets = {name: _tensor_set(name) for name in names}
    runs = {}
    for name, sizes in sets.items():
        params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
        for p in params:
            p.grad = torch.randn_like(p)

        def broadcasts(params: list[torch.nn.Parameter] = params) -> None:
            for h in [dist.broadcast(p.data, src=i % world, async_op=True) for i, p in enumerate(params)]:
                h.wait()

        runs[name] = (zero1_optimizer(adamw_factory(device), params, None).step, broadcasts)
    times = {name: ([], []) for name in sets}
    for _ in range(rounds):
        for name, (step, broadcasts) in runs.items():
            times[name][0].append(_timed(step, device, steps))
            times[name][1].append(_timed(broadcasts, device, steps))
    if dist.get_rank() == 0:
        print(f"{world} ranks (gloo), {rounds} rounds of {steps} steps each; per set: the median round (per tensor)")
        for name, (zero, bcast) in times.items():
            t, z, b = len(sets[name]), statistics.median(zero), statistics.median(bcast)
            if cluster_toml and not _uniform(name):
                print(f"  {name}: predicted ZeRO-1 step {predicted_step(name, cluster_toml, world) * 1e3:.2f} ms")
            print(f"  {name}: {t} tensors, {sum(sets[name])} elements; ZeRO-1 step {z * 1e3:.2f} ms ({z / t * 1e6:.0f} us "
                  f"a tensor), broadcasts alone {b * 1e3:.2f} ms ({b / t * 1e6:.0f} us); ZeRO-1's rounds "
                  f"{', '.join(f'{x * 1e3:.1f}' for x in zero)} ms")
    leave_distributed()


if __name__ == "__main__":
    main()
