"""What the loss costs beside the head that feeds it: a large vocabulary's cross-entropy on this device.

The cost model prices the captured graph (the model up to its logits); the loss the runtime applies
to them (``F.cross_entropy`` for token ids) is priced for memory ([Note: the loss's memory] in
cost_models/memory.py) but not for time. This times, in one process with one thread, the head's
linear (tokens x hidden -> vocabulary) and the cross-entropy on its logits, each forward and
forward+backward, as the median of ``--reps`` runs in CPU time, for the micro-batches given.

    python -m benchmarks.loss_cost [--vocab 50257] [--hidden 128] [--tokens 128,256] [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--tokens", default="128,256", help="tokens per micro-batch, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"vocabulary {args.vocab}, hidden {args.hidden}, one thread, CPU time, median of {args.reps}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        w = torch.randn(args.vocab, args.hidden, requires_grad=True)
        x = torch.randn(tokens, args.hidden, requires_grad=True)
        y = torch.randint(0, args.vocab, (tokens,))
        logits = torch.randn(tokens, args.vocab, requires_grad=True)

        def head() -> None:
            with torch.no_grad():
                torch.nn.functional.linear(x, w)

        def head_bwd() -> None:
            torch.nn.functional.linear(x, w).sum().backward()

        def loss() -> None:
            with torch.no_grad():
                torch.nn.functional.cross_entropy(logits, y)

        def loss_bwd() -> None:
            torch.nn.functional.cross_entropy(logits, y).backward()

        h, hb, l, lb = (_median_ms(f, args.reps) for f in (head, head_bwd, loss, loss_bwd))
        print(f"{tokens} tokens: head linear {h:.1f} ms forward, {hb:.1f} ms forward+backward; "
              f"cross-entropy on its {tokens * args.vocab * 4 / 2**20:.0f} MiB of logits {l:.1f} ms forward, "
              f"{lb:.1f} ms forward+backward ({lb / max(hb, 1e-9):.2f}x the head's)")


if __name__ == "__main__":
    main()
