"""Stable node keys: what a Plan names nodes by ([Note: stable node keys] in capture.py).

Keys are recorded at capture (module FQN, op, occurrence within the module) and
must not depend on the batch size or the sequence length; the rewriter matches a
plan made at batch 1 to the graph it exports at the micro-batch size by them.
"""

from __future__ import annotations

import pytest

from partitioner.baselines import Pins, plan_baseline
from partitioner.capture import capture
from partitioner.cluster import Cluster
from partitioner.planner import prepare
from partitioner.rewrite import microbatch_inputs, split_model
from partitioner.zoo import load_model
from conftest import small_config


def _keys(name: str, batch: int, seq_len: int) -> list[str]:
    loaded = load_model(name, seq_len=seq_len, config=small_config(name))
    cap = capture(loaded.model, microbatch_inputs(loaded.example_inputs, batch), name=name)
    return [n.key for n in cap.compute_nodes()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_keys_are_the_same_at_two_batch_sizes_and_two_sequence_lengths(name):
    keys = {(b, s): _keys(name, b, s) for b, s in ((2, 16), (4, 16), (2, 32))}
    first = keys[(2, 16)]
    assert len(set(first)) == len(first)  # unique
    assert any(k.startswith(("transformer.h.1.", "model.layers.1.")) for k in first)
    for where, other in keys.items():
        assert other == first, where
    # At batch 1 torch leaves out the ops that broadcast to the batch; nothing else differs.
    one = _keys(name, 1, 16)
    assert set(one) <= set(first)
    extra = [k for k in first if k not in one]
    assert extra and all("aten.expand" in k for k in extra), extra


def test_a_batch_one_plan_runs_at_a_larger_micro_batch_matched_by_key():
    loaded = load_model("gpt2-tiny", device="cpu")
    ev = prepare(loaded.model, loaded.example_inputs, Cluster.preset("dgx-a100-80g", 1), global_batch=16, name=loaded.name)
    plan, _ = plan_baseline("megatron", ev, Pins(pp=2, tp=2, microbatches=4))
    assert plan.schedule.micro_batch_size == 2 and ev.captured.batch_size == 1
    keys = {k for st in plan.stages for k in st.nodes}
    assert keys == {n.key for n in ev.captured.compute_nodes()}  # the plan names nodes by key
    split = split_model(loaded.model, plan, microbatch_inputs(loaded.example_inputs, 2))
    assert split.matched_by == "keys"
    # Every sharded node of the plan found its runtime node, on the plan's stage.
    assert sum(len(st.sharding) for st in split.stages) == len(plan.sharding)
    strategies = sorted(v for st in split.stages for v in st.sharding.values())
    assert strategies == sorted(plan.sharding.values())
    owned = [len(st.nodes) for st in split.stages]
    assert sum(owned) == len(keys) + 1  # the one extra expand of the mask, with its producer
