"""The head and the loss on one process: whole (cross_entropy after the head, as the runtime runs a plain
plan) against the vocabulary in chunks with the loss in the graph (partitioner/vocab_split.py), forward and
backward, alternating, one thread. The measured-quality GPT-2's head: 50,257 outputs of width 128, a
micro-batch of 4 x 64 tokens.

    python benchmarks/results/2026-12-07-vocab-parallel/loss_cost.py [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from partitioner.vocab_split import vocab_loss


class HeadOnly(torch.nn.Module):
    """Token ids -> an embedding (the body's stand-in) -> the head's logits."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, width, batch, seq = 50257, 128, 4, 64
    model = HeadOnly(vocab, width)
    ids, y = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))

    def whole() -> float:
        out = model(ids)
        loss = F.cross_entropy(out.reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        return float(loss.detach())

    def chunked(k: int):
        def run() -> float:
            with vocab_loss(model, k, (ids,)):
                loss = model(ids, y)
            loss.backward()
            return float(loss.detach())
        return run

    cases = {"whole": whole, **{f"{k} chunks": chunked(k) for k in (2, 4, 8)}}
    times: dict[str, list[float]] = {name: [] for name in cases}
    losses = {}
    for r in range(args.rounds):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            losses[name] = cases[name]()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["whole"][2:])
    for name, ts in times.items():
        m = statistics.median(ts[2:])
        print(f"{name:>9}: {m * 1e3:7.1f} ms  ({m / base:.2f}x of whole)  loss {losses[name]:.6f}")


if __name__ == "__main__":
    main()
