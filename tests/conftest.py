"""Shared fixtures: small configs for every zoo model, captured once per session."""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import pytest
import torch

from partitioner.capture import CapturedModel, capture
from partitioner.graph import PartitionGraph, build_partition_graph
from partitioner.zoo import ZOO, LoadedModel, load_model, zoo_names

# Overrides that shrink each architecture to a few hundred thousand parameters.
SMALL: dict[str, dict[str, Any]] = {
    "GPT2LMHeadModel": dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=1000),
    "LlamaForCausalLM": dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128,
    ),
    "BertForMaskedLM": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=1000, max_position_embeddings=128,
    ),
}
SMALL_SEQ = 16
SMALL_LAYERS = 2


def small_config(name: str) -> dict[str, Any]:
    """Config overrides that make zoo model ``name`` small (2 layers)."""
    if name == "mlp":
        return dict(width=32, depth=SMALL_LAYERS)
    if name == "hetero-lm":
        return dict(vocab_size=500, d_model=32, widths="64,256")
    return dict(SMALL[ZOO[name].hf_class])


# One intra-op thread per worker: the suite's two workers share two cores, and a worker's 2-thread parallel
# regions then wait on a thread the other worker's work has descheduled ([Note: the suite on two workers]).
# Subprocesses (torchrun's ranks, the docs' commands) keep their own settings.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# [Note: the suite on two workers] README's test command runs the suite on two pytest-xdist workers, a file
# at a time on each (``--dist loadfile``: a file's module fixtures, such as test_runtime.py's shared
# launches, are made once), handing out files in the order collected (``--no-loadscope-reorder``;
# xdist's own order is by test count). The two files that take longest (about 5 and 2 of the suite's
# 13 minutes run alone, at 1ed7ffa) go first and so to different workers: started last, either one
# would run alone while the other worker idles. The rest keep pytest's order.
LONGEST_FIRST = ("test_runtime.py", "test_docs.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # a stable sort: order within a file stays


class Captured(NamedTuple):
    loaded: LoadedModel
    captured: CapturedModel
    graph: PartitionGraph


@pytest.fixture(scope="session")
def zoo_capture() -> Callable[[str], Captured]:
    """``zoo_capture(name)``: the small zoo model, captured and coarsened (cached per session)."""
    cache: dict[str, Captured] = {}

    def get(name: str) -> Captured:
        if name not in cache:
            seq = None if name == "mlp" else SMALL_SEQ
            lm = load_model(name, config=small_config(name), seq_len=seq)
            cm = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=lm.name)
            cache[name] = Captured(lm, cm, build_partition_graph(cm, lm.model))
        return cache[name]

    return get


ALL_ZOO = zoo_names()


def unique_numel(model: torch.nn.Module) -> int:
    """Elements of the model's distinct parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())
