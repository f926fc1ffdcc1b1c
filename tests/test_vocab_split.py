"""The output head and the loss in vocabulary chunks (partitioner/vocab_split.py): the same loss and
gradients, one block per chunk that sends on two numbers a token, a planner that puts them on different
stages, and the plan that records it. (The multi-process run against one process is tests/test_runtime.py's
``pp2-vocab-chunks`` layout.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from partitioner.capture import capture
from partitioner.cli import main
from partitioner.cluster import Cluster
from partitioner.errors import AutopartError, CaptureError, PlanError
from partitioner.graph import build_partition_graph
from partitioner.plan import Plan
from partitioner.planner import plan_parallelism
from partitioner.vocab_split import vocab_loss
from partitioner.zoo import load_model

# A narrow GPT-2 whose 50,257-token head outweighs its layers (benchmarks/measured_quality.py's, shorter).
BIG_VOCAB = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64)
TINY = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=101, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)


class BiasedHead(torch.nn.Module):
    """Token ids in, logits out of a biased head of 7 outputs: three chunks of 2, 2 and 3 rows."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 16)
        self.head = torch.nn.Linear(16, 7)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.relu(self.embed(x)))
        return logits if self.scale == 1.0 else logits * self.scale


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("chunks", [2, 3])
def test_the_chunked_loss_is_the_cross_entropy_with_its_gradients(chunks):
    torch.manual_seed(0)
    gpt2 = load_model("gpt2", config=TINY, seq_len=8, device="cpu").model.eval()
    llama = load_model("llama-tiny", seq_len=8, device="cpu").model.eval()
    for model, vocab in ((gpt2, 101), (llama, llama.get_output_embeddings().out_features), (BiasedHead(), 7)):
        ids, y = torch.randint(0, vocab, (2, 8)), torch.randint(0, vocab, (2, 8))
        y[0, :3] = -100  # left out, as cross_entropy leaves them
        out = model(ids)
        want = F.cross_entropy(getattr(out, "logits", out).reshape(-1, vocab), y.reshape(-1))
        want.backward()
        want_grads = _grads(model)
        names = [n for n, _ in model.named_modules()]
        with vocab_loss(model, chunks, (ids,)) as args:
            assert len(args) == 2 and args[1].shape == ids.shape
            got = model(ids, y)
            exported = torch.export.export(model, args, strict=False).module()(ids, y)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # a smaller GEMM may round differently
        torch.testing.assert_close(exported, want, rtol=1e-6, atol=1e-6)
        got.backward()
        got_grads = _grads(model)
        assert got_grads.keys() == want_grads.keys()
        for n in want_grads:
            torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-5, atol=1e-6)
        assert [n for n, _ in model.named_modules()] == names  # the model as it was: its modules, its forward
        again = model(ids)
        torch.testing.assert_close(getattr(again, "logits", again), getattr(out, "logits", out))


def test_capture_makes_one_block_per_chunk_that_sends_two_numbers_a_token():
    lm = load_model("gpt2", config=TINY, seq_len=8)
    whole = build_partition_graph(capture(lm.model, lm.example_inputs, name="tiny"), lm.model)
    split = build_partition_graph(capture(lm.model, lm.example_inputs, name="tiny", vocab_chunks=2), lm.model)
    names = [b.name for b in split.blocks]
    assert names[-2:] == ["lm_head.vocab0", "lm_head.vocab1"], names
    assert [b.name for b in whole.blocks][:-1] == names[:-2]
    head = next(b for b in whole.blocks if b.name == "lm_head")
    chunks = split.blocks[-2:]
    # Each chunk's GEMM is its share of the head's, and each also computes its share of the loss.
    assert sum(b.forward_flops for b in chunks) >= head.forward_flops
    assert all(b.params == head.params for b in chunks)  # the one weight, read by each chunk (tied to wte here)
    # The first chunk sends on each token's log-sum-exp and target logit (fp32), not its 50 of the 101 logits.
    tokens = lm.example_inputs[0].numel()
    assert chunks[0].output_bytes == 2 * tokens * 4, chunks[0].output_bytes
    assert head.output_bytes == 101 * tokens * 4
    # A chain: the second chunk folds into the first one's statistics, so no plan can put it on an earlier stage.
    assert any(e.src == chunks[0].index and e.dst == chunks[1].index for e in split.edges)
    # The example inputs stay the model's own: the targets are the graph's input, not the plan's.
    assert split.captured.input_shapes == whole.captured.input_shapes


