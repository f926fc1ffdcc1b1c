"""A stock Hugging Face model through ``auto_parallelize``, for real (issue: a new user's first hour).

``GPT2LMHeadModel(GPT2Config(...))`` comes with ``use_cache=True``; every phase that exports it
(capture on rank 0, the rewrite on every rank) turns the cache off, and the run equals a single
process. One launch of 2 gloo ranks (pp=2); see tests/runtime_harness.py ``job_hf_stock``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_harness import launch  # noqa: E402

TOL = 1e-5


@pytest.mark.slow
def test_stock_gpt2_through_auto_parallelize_equals_one_process(tmp_path: Path) -> None:
    layout = dict(pp=2, microbatches=2, global_batch=4, method="params", schedule="1f1b")  # one stage per rank
    reports = launch(2, "hf_stock", {"layout": layout}, tmp_path, timeout_s=240)
    for rank, r in enumerate(reports):
        assert r["rc"] == 0 and r.get("job_failed") is None, f"rank {rank}: {r.get('job_failed')}\n{r['stderr'][-4000:]}"
    assert all(r["use_cache_before"] for r in reports), "the model must come with its KV cache on, as stock"
    assert [r["stages"] for r in reports] == [[0], [1]]
    assert {r["mesh"] for r in reports} == {"pp=2,tp=1,dp=1"}
    last = reports[-1]  # the loss lives on the last stage
    assert abs(last["loss"] - last["ref_loss"]) <= TOL * max(1.0, abs(last["ref_loss"])), last
    for rank, r in enumerate(reports):
        assert r["names"], f"rank {rank} holds no parameters"
        assert r["grad"] <= TOL and r["param"] <= TOL, (rank, r["grad"], r["param"])


def test_unexportable_cache_output_names_the_fix() -> None:
    """A model whose output export cannot flatten (a cache object) is refused naming use_cache=False."""
    import torch

    from partitioner import Cluster, plan_parallelism
    from partitioner.errors import PlanError
    from partitioner.rewrite import split_model

    class Cache:  # an unregistered container, as transformers' DynamicCache is to export
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    class WithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor):
            h = self.a(x)
            return self.b(h), Cache(h)

    model = WithCache()
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    plan = plan_parallelism(plain, (torch.randn(1, 8),), Cluster.local(1), global_batch=1, method="uniform",
                            dtype="fp32").plan
    with pytest.raises(PlanError, match="use_cache=False"):
        split_model(model, plan, (torch.randn(1, 8),))
