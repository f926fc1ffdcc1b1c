"""Training data for ``autopart run``: a fixed synthetic corpus, or a user's token file.

``autopart run`` (runtime.run_plan) trains a plan for a few hundred steps to show that it
runs *and learns*. Fresh random tokens every step cannot be learned (the loss stays at
``ln(vocab)``), so by default the tokens come from a fixed synthetic corpus with structure a
model can pick up: a seeded Markov chain in which each token has only a few likely
successors, so the loss falls from ``ln(vocab)`` towards the chain's entropy. ``--data FILE``
trains on a user's tokens instead: a ``.bin`` file of little-endian ``uint16`` token ids (the
layout nanoGPT's ``prepare.py`` writes) or a ``.pt`` file holding a 1-D integer tensor.

Batches are windows of ``seq_len + 1`` tokens drawn at seeded random offsets: the inputs are
the first ``seq_len`` tokens, the targets the next-token shift of them. A model that does not
take token ids (a plain regression stack) gets a fixed set of input/target batches, cycled,
so its loss falls too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AutopartError

__all__ = ["DataError", "TokenCorpus", "synthetic_corpus", "load_tokens", "successors_entropy"]

SUCCESSORS = 4  # likely successors per token in the synthetic chain
CORPUS_TOKENS = 1 << 16  # length of the synthetic token stream


class DataError(AutopartError):
    """A token file cannot be read or does not fit the model (token ids past the vocabulary, too short)."""


def synthetic_corpus(vocab: int, n_tokens: int = CORPUS_TOKENS, seed: int = 0) -> torch.Tensor:
    """``n_tokens`` token ids from a seeded Markov chain: each token is followed by one of
    ``SUCCESSORS`` tokens (its own, drawn once), with probabilities 1/2, 1/4, 1/8, 1/8."""
    if vocab < 2:
        raise DataError(f"a synthetic corpus needs a vocabulary of at least 2 tokens, got {vocab}")
    g = torch.Generator().manual_seed(seed)
    k = min(SUCCESSORS, vocab)
    table = _successor_table(vocab, k, g)  # (vocab, k)
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125][:k])
    choice = torch.multinomial(probs / probs.sum(), n_tokens, replacement=True, generator=g)
    out = torch.empty(n_tokens, dtype=torch.long)
    tok = int(torch.randint(0, vocab, (1,), generator=g))
    for i in range(n_tokens):  # 64 Ki steps of integer indexing: well under a second
        out[i] = tok
        tok = int(table[tok, choice[i]])
    return out


def _successor_table(vocab: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` distinct successors for each of ``vocab`` tokens, in O(vocab * k) memory and time.

    A row whose draw repeats a token is drawn again: rare once ``vocab`` is well above ``k``, and
    a few rounds for a tiny vocabulary. (One ``randperm(vocab)[:k]`` per token kept every full
    permutation alive through its slice: vocab^2 int64s, 20 GB for GPT-2's 50,257 tokens.)"""
    table = torch.randint(0, vocab, (vocab, k), generator=g)
    while True:
        ordered = table.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if not bool(repeated.any()):
            return table
        table[repeated] = torch.randint(0, vocab, (int(repeated.sum()), k), generator=g)


def successors_entropy(vocab: int) -> float:
    """The synthetic chain's entropy per token (nats): the loss a perfect model reaches."""
    k = min(SUCCESSORS, vocab)
    p = torch.tensor([0.5, 0.25, 0.125, 0.125][:k])
    p = p / p.sum()
    return float(-(p * p.log()).sum()) if k > 1 else 0.0


def load_tokens(path: str | Path) -> torch.Tensor:
    """The token ids of a ``.bin`` (little-endian uint16) or ``.pt`` (1-D integer tensor) file."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            data = torch.load(path, weights_only=True)
            if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.dtype.is_floating_point:
                raise DataError(f"--data {path}: expected a 1-D integer tensor, got "
                                f"{type(data).__name__}{list(data.shape) if isinstance(data, torch.Tensor) else ''}")
            return data.long()
        if path.suffix == ".bin":
            raw = path.read_bytes()
            if len(raw) % 2:
                raise DataError(f"--data {path}: {len(raw)} bytes is not a whole number of uint16 token ids")
            return torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.uint16).long()
    except OSError as exc:
        raise DataError(f"--data {path}: cannot read it ({exc.strerror})") from None
    except DataError:
        raise
    except Exception as exc:  # torch.load on something that is not a tensor file
        raise DataError(f"--data {path}: not a token file ({type(exc).__name__}); give a .pt tensor or a uint16 .bin") from None
    raise DataError(f"--data {path}: unknown format {path.suffix!r}; give a .bin (uint16 token ids) or .pt (1-D integer tensor)")


@dataclass(frozen=True)
class TokenCorpus:
    """A token stream and the batches drawn from it: ``batch(step)`` is the same on every rank."""

    tokens: torch.Tensor  # 1-D long tensor of token ids
    source: str  # "synthetic (seed S)" or the file's path
    seed: int = 0

    @classmethod
    def make(cls, vocab: int, seq_len: int, data: str | Path | None = None, seed: int = 0) -> "TokenCorpus":
        tokens = synthetic_corpus(vocab, seed=seed) if data is None else load_tokens(data)
        where = f"synthetic (seed {seed})" if data is None else str(data)
        if tokens.numel() < seq_len + 1:
            raise DataError(f"--data {where}: {tokens.numel()} tokens, fewer than one window of {seq_len + 1}")
        if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
            raise DataError(f"--data {where}: token id {int(tokens.max())} is outside the model's vocabulary of {vocab}; "
                            "tokenize with the model's tokenizer (or pass --config vocab_size=...)")
        return cls(tokens, where, seed)

    def batch(self, step: int, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each ``(batch, seq_len)``: windows at seeded offsets, targets shifted by one."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - seq_len, (batch,), generator=g)
        windows = torch.stack([self.tokens[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
