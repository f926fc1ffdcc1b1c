"""What each recomputed block's ``torch.utils.checkpoint`` costs in the runtime, against its price.

A stage of every block of a model, each recomputed, is cut and checkpointed as the runtime does
(``rewrite.split_model``, ``recompute.checkpoint_in_graph``) and timed in this one process, plain
and checkpointed, forward and forward with backward, in interleaved rounds, by the thread's CPU
time (another job's load on the machine does not count). The checkpoints' own cost per
micro-batch is ``F_ck - F`` forward and ``(FB_ck - F_ck) - (FB - F) - F`` backward (the excess
less the replayed forward), as ``autopart calibrate`` defines it ([Note: measuring overheads] in
partitioner/calibrate.py). Measured twice: as the runtime calls the checkpoint
(``recompute.checkpointed``, the replay run to its end) and with torch's default early stop (the
runtime before [Note: a replay that stops early] in partitioner/recompute.py). Priced twice, by
calibrate's experiments run here: before, per call only (``C a_ckpt``, nn.Linear blocks under
torch's default checkpoint), and now, per call and per node that saves a tensor in the forward (``C a_ckpt + n a_ckpt_node``),
per call in the backward (``C a_ckpt_bwd``;
GraphModule blocks through ``checkpointed``: [Note: software overheads]). Calibrate's figures
are wall time on every rank at once; here one process's CPU time, both sides alike.

    python -m benchmarks.checkpoint_cost [--models mlp,gpt2-tiny] [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time


def early_stopped(function, *args, **kwargs):
    """The runtime's checkpoint before [Note: a replay that stops early]: torch's default early stop."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _stage(model: str, mbs: int):
    """(the checkpointed stage graph, the plain one, its inputs, calls, nodes) for ``model``."""
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.evaluate import StageSpec, checkpoint_calls
    from partitioner.plan import Mesh, Schedule
    from partitioner.planner import prepare
    from partitioner.recompute import checkpoint_in_graph
    from partitioner.rewrite import microbatch_inputs, split_model
    from partitioner.zoo import load_model

    lm = load_model(model, device="cpu")
    cap = capture(lm.model, lm.example_inputs, name=lm.name, batch_size=lm.batch_size)
    ev = prepare(cap, cluster=Cluster.local(1), global_batch=mbs, dtype="fp32")
    n = len(ev.pgraph.blocks)
    spec = StageSpec.whole(tuple(range(n)), True)
    plan, _ = ev.make_plan([spec], Mesh(1, 1, 1), Schedule("1f1b", 1, mbs), method="manual")
    blocks = [ev.pgraph.blocks[b] for b in spec.blocks]
    calls, nodes = checkpoint_calls(spec, [ev.block_cost(b, mbs, 1, {}) for b in blocks], [ev.saving_nodes(b) for b in blocks])
    inputs = microbatch_inputs(lm.example_inputs, mbs)
    graphs = []
    for ckpt in (False, True, True):
        torch_model = load_model(model, device="cpu").model
        prog = split_model(torch_model, plan, inputs).stages[0]
        if ckpt:
            checkpoint_in_graph(prog.module, plan.stages[0])
        graphs.append(prog.module)
    early = graphs[2]  # torch's default: the replay stopped early
    for node in early.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "checkpointed":
            node.target = early_stopped
    early.recompile()
    return graphs, inputs, calls, nodes


def _passes(module, inputs) -> list[float]:
    """(forward, forward and backward) of ``module``, thread CPU seconds."""

    def forward() -> None:
        out = module(*inputs)
        held[:] = [out]

    def both() -> None:
        out = module(*inputs)
        (out[0] if isinstance(out, (tuple, list)) else out).float().sum().backward()

    held: list = []
    timed = []
    for fn in (forward, both):
        t0 = time.thread_time()
        fn()
        timed.append(time.thread_time() - t0)
    return timed


