"""The output head and the loss, split by vocabulary into chunks the planner may place on different stages.

[Note: vocabulary chunks]
A language model's output projection (``lm_head``: hidden -> vocabulary) is one block, and on a
narrow model with a large vocabulary it outweighs every layer together: the GPT-2 of
benchmarks/measured_quality.py (4 layers of width 128, 50,257 tokens) spends about 85% of its
compute there. A pipeline that cuts only between blocks cannot balance that: whatever the split,
the stage holding the head is the step's bottleneck (its best split, the head alone, is about 4-8%
faster than Megatron's uniform split there). Splitting the head's vocabulary across the pipeline
stages balances it: the vocabulary parallelism of Yeung et al., "Balancing Pipeline Parallelism
with Vocabulary Parallelism" (2025).

Splitting only the head's GEMM is not enough. A chunk on an earlier stage would send its logits
(micro-batch x sequence x its share of the vocabulary, 12.9 MB a micro-batch on that GPT-2) to the
last stage for the loss, and measured, those transfers ate the gain (predicted 1.34x, measured
1.02x: benchmarks/results/2026-12-07-vocab-chunks-tried.md). So the loss moves into the graph, as
in Megatron's vocabulary-parallel cross-entropy. Chunk ``i`` of rows ``[lo, hi)`` computes, per
token, from the hidden state ``h`` and the target ``y``, and folds into what the chunks before it
computed (an online softmax's running log-sum-exp):

    z_i   = h W[lo:hi]^T (+ b[lo:hi])                      (in fp32)
    L_i   = logaddexp(L_{i-1}, log sum_j exp(z_i[j]))      (L_0 = the first chunk's own)
    T_i   = T_{i-1} + (z_i[y - lo] if lo <= y < hi else 0)

and the loss is ``mean over tokens (y != -100) of L_k - T_k``: the cross-entropy of the whole
logits. A chunk on an earlier stage sends two numbers a token on. The fold makes the chunks a
chain, so that the blocks' order is the vocabulary's and a plan's stages keep the model's order (as
independent blocks, the planner put ``vocab1`` on a stage before ``vocab0``'s, which the runtime
refuses).

How: ``vocab_loss(model, k, args)`` (a context manager) makes the model's forward take the targets
as one more positional input and return that mean loss: the head's own call returns its input (the
hidden state) and ``k`` chunk modules, children of the head named ``vocab0``..``vocab<k-1>`` with no
parameters of their own, read its weight (and bias) in slices; ``vocab_loss`` takes the mean. capture
and the runtime's rewrite export the model inside it, so the plan's node keys name the same nodes in
both graphs, and each chunk's nodes carry the module path ``<head>.vocab<i>``: each chunk reads the
head's weight, so it is a block of its own ([Note: how nodes become blocks] in graph.py); the
mean joins the last chunk's block. The chunk count is a choice made outside the ILP: ``autopart plan
--vocab-chunks auto`` plans 1, 2, 4 and 8 chunks and keeps the fastest plan (cli.py).

What it asks of the model: its output (a tensor, a tuple's first element or ``.logits``) is the
head's output unchanged. A model that scales or caps its logits after the head is refused, named.
What it costs: the weight stays one parameter, read by every stage that holds a chunk, so a stage
holding a chunk holds the whole weight and its gradient is summed across those stages like any
weight that several stages read (tied weights). The runtime trains with this loss (the mean
cross-entropy of the logits against the targets) in place of a loss function
(runtime/model.py). A chunk's linear reads a slice, not a parameter, so tensor parallelism does not
shard it, and a split backward cannot make its weight's gradient apart ([Note: weights a split
backward cannot reach] in graph.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import CaptureError

__all__ = ["vocab_loss", "output_head", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # targets that count for nothing, as torch.nn.functional.cross_entropy's default


class _Chunk(torch.nn.Module):
    """Rows ``[lo, hi)`` of the head: each token's log-sum-exp over them and its target's logit there."""

    def __init__(self, head: torch.nn.Linear, lo: int, hi: int) -> None:
        super().__init__()
        object.__setattr__(self, "_head", head)  # not a child: the head's parameters keep their names
        self.lo, self.hi = lo, hi

    def forward(self, h: torch.Tensor, y: torch.Tensor,
                running: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        head = self._head
        bias = head.bias[self.lo : self.hi] if head.bias is not None else None
        z = F.linear(h, head.weight[self.lo : self.hi], bias)
        z = z if z.dtype == torch.float32 else z.float()  # the loss in fp32, as the runtime's loss_inputs
        local = y - self.lo
        inside = (local >= 0) & (local < self.hi - self.lo)
        picked = torch.gather(z, -1, local.clamp(0, self.hi - self.lo - 1).unsqueeze(-1)).squeeze(-1) * inside
        lse = torch.logsumexp(z, dim=-1)
        if running is None:
            return lse, picked
        return torch.logaddexp(running[0], lse), running[1] + picked  # folded into the chunks before


class _Mean(torch.nn.Module):
    """The folded statistics into the mean cross-entropy over the tokens that count."""

    def forward(self, stats: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        counts = (y != IGNORE_INDEX).float()
        return ((stats[0] - stats[1]) * counts).sum() / counts.sum().clamp(min=1.0)


def output_head(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    """The model's output head, its path and module: Hugging Face's ``get_output_embeddings()``, else
    the last ``nn.Linear`` the model registers."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        raise CaptureError(f"vocab_chunks: {type(model).__name__} has no linear output head to split; "
                           "leave vocab_chunks at 1")
    path = next(n for n, m in model.named_modules() if m is head)
    return path, head


