"""Materializing a meta model: a part of it gets the values the whole would (one process, no launch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runtime_harness import MODELS, SEQ  # noqa: E402

from partitioner.materialize import MaterializeError, materialize  # noqa: E402
from partitioner.zoo import load_model  # noqa: E402


def _meta(name: str) -> torch.nn.Module:
    return load_model(name, config=MODELS[name], seq_len=None if name == "mlp" else SEQ, device="meta").model


@pytest.mark.parametrize("name", list(MODELS))
def test_part_equals_whole(name: str) -> None:
    """The second half of the parameters (GPT-2's and BERT's tied head among them), materialized alone,
    equal the same tensors of the whole model materialized; nothing else becomes real."""
    whole = _meta(name)
    materialize(whole, "cpu", seed=3)
    assert not any(t.is_meta for t in [*whole.parameters(), *whole.buffers()])
    part = _meta(name)
    names = [n for n, _ in part.named_parameters()]
    asked = names[len(names) // 2 :] + [n for n, _ in part.named_buffers()]
    kept = materialize(part, "cpu", asked, seed=3)
    ref = dict([*whole.named_parameters(), *whole.named_buffers()])
    real = {n: t for n, t in [*part.named_parameters(), *part.named_buffers()] if not t.is_meta}
    assert set(real) == set(asked)
    assert kept == sum(t.numel() * t.element_size() for t in real.values())
    for n, t in real.items():
        assert torch.equal(t, ref[n]), n
    other = _meta(name)
    materialize(other, "cpu", seed=4)
    assert not torch.equal(dict(other.named_parameters())[names[0]], dict(whole.named_parameters())[names[0]])


def test_module_without_initialization_is_refused() -> None:
    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), Scale())
    with pytest.raises(MaterializeError, match=r"module 1 \(Scale\) holds gain .* reset_parameters"):
        materialize(model, "cpu")


def test_real_tensors_are_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    before = model[0].weight.detach().clone()
    with torch.device("meta"):
        model[1] = torch.nn.Linear(4, 4)
    materialize(model, "cpu")
    assert torch.equal(model[0].weight, before) and not model[1].weight.is_meta
