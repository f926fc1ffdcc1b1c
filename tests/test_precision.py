"""Mixed precision as planned: the policy a plan implies, fp32 master weights, bytes the memory model prices,
and a real 2-rank gloo run in bf16 and fp16 against a single-process run of the same precision."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cost_models import OPTIMIZERS, optimizer_spec, static_bytes
from partitioner.errors import PlanError
from partitioner.precision import MasterWeightOptimizer, PrecisionPolicy, optimizer_step, resident_bytes

sys.path.insert(0, str(Path(__file__).parent))
from runtime_harness import launch  # noqa: E402


def test_policy_follows_the_plans_dtype_and_optimizer():
    bf16 = PrecisionPolicy.from_training("bf16", "adam-mixed")
    assert (bf16.compute_dtype, bf16.reduce_dtype, bf16.master_dtype, bf16.loss_scaling) == (
        torch.bfloat16, torch.bfloat16, torch.float32, False)
    fp16 = PrecisionPolicy.from_training("fp16", "adam-mixed")
    assert fp16.master_dtype == torch.float32 and fp16.loss_scaling
    assert PrecisionPolicy.from_training("fp32", "adam-mixed").master_dtype is None  # nothing to keep in fp32
    assert PrecisionPolicy.from_training("tf32", "adam").compute_dtype == torch.float32
    assert PrecisionPolicy.from_training("bf16", "sgd").master_dtype is None
    with pytest.raises(PlanError, match="training.dtype 'fp8'"):
        PrecisionPolicy.from_training("fp8", "adam-mixed")


def _bf16_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(torch.bfloat16)


def test_master_weights_keep_updates_that_bf16_rounds_away():
    """An update far below bf16's resolution accumulates in the fp32 master and reaches the weight;
    AdamW directly on bf16 parameters loses it every step."""
    model = _bf16_model()
    plain = _bf16_model()
    opt = MasterWeightOptimizer(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=1e-4))
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-4)
    w0 = model[0].bias.detach().float().clone()
    for _ in range(200):
        for m, o in ((model, opt), (plain, plain_opt)):
            o.zero_grad()
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.01)  # each step moves a weight by 1e-6: < bf16's ulp near 0.1
            optimizer_step(o)
    moved = (w0 - model[0].bias.detach().float()).abs().max()
    assert moved == pytest.approx(200 * 1e-6, rel=0.3)
    assert opt.masters[1].dtype == torch.float32
    assert torch.allclose(opt.masters[1], w0 - 200 * 1e-6, atol=1e-6)
    assert torch.equal(plain[0].bias.detach().float(), w0)  # every one of its updates was rounded away


def test_resident_bytes_of_adam_mixed_equal_the_memory_model_byte_for_byte():
    model = _bf16_model()
    opt = MasterWeightOptimizer(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    model(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    optimizer_step(opt)
    held = resident_bytes(model.parameters(), opt)
    count = sum(p.numel() for p in model.parameters())
    spec = OPTIMIZERS["adam-mixed"]
    assert (held.weights, held.grads, held.state) == (2 * count, spec.grad_bytes * count, spec.state_bytes * count)
    assert held.total == static_bytes(count, 2 * count, spec)
    assert all(m.grad is None for m in opt.masters)  # fp32 gradients exist only inside the step
    assert set(opt.state[model[0].weight]) == {"step", "exp_avg", "exp_avg_sq", "master"}


def test_resident_bytes_of_fp32_adam_mixed_equal_the_memory_model_byte_for_byte():
    """In fp32 the runtime keeps no master copy (the policy's master_dtype is None), and the model prices none."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    policy = PrecisionPolicy.from_training("fp32", "adam-mixed")
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731
    opt = MasterWeightOptimizer(model.parameters(), make) if policy.master_dtype else make(model.parameters())
    model(torch.randn(4, 16)).pow(2).mean().backward()
    optimizer_step(opt)
    held = resident_bytes(model.parameters(), opt)
    count = sum(p.numel() for p in model.parameters())
    assert (held.weights, held.grads, held.state) == (4 * count, 4 * count, 8 * count)
    assert held.total == static_bytes(count, 4 * count, optimizer_spec("adam-mixed", "fp32")) == 16 * count


@pytest.mark.slow
def test_bf16_and_fp16_runs_match_a_single_process_run_of_the_same_precision(tmp_path):
    runs = [
        dict(key="llama-bf16-pp2", model="llama-tiny", dtype="bf16",
             layout=dict(pp=2, tp=1, dp=1, microbatches=2, global_batch=4)),
        dict(key="gpt2-bf16-dp2", model="gpt2-tiny", dtype="bf16",
             layout=dict(pp=1, tp=1, dp=2, microbatches=1, global_batch=4), bytes=True),
        dict(key="mlp-fp16-pp2", model="mlp", dtype="fp16",
             layout=dict(pp=2, tp=1, dp=1, microbatches=2, global_batch=4), bytes=True),
    ]
    reports = launch(2, "precision", {"runs": runs}, tmp_path, timeout_s=400)
    for rank, r in enumerate(reports):
        assert r["rc"] == 0 and r.get("job_failed") is None, f"rank {rank}: {r.get('job_failed')}\n{r['stderr'][-4000:]}"
    for run in runs:
        key, dtype = run["key"], run["dtype"]
        seen: set[str] = set()
        for rank, r in enumerate(reports):
            m = r[key]
            assert m["plan_dtype"] == dtype and m["plan_optimizer"] == "adam-mixed"
            assert m["optimizer"] == "MasterWeightOptimizer", (key, rank)
            assert m["param_dtypes"] == [f"torch.{'bfloat16' if dtype == 'bf16' else 'float16'}"]
            assert m["master_dtypes"] == ["torch.float32"]
            # bf16 keeps 8 bits of mantissa: micro-batching and reduction order move results by ~1e-2.
            assert m["loss"] == pytest.approx(m["ref_loss"], rel=2e-2), (key, rank)
            assert m["grad"] <= 5e-2, f"{key} rank {rank}: gradients differ by {m['grad']:.2e} (relative)"
            assert m["master"] <= 5e-2, f"{key} rank {rank}: fp32 masters differ by {m['master']:.2e} of the update"
            assert m["param"] <= 5e-2, f"{key} rank {rank}: parameters differ by {m['param']:.2e} of the update"
            if dtype == "fp16":  # the scale grew or backed off exactly as the reference's overflow says
                assert m["scale_after"] == (2.0**15 if m["ref_skipped"] else 2.0**16)
            seen.update(m["names"])
            if not run.get("bytes"):
                continue
            # What this rank holds is what its stages were priced at: 2 + 2 + 12 bytes per parameter.
            assert not m["recompute"]
            assert m["held"] | dict(buffers=0) == dict(weights=2 * m["n_params"], grads=2 * m["n_params"],
                                                      state=12 * m["n_params"], buffers=0)
            assert m["held_total"] == m["predicted"], (key, rank, m["held"], m["predicted"])
        assert seen == set(reports[0][key]["all_names"]), key
