"""Sharded data parallelism (ZeRO-2/3, HSDP) in one process: the block folding FSDP needs, the search's
choice where only sharded weights fit, HSDP's shard groups and what explain says.

The multi-process runs (equivalence with a single process, byte-exact residency) are the
dp2-zero2-recompute, dp2-zero3, pp2xdp2-zero3, tp2xdp2-zero3 and dp4-hsdp layouts of tests/test_runtime.py.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from partitioner.baselines import Pins, with_dp_sharding
from partitioner.capture import capture
from partitioner.cluster import Cluster
from partitioner.dp_sharding import hsdp_shard
from partitioner.errors import PlanError
from partitioner.explain import dp_sharding_summary
from partitioner.fsdp import nest_blocks
from partitioner.planner import plan_parallelism, prepare
from partitioner.rewrite import microbatch_inputs, split_model
from partitioner.solver.search import plan_ilp
from partitioner.zoo import load_model

BIGVOCAB = dict(n_layer=8, n_embd=128, n_head=4, vocab_size=64000)  # the tied embedding dwarfs a layer


def test_nest_blocks_folds_each_layer_and_keeps_names_and_outputs():
    lm = load_model("gpt2-tiny", config=dict(n_layer=3))
    model = lm.model.eval()
    result = plan_parallelism(model, lm.example_inputs, Cluster.local(1), global_batch=1, method="uniform", dtype="fp32")
    blocks = result.plan.stages[0].modules
    gm = split_model(model, result.plan, microbatch_inputs(lm.example_inputs, 1)).stages[0].module
    before = copy.deepcopy(gm)
    names = [n for n, _ in gm.named_parameters()]
    folded = nest_blocks(gm, blocks)
    # The transformer layers are folded; the tied embedding (read by the LM head too) stays with the root.
    assert [b for b in folded if ".h." in b] == [f"transformer.h.{i}" for i in range(3)], folded
    assert "transformer.wte" not in folded
    assert [n for n, _ in gm.named_parameters()] == names  # checkpoints and tied weights see the same names
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == folded
    torch.testing.assert_close(gm(*lm.example_inputs), before(*lm.example_inputs))


@pytest.fixture(scope="module")
def bigvocab():
    lm = load_model("gpt-bigvocab", dtype="bf16", config=BIGVOCAB, seq_len=128)
    return capture(lm.model, lm.example_inputs, name=lm.name, batch_size=lm.batch_size)


def test_search_shards_the_weights_where_only_that_fits_and_stays_deterministic(bigvocab):
    # 0.15 GiB devices, tp pinned to 1: the tied 64k-vocabulary embedding sits whole on a pipeline
    # stage, and whole per replica under DDP or ZeRO-1; only ZeRO-2/3 cut it. (The loss's logits-sized
    # tensors on the last stage, docs/solver.md "Memory", took this from 0.1 GiB.)
    small = Cluster.from_dict({"preset": "dgx-a100-80g", "devices_per_node": 4, "device": {"memory_gib": 0.15}})
    ev = prepare(bigvocab, cluster=small, global_batch=8, memory_margin=0.0)  # the margin: tests/test_memory_model.py
    first = plan_ilp(ev, Pins(tp=1), time_limit_s=4.0).plan
    assert first.predicted.fits and first.training.dp_sharding in ("zero2", "zero3", "hsdp"), first.training
    zero1 = replace(first, training=replace(first.training, dp_sharding="zero1"))
    assert not with_dp_sharding(ev, "zero1").score(zero1)[0].predicted.fits
    again = plan_ilp(ev, Pins(tp=1), time_limit_s=4.0).plan
    dumps = [d.to_dict() for d in (first, again)]
    for d in dumps:
        d["solver"].pop("wall_s")
    assert json.dumps(dumps[0], sort_keys=True) == json.dumps(dumps[1], sort_keys=True)
    text = dp_sharding_summary(first, ev)
    assert text.startswith(f"{first.training.dp_sharding} frees ") and "% hidden behind compute" in text, text


def test_hsdp_shards_within_a_node_and_refuses_an_uneven_group():
    two = Cluster.local(8).with_nodes(2, 4)
    assert hsdp_shard(tuple(range(8)), two.node_of) == 4  # 4 per node, replicated over 2 nodes
    assert hsdp_shard((0, 2, 4, 6), two.node_of) == 2  # tp=2: two dp ranks per node
    with pytest.raises(PlanError, match="spreads unevenly over nodes.*use dp_sharding zero3"):
        hsdp_shard((0, 1, 2, 3, 4), two.node_of)


def test_hsdp_is_searched_only_where_it_differs_from_zero3():
    lm = load_model("gpt2-tiny")
    cap = capture(lm.model, lm.example_inputs, name=lm.name, batch_size=lm.batch_size)
    for nodes, expect in ((1, False), (2, True)):
        cluster = Cluster.preset("dgx-a100-80g", nodes)
        ev = prepare(cap, cluster=cluster, global_batch=8 * nodes * 8)
        result = plan_parallelism(cap, cluster=cluster, global_batch=8 * nodes * 8, method="ilp", tp=1, pp=1,
                                  time_limit_s=2.0)
        tried = {a.candidate.dp_sharding for a in result.report.attempts} | {c.dp_sharding for c in result.report.pruned}
        assert ("hsdp" in tried) == expect, (nodes, tried)
        assert ev.training.dp_sharding == "none"
