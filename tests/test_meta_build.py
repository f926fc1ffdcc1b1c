"""Ranks of large plans built on meta under the fake process group (partitioner/meta_build.py).

The big plans in tests/plans/ were made by `autopart plan` (the commands are in benchmarks/meta_build.py);
each of their ranks is built in a fresh process, as a GPU rank would build it. They are Megatron's
layouts (`--method megatron`: tp=8 in a node, pp across nodes, no ZeRO-1, which a meta build does
not model). The suite builds one rank, GPT-3's last (the one with the head); benchmarks/meta_build.py
builds the first, a middle and the last rank of both plans (GPT-3 175B and Llama-2 70B)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from partitioner import Cluster, plan_parallelism
from partitioner.meta_build import MetaBuildError, build_rank, build_rank_isolated, chosen_ranks
from partitioner.plan import Plan

sys.path.insert(0, str(Path(__file__).parent))
from runtime_harness import MODELS  # noqa: E402

PLANS = Path(__file__).parent / "plans"
GPT3 = PLANS / "gpt3-175b-64x-dgx-a100-80g.json"


def _tiny_plan() -> Plan:
    """gpt2-tiny in bf16 on 8 ranks (pp=2, tp=2, dp=2, 1F1B), on a CPU cluster that prices bf16."""
    from partitioner.zoo import load_model

    base = Cluster.local(8)
    peak = base.device.peak_flops["fp32"]
    cluster = dataclasses.replace(base, device=dataclasses.replace(base.device, peak_flops={"fp32": peak, "bf16": peak}))
    lm = load_model("gpt2-tiny", config=MODELS["gpt2-tiny"], seq_len=8, dtype="bf16", device="meta")
    return plan_parallelism(lm.model, lm.example_inputs, cluster, global_batch=4, method="params", pp=2, tp=2, dp=2,
                            schedule="1f1b", dtype="bf16").plan  # one stage per rank (the grid may otherwise pick two chunks)


@pytest.mark.slow
def test_a_tiny_plan_builds_as_planned_and_a_wrong_prediction_is_caught():
    plan = _tiny_plan()
    assert chosen_ranks(plan)[0] == 0 and chosen_ranks(plan)[2] == 7
    build = build_rank(plan, "gpt2-tiny", 5, config=MODELS["gpt2-tiny"])
    assert build.coords == (1, 0, 1) and build.stages == (1,)
    assert build.optimizer == "MasterWeightOptimizer"
    assert build.problems() == [], build.problems()
    sharded = {p.name: p for p in build.params if p.placement != "R"}
    assert sharded and all(p.global_shape == p.full_shape != p.local_shape for p in sharded.values())
    assert build.held.state == 6 * build.held.weights == 6 * build.held.grads  # 12 fp32 bytes vs 2 bf16 bytes
    # The check can fail: a plan that charged the stage less than it holds is reported, with both figures.
    bad = dataclasses.replace(build, predicted_resident_bytes=build.predicted_resident_bytes - 2)
    assert any("the plan charged" in p for p in bad.problems())
    shifted = dataclasses.replace(build, params=(dataclasses.replace(build.params[0], global_shape=(1,)),) + build.params[1:])
    assert any(build.params[0].name in p for p in shifted.problems())


def test_a_rank_outside_the_world_is_a_clear_error():
    plan = Plan.load(GPT3)
    with pytest.raises(MetaBuildError, match="rank 512 is outside the plan's world of 512 ranks"):
        build_rank(plan, "gpt3-175b", 512)


@pytest.mark.slow
def test_gpt3_175b_on_64_nodes_last_rank_is_built_as_planned():
    """The last rank of 512: the final layers and the LM head tied to the embedding, tp-sharded 8 ways."""
    plan = Plan.load(GPT3)
    assert plan.mesh.world_size == 512
    build = build_rank_isolated(GPT3, "gpt3-175b", 511)
    assert build.stages == (len(plan.stages) - 1,) and build.coords == (plan.mesh.pp - 1, plan.mesh.dp - 1, plan.mesh.tp - 1)
    assert build.problems() == [], build.problems()
    assert build.held.total == build.predicted_resident_bytes  # to the byte
    by_name = {p.name: p for p in build.params}
    attn = next(p for n, p in by_name.items() if n.endswith("attn.c_attn.weight"))
    assert attn.placement == "S(1)" and attn.local_shape[1] * plan.mesh.tp == attn.full_shape[1]
    assert all(p.dtype == "bfloat16" for p in build.params)
