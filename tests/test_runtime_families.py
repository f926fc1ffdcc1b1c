"""Tensor parallelism across decoder families, against a single-process reference (tier 3 of STYLE.md).

Each family's block has a shape the GPT-2/Llama/BERT cases of test_runtime.py do not: grouped-query
attention with q/k/v biases (Qwen2), a sliding-window mask (Mistral), top-2 MoE routing with a custom
expert kernel DTensor has no rule for (Mixtral), attention and MLP in parallel (GPT-NeoX). Every family
runs at tp=2 under Megatron's split and at pp=2 x tp=2; Qwen2 also runs under the ILP planner, whose
plan hands DTensor export's ``_assert_tensor_metadata`` checks (the failure this file guards against).
One launch per world size (process start-up dominates; see tests/runtime_harness.py).

The fast tests at the end check the op classification of partitioner/dtensor_ops.py and one_line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runtime_harness import FAMILIES, launch  # noqa: E402

from partitioner.dtensor_ops import can_shard, check_shardable, is_check_or_query, reads_metadata_only  # noqa: E402
from partitioner.errors import one_line, root_cause  # noqa: E402

TOL = 1e-5
ALL = list(FAMILIES)

# name: (ranks, pins, families)
LAYOUTS = {
    "tp2": (2, dict(pp=1, tp=2, dp=1, microbatches=1, global_batch=2, method="megatron"), ALL),
    "tp2-ilp": (2, dict(pp=1, tp=2, dp=1, microbatches=1, global_batch=2, method="ilp"), ["hf:Qwen2ForCausalLM"]),
    "pp2xtp2": (4, dict(pp=2, tp=2, dp=1, schedule="gpipe", microbatches=2, global_batch=2, method="megatron"), ALL),
}


@pytest.fixture(scope="module")
def family_launches(tmp_path_factory: pytest.TempPathFactory):
    done: dict[int, list[dict]] = {}

    def reports(layout: str) -> list[dict]:
        ranks = LAYOUTS[layout][0]
        if ranks not in done:
            group = {name: spec for name, spec in LAYOUTS.items() if spec[0] == ranks}
            done[ranks] = launch(
                ranks, "equivalence",
                {"layouts": {n: s[1] for n, s in group.items()}, "models": ALL,
                 "layout_models": {n: s[2] for n, s in group.items()}},
                tmp_path_factory.mktemp(f"families{ranks}"), timeout_s=480,
            )
        for rank, r in enumerate(done[ranks]):
            assert r["rc"] == 0 and r.get("job_failed") is None, f"rank {rank}: {r.get('job_failed')}\n{r['stderr'][-4000:]}"
        return [r[layout] for r in done[ranks]]

    return reports


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_families_match_single_process(layout: str, family_launches) -> None:
    reports = family_launches(layout)
    for name in LAYOUTS[layout][2]:
        seen: set[str] = set()
        for rank, r in enumerate(reports):
            m = r[name]
            assert m["loss"] == pytest.approx(m["ref_loss"], rel=TOL), (layout, name, rank)
            assert m["grad"] <= TOL, f"{layout} {name} rank {rank}: gradients differ by {m['grad']:.2e} ({m['worst_grad']})"
            assert m["param"] <= TOL, f"{layout} {name} rank {rank}: parameters after the step differ by {m['param']:.2e}"
            seen.update(m["names"])
        assert seen == set(reports[0][name]["all_names"]), f"{layout} {name}: parameters no rank checked"
    if layout == "pp2xtp2":
        assert {tuple(r[ALL[0]]["stages"]) for r in reports} == {(0,), (1,)}


# ---- fast: the classification of partitioner/dtensor_ops.py, and one_line --------------------------

aten = torch.ops.aten


def test_checks_and_queries_are_classified_by_schema() -> None:
    # return nothing, write nothing: checks; return a number or bool: queries
    for op in (aten._assert_tensor_metadata.default, aten._assert_async.msg, aten._assert_scalar.default,
               aten.sym_constrain_range.default, aten.sym_constrain_range_for_size.default,
               aten.sym_size.int, aten._local_scalar_dense.default, aten.is_nonzero.default):
        assert is_check_or_query(op), op
        assert can_shard(op), op
    # tensors out, or an argument written: not checks
    for op in (aten.add.Tensor, aten.div_.Tensor, aten.linear.default, aten.index_put_.default, aten.topk.default):
        assert not is_check_or_query(op), op
    assert reads_metadata_only(aten._assert_tensor_metadata.default) and reads_metadata_only(aten.sym_size.int)
    assert not reads_metadata_only(aten._assert_async.msg)  # it reads the value it asserts on


def test_check_shardable_names_ops_dtensor_has_no_rule_for() -> None:
    lib = torch.library.Library("autopart_test", "FRAGMENT")  # a model's own kernel, as Mixtral's experts
    lib.define("scale(Tensor x) -> Tensor")
    lib.impl("scale", lambda x: x * 2, "CompositeExplicitAutograd")

    class Block(torch.nn.Module):
        def forward(self, x):
            return torch.ops.autopart_test.scale(x).relu()

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Block()

        def forward(self, x):
            return self.mlp(x)

    graph = torch.export.export(Outer(), (torch.ones(2, 4),)).graph
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    sharded = {n.name: "sharded" for n in nodes}
    bad = check_shardable(nodes, sharded)
    assert [(u.op, u.module) for u in bad] == [("autopart_test.scale.default", "mlp")]
    assert "autopart_test.scale.default in mlp" in bad[0].describe()
    assert check_shardable(nodes, {}) == ()  # replicated by the plan: nothing to check


def test_one_line_shows_the_cause_of_an_empty_message() -> None:
    def chained(outer: str) -> BaseException:
        try:
            try:
                raise NotImplementedError("Operator aten.foo.default does not have a sharding strategy registered.")
            except NotImplementedError as inner:
                raise RuntimeError(outer) from inner
        except RuntimeError as exc:
            return exc

    empty = chained("")
    assert one_line(empty) == "NotImplementedError: Operator aten.foo.default does not have a sharding strategy registered."
    assert isinstance(root_cause(empty), NotImplementedError)
    # torch.distributed.pipelining's wrapper: a message that starts with a blank line
    wrapped = one_line(chained("\n    [Stage 0] failed to run forward:\n    args: ..."))
    assert wrapped.startswith("RuntimeError: [Stage 0] failed to run forward: (caused by NotImplementedError: Operator aten.foo")
    assert "\n" not in wrapped
    assert one_line(ValueError()) == "ValueError: (no message)"
