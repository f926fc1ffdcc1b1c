"""The data ``autopart run`` trains on: a fixed synthetic corpus a model can learn, or a token file.

benchmarks/run_learning.py shows a 200-step ``autopart run`` on it with the loss falling.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from partitioner.corpus import DataError, TokenCorpus, load_tokens, successors_entropy, synthetic_corpus


def test_synthetic_corpus_is_fixed_and_learnable() -> None:
    a, b = synthetic_corpus(96, 4096, seed=0), synthetic_corpus(96, 4096, seed=0)
    assert torch.equal(a, b) and not torch.equal(a, synthetic_corpus(96, 4096, seed=1))
    # Each token has at most 4 successors: the bigram entropy is far below ln(vocab).
    succ = {}
    for x, y in zip(a.tolist(), a[1:].tolist()):
        succ.setdefault(x, set()).add(y)
    assert max(len(s) for s in succ.values()) <= 4
    assert successors_entropy(96) < math.log(96) / 3


def test_batches_are_next_token_windows_the_same_on_every_call() -> None:
    corpus = TokenCorpus.make(96, seq_len=8, seed=0)
    ids, target = corpus.batch(3, 4, 8)
    assert ids.shape == target.shape == (4, 8)
    assert torch.equal(ids[:, 1:], target[:, :-1])
    again, _ = corpus.batch(3, 4, 8)
    assert torch.equal(ids, again) and not torch.equal(ids, corpus.batch(4, 4, 8)[0])


def test_token_files(tmp_path: Path) -> None:
    tokens = torch.arange(50) % 7
    (tmp_path / "t.pt").write_bytes(b"")
    torch.save(tokens, tmp_path / "t.pt")
    tokens.to(torch.int16).numpy().astype("<u2").tofile(tmp_path / "t.bin")
    assert torch.equal(load_tokens(tmp_path / "t.pt"), tokens)
    assert torch.equal(load_tokens(tmp_path / "t.bin"), tokens)
    assert TokenCorpus.make(7, 8, tmp_path / "t.bin").source == str(tmp_path / "t.bin")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    (tmp_path / "float.pt").write_bytes(b"")
    torch.save(torch.randn(10), tmp_path / "float.pt")
    cases = {
        tmp_path / "odd.bin": "whole number",
        tmp_path / "float.pt": "1-D integer tensor",
        tmp_path / "t.txt": "unknown format",
        tmp_path / "missing.pt": "cannot read",
    }
    for path, words in cases.items():
        with pytest.raises(DataError, match=words):
            TokenCorpus.make(7, 8, path)
    with pytest.raises(DataError, match="outside the model's vocabulary of 5"):
        TokenCorpus.make(5, 8, tmp_path / "t.pt")
    with pytest.raises(DataError, match="fewer than one window"):
        TokenCorpus.make(7, 100, tmp_path / "t.pt")