def _logits(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return None


@contextlib.contextmanager
def vocab_loss(model: torch.nn.Module, chunks: int, args: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    """Inside: ``model(*args, targets)`` returns the mean cross-entropy of its logits against ``targets``,
    computed in ``chunks`` vocabulary chunks ([Note: vocabulary chunks]). Yields ``args`` with example
    targets (zeros shaped as the first input, the token ids) appended. The model is as before on exit."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 2:
        raise CaptureError(f"vocab_chunks must be a whole number of at least 2 here, got {chunks!r}")
    ids = args[0] if args else None
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() < 1:
        raise CaptureError(f"vocab_chunks: {type(model).__name__}'s first input is not token ids; the vocabulary "
                           "chunks put a language model's cross-entropy in the graph. Leave vocab_chunks at 1")
    path, head = output_head(model)
    rows = int(head.weight.shape[0])
    if chunks > rows:
        raise CaptureError(f"vocab_chunks={chunks} is more than the head {path}'s {rows} outputs")
    bounds = [rows * i // chunks for i in range(chunks + 1)]
    parts = [_Chunk(head, bounds[i], bounds[i + 1]) for i in range(chunks)]
    total = _Mean()
    seen: list[torch.Tensor] = []

    def head_forward(x: torch.Tensor) -> torch.Tensor:  # the hidden state goes on to the chunks
        seen.append(x)
        return x

    def forward(*inputs: Any, **kwargs: Any) -> torch.Tensor:
        *given, y = inputs
        seen.clear()
        h = _logits(model_forward(*given, **kwargs))
        if not seen or h is not seen[-1]:
            raise CaptureError(
                f"vocab_chunks: {type(model).__name__}'s output is not its head {path}'s output unchanged (it "
                "changes the logits after the head, or does not return them); leave vocab_chunks at 1")
        if tuple(y.shape) != tuple(h.shape[:-1]):
            raise CaptureError(f"vocab_chunks: the targets' shape {tuple(y.shape)} is not the logits' "
                               f"{tuple(h.shape[:-1])} less the vocabulary")
        running = None
        for p in parts:  # a chain: each chunk folds its statistics into the running ones
            running = p(h, y, running)
        return total(running, y)

    model_forward = model.forward
    own = (model.__dict__.get("forward"), head.__dict__.get("forward"))  # instance attributes to put back
    for i, p in enumerate(parts):
        head.add_module(f"vocab{i}", p)
    head.add_module("vocab_loss", total)
    head.forward = head_forward
    model.forward = forward
    try:
        yield (*args, torch.zeros_like(ids))
    finally:
        del model.forward, head.forward
        for module, attr in ((model, own[0]), (head, own[1])):
            if attr is not None:
                module.forward = attr
        for i in range(chunks):
            del head._modules[f"vocab{i}"]
        del head._modules["vocab_loss"]