def test_the_ilp_balances_a_big_vocabulary_over_the_pipeline():
    """On a narrow model with a 50,257-token head, the head is the slowest stage whatever the cut between
    blocks; in chunks, the planner gives the first stage a share of it, and its plan beats the expert's, whose
    uniform split keeps the whole head (every chunk) on the last stage, on the same graph."""
    lm = load_model("gpt2", config=BIG_VOCAB, seq_len=32)
    cluster = Cluster.local(2)
    kw = dict(global_batch=8, pp=2, dtype="fp32", time_limit_s=5, vocab_chunks=2)
    split = plan_parallelism(lm.model, lm.example_inputs, cluster, **kw).plan
    expert = plan_parallelism(lm.model, lm.example_inputs, cluster, method="expert", **kw).plan
    assert split.model.vocab_chunks == 2 == expert.model.vocab_chunks
    assert [m for m in split.stages[0].modules if ".vocab" in m] == ["lm_head.vocab0"], split.stages[0].modules
    assert [m for m in expert.stages[-1].modules if ".vocab" in m] == ["lm_head.vocab0", "lm_head.vocab1"]
    assert split.predicted.step_time_s < 0.8 * expert.predicted.step_time_s, (split.predicted.step_time_s,
                                                                              expert.predicted.step_time_s)


def test_the_plan_records_the_chunks_and_older_plans_read_as_one(tmp_path):
    lm = load_model("gpt2", config=TINY, seq_len=8)
    kw = dict(global_batch=4, pp=2, dtype="fp32", method="manual", split_at=["lm_head.vocab1"])
    plan = plan_parallelism(lm.model, lm.example_inputs, Cluster.local(2), vocab_chunks=2, **kw).plan
    data = json.loads(plan.to_json())
    assert data["model"]["vocab_chunks"] == 2
    assert Plan.from_json(plan.to_json()) == plan
    whole = json.loads(plan_parallelism(lm.model, lm.example_inputs, Cluster.local(2), global_batch=4, pp=2,
                                        dtype="fp32", method="uniform").plan.to_json())
    assert "vocab_chunks" not in whole["model"]  # written only when the head is split
    assert Plan.from_dict(whole).model.vocab_chunks == 1
    data["model"]["vocab_chunks"] = 0
    with pytest.raises(PlanError, match="model.vocab_chunks must be an integer >= 1"):
        Plan.from_dict(data)
    # A split-backward schedule cannot make the gradient of a weight only a later stage slices: refused, named.
    with pytest.raises(PlanError, match=r"lm_head\.vocab1"):
        plan_parallelism(lm.model, lm.example_inputs, Cluster.local(2), vocab_chunks=2, schedule="zb", **kw)


