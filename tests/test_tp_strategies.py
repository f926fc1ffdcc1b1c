"""One table of tensor-parallel strategies (partitioner/tp_strategies.py) that every phase reads.

The plan's vocabulary, the docs, pricing's op classes, the profiler's shards and the runtime's
parameter splits all come from ``STRATEGIES``; these tests fail when one of them drifts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cost_models import op_class
from partitioner import plan as plan_mod
from partitioner.capture import capture
from partitioner.sharding import megatron_sharding, sharded_params
from partitioner.tp_strategies import LINEAR_FORMS, STRATEGIES, allowed_strategies, linear_form
from partitioner.zoo import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_the_plan_and_the_docs_list_the_registry():
    assert plan_mod.STRATEGIES == tuple(STRATEGIES)
    table = (ROOT / "docs" / "architecture.md").read_text()
    documented = re.findall(r"^\| `(\w+)` \| ", table.split("### Tensor-parallel sharding", 1)[1], re.M)
    assert documented[: len(STRATEGIES)] == list(STRATEGIES)
    for s in STRATEGIES.values():
        assert s.doc, s.name


def test_pricing_and_tensor_parallelism_classify_ops_alike():
    for base in LINEAR_FORMS:
        assert op_class(f"aten.{base}.default") == "matmul", base
    for target in ("aten._scaled_dot_product_flash_attention_for_cpu.default",
                   "aten.scaled_dot_product_attention.default", "aten._efficient_attention_forward.default"):
        assert op_class(target) == "attention", target
    assert linear_form("aten.bmm.default") is None  # a batched matmul has no weight to split


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny"])
def test_profiler_shards_match_the_runtime_split(model):
    """For every node Megatron's layout splits, the shard the profiler times holds the same part of
    each parameter as the runtime keeps (``param_dims``), and the memory model counts it as split."""
    lm = load_model(model)
    cap = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=lm.name)
    sharding = megatron_sharding(cap, 2)
    split = sharded_params(cap, sharding)
    seen = set()
    for name, strat_name in sharding.items():
        strat = STRATEGIES[strat_name]
        node = cap.nodes[name]
        assert strat_name in allowed_strategies(node, cap, 2)
        dims = strat.param_dims(node.target)
        if strat.local_args is None or not strat.measured(node.target):
            continue
        seen.add(strat_name)
        params = [p for p in node.params if p in cap.params]
        if linear_form(node.target) is not None:
            form = linear_form(node.target)
            full = {form.weight: next(p for p in params if len(cap.params[p].shape) == 2)}
            if form.bias is not None and len(params) > 1:
                full[form.bias] = next(p for p in params if len(cap.params[p].shape) == 1)
            n_args = max([form.activation, *full]) + 1
            args = [None] * n_args
            args[form.activation] = torch.zeros(4, cap.params[full[form.weight]].shape[1 - form.out_dim])
            for i, p in full.items():
                args[i] = torch.zeros(cap.params[p].shape)
            cut = list(args)
            strat.local_args(node.target, cut, {}, 2)
            for i, p in full.items():
                shape = tuple(cap.params[p].shape)
                if i in dims:
                    want = list(shape)
                    want[dims[i]] //= 2
                    assert tuple(cut[i].shape) == tuple(want), (name, p)
                    assert p in split, (name, p)
                else:
                    assert tuple(cut[i].shape) == shape and p not in split, (name, p)
    assert {"column", "row"} <= seen
