"""Overhead of auto_parallelize vs hand-written torch.distributed.pipelining, same split and schedule.

Run under torchrun (2 ranks, one thread each):

    OMP_NUM_THREADS=1 PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/runtime_overhead.py \
        --model gpt2-tiny --config n_layer=8 n_embd=256 n_head=8 --steps 20

Both sides: the same plan's stage boundary (the first block of stage 1), 1F1B, the same
micro-batches, SGD. The hand-written side is ``pipeline(model, split_spec=...)`` +
``build_stage`` + ``Schedule1F1B``, as in torch's pipelining tutorial. Steps alternate
between the two so that noise from other work on the machine hits both alike; rank 0
prints the median step times and the throughput ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-tiny")
    ap.add_argument("--config", nargs="*", default=[])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    from torch.distributed.pipelining import Schedule1F1B, SplitPoint, pipeline

    from partitioner import Cluster, plan_parallelism
    from partitioner.devices import leave_distributed
    from partitioner.runtime import ParallelModel
    from partitioner.zoo import load_model, parse_config_overrides

    torch.manual_seed(0)
    lm = load_model(args.model, config=parse_config_overrides(args.config), seq_len=args.seq_len, device="cpu")
    model = lm.model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    hand_model = copy.deepcopy(model)
    plan = plan_parallelism(model, lm.example_inputs, Cluster.local(2), global_batch=args.global_batch, method="params",
                            pp=2, microbatches=args.microbatches, schedule="1f1b", dtype="fp32").plan
    vocab = model.config.vocab_size

    def loss_fn(out, y):
        logits = out.logits if hasattr(out, "logits") else out[0]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    pm = ParallelModel(model, plan, lm.example_inputs, loss_fn, lambda ps: torch.optim.SGD(ps, lr=1e-3))

    # Hand-written: the same boundary, through pipeline() and build_stage.
    mbs = plan.schedule.micro_batch_size
    ids = torch.randint(0, vocab, (args.global_batch, args.seq_len))
    target = torch.randint(0, vocab, (args.global_batch, args.seq_len))
    first_of_stage1 = plan.stages[1].modules[0]
    pipe = pipeline(hand_model, mb_args=(ids[:mbs],), split_spec={first_of_stage1: SplitPoint.BEGINNING})
    stage = pipe.build_stage(rank, torch.device("cpu"))
    hand_opt = torch.optim.SGD(stage.submod.parameters(), lr=1e-3)

    def hand_loss(out, y):
        return torch.nn.functional.cross_entropy(out.reshape(-1, vocab), y.reshape(-1))

    hand = Schedule1F1B(stage, args.microbatches, loss_fn=hand_loss)

    def hand_step() -> None:
        hand_opt.zero_grad()
        if rank == 0:
            hand.step(ids)
        else:
            hand.step(target=target)
        hand_opt.step()
        dist.barrier()

    def auto_step() -> None:
        pm.step(ids, target=target)
        dist.barrier()

    ours, theirs = [], []
    for i in range(args.steps + 2):
        for fn, out in ((auto_step, ours), (hand_step, theirs)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i >= 2:  # warm-up
                out.append(time.perf_counter() - t0)
    pm.close()
    if rank == 0:
        a, h = statistics.median(ours), statistics.median(theirs)
        print(f"{args.model} {' '.join(args.config)} seq {args.seq_len} batch {args.global_batch} "
              f"x{args.microbatches} mb, split before {first_of_stage1}")
        print(f"auto_parallelize median step {a * 1e3:.1f} ms; hand-written pipelining {h * 1e3:.1f} ms; "
              f"throughput ratio {h / a:.3f}x")
    leave_distributed()  # after a last barrier ([Note: the last barrier] in partitioner/devices.py)


if __name__ == "__main__":
    main()