def measure(model: str, reps: int, mbs: int = 2) -> dict:
    (plain, ours, early), inputs, calls, nodes = _stage(model, mbs)
    for m in (plain, ours, early):  # warm-up
        for _ in range(3):
            _passes(m, inputs)
    rounds: dict[str, list[tuple[float, float]]] = {"checkpointed": [], "early stop": []}
    for _ in range(reps):  # interleaved rounds
        f, fb = _passes(plain, inputs)
        for name, m in (("checkpointed", ours), ("early stop", early)):
            fc, fbc = _passes(m, inputs)
            rounds[name].append((fc - f, (fbc - fc) - (fb - f) - f))
    return {"model": model, "calls": calls, "nodes": nodes,
            **{name: (statistics.median(r[0] for r in got), statistics.median(r[1] for r in got))
               for name, got in rounds.items()}}


def per_call(reps: int, nodes: int, graph_modules: bool, n: int = 16) -> tuple[float, float]:
    """Calibrate's checkpointing experiment ([Note: measuring overheads]) in thread CPU time: ``n`` blocks of
    ``nodes`` nodes, per call ``(F_ck - F) / n`` and ``((FB_ck - F_ck) - (FB - F) - F) / n``, interleaved
    rounds. ``graph_modules``: GraphModule blocks through ``recompute.checkpointed`` (calibrate now); else
    nn.Linear blocks under torch's default checkpoint (calibrate before, ``nodes`` = 1)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from partitioner.calibrate import CheckpointBlock
    from partitioner.recompute import checkpointed

    torch.manual_seed(0)
    if graph_modules:
        blocks = [torch.fx.symbolic_trace(CheckpointBlock(nodes)) for _ in range(n)]
        call = checkpointed
    else:
        blocks = [torch.nn.Linear(16, 16) for _ in range(n)]
        call = lambda block, y: checkpoint(block, y, use_reentrant=False)  # noqa: E731
    x = torch.randn(4, 16, requires_grad=True)

    class Chain(torch.nn.Module):
        def __init__(self, ckpt: bool) -> None:
            super().__init__()
            self.ckpt = ckpt

        def forward(self, y):
            for block in blocks:
                y = call(block, y) if self.ckpt else block(y)
            return y

    plain, ckpt = Chain(False), Chain(True)
    got = []
    for i in range(reps + 3):
        (f, fb), (fc, fbc) = _passes(plain, (x,)), _passes(ckpt, (x,))
        if i >= 3:
            got.append(((fc - f) / n, ((fbc - fc) - (fb - f) - f) / n))
    return statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,gpt2-tiny", help="comma-separated zoo models (default mlp,gpt2-tiny)")
    ap.add_argument("--reps", type=int, default=30, help="interleaved rounds (default 30)")
    args = ap.parse_args(argv)
    import torch

    from partitioner.calibrate import CHECKPOINT_BLOCK_NODES, CheckpointSample, checkpoint_fit

    torch.set_num_threads(1)  # as each rank of `autopart run` on this CPU
    a0, a0_b = per_call(args.reps, 1, graph_modules=False)
    a, a_b, a_n = checkpoint_fit([CheckpointSample(k, *per_call(args.reps, k, graph_modules=True)) for k in CHECKPOINT_BLOCK_NODES])
    print(f"calibrate's experiment before, CPU time here: a_ckpt {a0 * 1e6:.0f} us, a_ckpt_bwd {a0_b * 1e6:.0f} us")
    print(f"calibrate's experiment now, CPU time here: a_ckpt {a * 1e6:.0f} us, a_ckpt_bwd {a_b * 1e6:.0f} us, "
          f"a_ckpt_node {a_n * 1e6:.1f} us")
    print("| model | calls | nodes | priced per call (before): F / B | priced per call and node (now): F / B "
          "| measured, early stop (runtime before): F / B | measured, checkpointed (runtime now): F / B |")
    print("|---|---:|---:|---|---|---|---|")
    for model in args.models.split(","):
        r = measure(model, args.reps)
        c, n = r["calls"], r["nodes"]
        ms = lambda f, b: f"{f * 1e3:.2f} / {b * 1e3:.2f} ms"  # noqa: E731
        print(f"| {model} | {c} | {n} | {ms(c * a0, c * a0_b)} | {ms(c * a + n * a_n, c * a_b)} "
              f"| {ms(*r['early stop'])} | {ms(*r['checkpointed'])} |")


if __name__ == "__main__":
    main()