def test_bad_chunk_counts_are_one_line_errors(tmp_path, capsys):
    lm = load_model("gpt2", config=TINY, seq_len=8)
    with pytest.raises(CaptureError, match="at least 1"):
        capture(lm.model, lm.example_inputs, vocab_chunks=0)
    with pytest.raises(CaptureError, match="more than the head lm_head's 101 outputs"):
        capture(lm.model, lm.example_inputs, vocab_chunks=102)
    with pytest.raises(CaptureError, match="needs a torch.export graph"):
        capture(lm.model, lm.example_inputs, tracer="fx", vocab_chunks=2)
    with pytest.raises(AutopartError, match="first input is not token ids"):
        capture(torch.nn.Sequential(torch.nn.Linear(3, 3)), (torch.randn(2, 3),), vocab_chunks=2)
    with pytest.raises(AutopartError, match="no linear output head"):
        capture(torch.nn.Embedding(5, 3), (torch.zeros(2, 3, dtype=torch.long),), vocab_chunks=2)
    # Logits changed after the head (here scaled) are not the head's: the loss of the chunks would not be theirs.
    with pytest.raises(CaptureError, match="not its head head's output unchanged"):
        capture(BiasedHead(scale=0.5), (torch.zeros(2, 3, dtype=torch.long),), vocab_chunks=2)
    plan = tmp_path / "p.json"
    args = ["plan", "--model", "gpt2", "--config", "n_layer=2", "n_embd=32", "n_head=4", "n_positions=32",
            "vocab_size=101", "--seq-len", "8", "--cluster", "local-cpu:2", "--global-batch", "4", "--mesh", "pp=2",
            "--time-limit", "2", "--quiet"]
    assert main([*args, "--vocab-chunks", "2", "--json", str(plan)]) == 0
    capsys.readouterr()
    assert main(["plan", "--plan", str(plan), "--vocab-chunks", "3", "--cluster", "local-cpu:2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "splits the head's vocabulary into 2" in err[0], err
    assert main(["plan", "--plan", str(plan), "--cluster", "local-cpu:2", "--quiet"]) == 0  # the plan's chunks


def test_plan_with_auto_chunks_keeps_the_fastest_count(tmp_path, capsys):
    """``--vocab-chunks auto`` plans the head whole and in 2, 4 and 8 chunks, says each predicted step, and keeps
    the fastest; a model that cannot be chunked keeps its head whole, saying why; only plan takes auto."""
    import re

    plan = tmp_path / "p.json"
    args = ["plan", "--model", "gpt2", "--config", "n_layer=2", "n_embd=64", "n_head=4", "n_positions=64",
            "--seq-len", "32", "--cluster", "local-cpu:2", "--global-batch", "8", "--mesh", "pp=2", "--dtype", "fp32",
            "--time-limit", "5", "--quiet"]
    assert main([*args, "--vocab-chunks", "auto", "--json", str(plan)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("vocabulary chunks tried"))
    steps = {int(k): float(ms) for k, ms in re.findall(r"(\d+): ([\d.]+) ms", line)}
    assert sorted(steps) == [1, 2, 4, 8], line
    kept = json.loads(plan.read_text())["model"].get("vocab_chunks", 1)
    assert steps[kept] == min(steps.values()) and line.endswith(f"kept {kept}"), line
    assert main(["plan", "--model", "mlp", "--cluster", "local-cpu:2", "--vocab-chunks", "auto", "--time-limit", "2",
                 "--quiet"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("vocabulary chunks tried"))
    assert "2: not possible (vocab_chunks: " in line and "not token ids" in line and line.endswith("kept 1"), line
    for command in ("inspect", "compare"):
        assert main([command, "--model", "mlp", "--vocab-chunks", "auto"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"autopart: error: --vocab-chunks auto: only `autopart plan` tries chunk counts; give {command} "
                       "a number"], err


@pytest.mark.slow
def test_autopart_run_trains_a_chunked_plan_with_the_whole_heads_losses(tmp_path, capsys):
    """``autopart run`` feeds a chunked plan the targets as the graph's last input and takes the last stage's
    output as the loss: over the same data and initial weights, its losses are those of the same split with
    the head whole, step after step, though its two stages share the head."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    # Without dropout: its masks come from each rank's random stream, which the two plans need not draw alike.
    args = ["--model", "gpt2", "--config", "n_layer=2", "n_embd=32", "n_head=4", "n_positions=32", "vocab_size=101",
            "resid_pdrop=0.0", "embd_pdrop=0.0", "attn_pdrop=0.0", "--seq-len", "8", "--cluster", "local-cpu:2",
            "--global-batch", "4", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    losses = {}
    for chunks, split in ((1, "lm_head"), (2, "lm_head.vocab1")):
        plan = tmp_path / f"k{chunks}.json"
        assert main(["plan", *args, "--vocab-chunks", str(chunks), "--method", "manual", "--split-at", split,
                     "--microbatches", "2", "--schedule", "1f1b", "--json", str(plan)]) == 0
        capsys.readouterr()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                               "partitioner.cli", "run", "--plan", str(plan), "--steps", "3", "--warmup", "0",
                               "--json", f"run{chunks}.json"], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[chunks] = json.loads((tmp_path / f"run{chunks}.json").read_text())["losses"]
    assert len(losses[2]) == 3
    assert losses[2] == pytest.approx(losses[1], rel=1e-5), losses
