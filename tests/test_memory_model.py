"""The memory model's terms against what torch allocates, and the memory margin (issue 12, items 4 and 5).

Each term of [Note: what a step holds] (partitioner/evaluate.py) that depends on torch's
implementation is checked here against the dispatch-mode storage meter (partitioner/measure.py) on
one process: the optimizer step's workspace, the loss's memory, and the activations autograd saves
(attention with dropout on CPU, an operand that needs no gradient). The simulator's walk over the
step ([Note: memory over the step] in simulate.py) is checked on synthetic stages. The end-to-end
comparison with a real two-rank run is in tests/test_measure.py; the figures over the fidelity
layouts are in benchmarks/results/2026-12-05-fidelity-memory.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cost_models import OPTIMIZERS, loss_memory, optimizer_workspace_bytes, recorded_margin
from partitioner.cli import main
from partitioner.cluster import Cluster
from partitioner.errors import PlanError
from partitioner.evaluate import Evaluator, StageSpec
from partitioner.measure import StorageMeter
from partitioner.plan import Mesh, Schedule
from partitioner.precision import MasterWeightOptimizer, optimizer_step
from partitioner.planner import prepare
from partitioner.simulate import StageCost, simulate


# --- the optimizer step's workspace -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "impl"), [("adam", "single"), ("adam", "foreach"), ("adam", "fused"), ("sgd", "single"),
                                           ("sgd", "foreach")])  # the runtime runs SGD in torch's default only
def test_optimizer_workspace_is_what_the_step_allocates(name: str, impl: str) -> None:
    """[Note: the optimizer step's workspace]: AdamW single-tensor holds two copies of the largest
    parameter's state, foreach one copy of all, fused none (CPU's fused kernel); SGD with momentum
    none. The first step (the state made lazily) and a later one alike."""
    model = nn.Sequential(nn.Linear(96, 160), nn.Linear(160, 48))
    kind = dict(foreach=impl == "foreach", fused=impl == "fused" or None)
    opt = (torch.optim.AdamW(model.parameters(), **kind) if name == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=impl == "foreach"))
    numels = [p.numel() for p in model.parameters()]
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with StorageMeter([model], opt) as meter:
            opt.step()
        _, at_peak, _ = meter.result([model], opt)
        assert at_peak.temporaries == optimizer_workspace_bytes(OPTIMIZERS[name], numels, impl)


@pytest.mark.parametrize("impl", ["single", "fused"])
@pytest.mark.parametrize("chunk", [None, 1, 9000, 30000])
def test_master_step_allocates_its_chunk_of_fp32_gradients(impl: str, chunk: int | None) -> None:
    """Mixed precision: ``MasterWeightOptimizer`` makes the masters' fp32 gradients ``chunk``
    elements at a time (None: all at once) beside the update's workspace, and the model prices
    exactly that when the chunks fill up to their bound (here: 15360 + 160, then 7680 + 48 with
    9000; one parameter at a time with 1; all with 30000). Once the state exists: the step that
    makes it peaks at its last chunk, with all of the state, which the model counts as static."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160), nn.Linear(160, 48)).to(torch.bfloat16)
    make = lambda ps: torch.optim.AdamW(ps, fused=impl == "fused" or None)  # noqa: E731
    opt = MasterWeightOptimizer(model.parameters(), make, chunk_elements=chunk)
    numels = [p.numel() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with StorageMeter([model], opt) as meter:
            optimizer_step(opt)
        if step == 0:  # the first step makes the state a chunk at a time: its peak is at the last chunk
            continue
        _, at_peak, _ = meter.result([model], opt)
        want = optimizer_workspace_bytes(OPTIMIZERS["adam-mixed"], numels, impl, master_chunk=chunk)
        biggest = max(numels) if chunk is None or chunk < max(numels) else min(sum(numels), 15360 + 160)
        assert want == 4 * (max(numels) if chunk == 1 else sum(numels) if chunk in (None, 30000) else biggest) + (
            0 if impl == "fused" else 8 * max(numels))
        assert at_peak.temporaries == want
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # every parameter stepped
    assert all(m.grad is None for m in opt.masters)


def test_chunked_master_step_equals_one_step() -> None:
    """Stepping the masters a chunk at a time updates them exactly as one step over all does."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 8)).to(torch.bfloat16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [MasterWeightOptimizer(m.parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-2), chunk_elements=c)
            for m, c in zip(models, (None, 100))]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for m, o in zip(models, opts):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        assert [o.chunks() for o in opts] == [[[0, 1, 2, 3]], [[0], [1], [2], [3]]]  # 960, 40, 320, 8 elements
        for o in opts:
            optimizer_step(o)
    for a, b in zip(opts[0].masters, opts[1].masters):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- the loss -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_loss_memory_is_what_the_loss_keeps_and_allocates(kind: str) -> None:
    """[Note: the loss's memory]: cross-entropy keeps its log-softmax and its backward makes two
    output-sized gradients; mse keeps nothing new and its backward makes two."""
    rows, width = 48, 200
    out = torch.randn(rows, width, requires_grad=True)  # the model's output: exists before the loss
    target = torch.randint(0, width, (rows,)) if kind == "cross_entropy" else torch.randn(rows, width)
    model = nn.Linear(1, 1)
    predicted = loss_memory(kind, out.nbytes)
    with StorageMeter([model], None) as meter:
        loss = F.cross_entropy(out, target) if kind == "cross_entropy" else F.mse_loss(out, target)
        given = {id(out.untyped_storage()), id(target.untyped_storage())}  # saved by mse, but they exist anyway
        kept = sum(e[1] for k, e in meter._live.items() if e[2] and k not in given and e[1] >= out.nbytes // 2)  # noqa: SLF001
        (grad,) = torch.autograd.grad(loss, out)
    peak, at_peak, _ = meter.result([model], None)
    assert kept == predicted.saved_bytes
    if kind == "cross_entropy":  # the meter names what made each tensor at the peak
        made = {op for op, shape, nbytes, _ in meter.peak_tensors() if shape == (rows, width)}
        assert {"aten._log_softmax.default", "aten.nll_loss_backward.default",
                "aten._log_softmax_backward_data.default"} <= made
    # At the end of the backward: the saved tensor and the two gradients, beside a few scalars.
    new = at_peak.total - at_peak.parameters - (0 if kind == "cross_entropy" else out.nbytes + target.nbytes)
    assert predicted.saved_bytes + predicted.backward_bytes <= new <= predicted.saved_bytes + predicted.backward_bytes + 4096


# --- saved activations ----------------------------------------------------------------------------------


class _Attention(nn.Module):
    """Attention with dropout (the math path on CPU) and a product with a tensor no parameter reaches."""

    def __init__(self, width: int = 32, heads: int = 4, seq: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.register_buffer("position", torch.arange(seq, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for y in self.qkv(x).split(d, -1))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return self.out(o * torch.cos(self.position)[:, None])  # autograd keeps cos, not o: cos needs no gradient


def test_saved_activations_are_what_autograd_keeps_on_cpu() -> None:
    """[Note: attention with dropout on CPU] and the capture's operands that need no gradient: the blocks'
    predicted saved bytes equal the storages autograd keeps in a real forward on this CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(_Attention(), nn.GELU(), _Attention()).train()
    x = torch.randn(2, 16, 32)
    ev = prepare(model, (x,), Cluster.local(1), global_batch=2, dtype="fp32", optimizer="adam", batch_size=2)
    predicted = sum(ev.block_cost(b, 2, 1, {}).saved_bytes for b in ev.pgraph.blocks)
    with StorageMeter([model], None) as meter:
        y = model(x)
    _, at_peak, _ = meter.result([model], None)
    del y
    assert predicted == at_peak.activations


# --- the walk over the step ------------------------------------------------------------------------------


def test_a_split_backward_keeps_the_weights_output_gradients_from_i_to_w(zoo_capture) -> None:
    # [Note: zero-bubble memory] in schedules.py: torch's I keeps, for W, the output gradient of every node
    # applying a trainable weight to the stage's input; its first stage keeps none (it runs the whole
    # backward at W), its last stage frees its output at I; a full backward keeps none
    gpt2 = zoo_capture("gpt2-tiny")
    ev = prepare(gpt2.graph, cluster=Cluster.local(2), global_batch=8, dtype="fp32")
    n = len(gpt2.graph.blocks)
    cuts = [0, n // 4, n // 2, 3 * n // 4, n]
    specs = [StageSpec.whole(list(range(a, b)), False) for a, b in zip(cuts, cuts[1:])]
    mesh = Mesh(2, 1, 1)
    zb = ev.stage_costs(specs, mesh, Schedule("zb", 4, 2, 2), {})
    plain = ev.stage_costs(specs, mesh, Schedule("interleaved", 4, 2, 2), {})
    assert all(c.weight_grad_bytes == 0 for c in plain)
    assert zb[0].weight_grad_bytes == 0
    nodes, params = gpt2.captured.nodes, gpt2.captured.params
    for s in (1, 2):
        blocks = [gpt2.graph.blocks[b] for b in specs[s].blocks]
        weighted = [nodes[m] for b in blocks for m in b.nodes
                    if any(p in params and params[p].trainable for p in nodes[m].params) and nodes[m].outputs
                    and any(nodes[i].needs_grad for i in nodes[m].inputs)]
        assert weighted and zb[s].weight_grad_bytes == sum(w.output_bytes for w in weighted) * 2  # 2 samples a micro-batch
    last = [gpt2.graph.blocks[b] for b in specs[3].blocks]
    out = gpt2.graph.output_bytes * 2
    assert zb[3].weight_grad_bytes == max(0, int(ev.weight_grad_bytes(last, 2, 1, {}) - out))


def test_simulator_walks_fresh_gradients_workspaces_and_the_optimizer_step() -> None:
    """GPipe, two ranks, two micro-batches: rank 1's peak is at its first backward, before any gradient
    exists, with both micro-batches' activations and its backward's workspace."""
    stage = dict(forward_s=1.0, backward_s=2.0, activation_bytes=100, static_bytes=1000, fresh_grad_bytes=50,
                 buffer_bytes=7, input_grad_bytes=11)
    stages = [StageCost(**stage, backward_workspace_bytes=50, optimizer_workspace_bytes=300),
              StageCost(**stage, backward_workspace_bytes=500, optimizer_workspace_bytes=10)]
    sim = simulate(stages, "gpipe", 2)
    first = sim.peak_parts[1]
    assert (first.static, first.activations, first.workspace, first.moment) == (950, 200, 7 + 500, "1B0")
    # Rank 0 peaks in its optimizer step: every gradient, both kept input gradients, its workspace.
    last = sim.peak_parts[0]
    assert (last.static, last.activations, last.workspace, last.moment) == (1000, 0, 7 + 2 * 11 + 300, "optimizer step")
    assert sim.peak_memory_bytes == (1329, 1657)
    with pytest.raises(PlanError, match="fresh_grad_bytes"):
        StageCost(forward_s=1.0, backward_s=1.0, static_bytes=10, fresh_grad_bytes=20)


# --- the memory margin ----------------------------------------------------------------------------------


def test_recorded_margin_names_its_source_and_a_bad_file_is_one_clear_error(tmp_path: Path) -> None:
    rec = recorded_margin()
    assert rec.margin >= 0 and rec.ranks > 0 and rec.command.startswith("python -m benchmarks.fidelity")
    assert Path(__file__).resolve().parents[1].joinpath(rec.source).exists()
    bad = tmp_path / "margin.json"
    bad.write_text(json.dumps({"margin": 0.1}))
    with pytest.raises(ValueError, match="not a memory margin record.*--record-margin"):
        recorded_margin(bad)


def _mlp_evaluator(memory_bytes: int | None = None, margin: float | None = None) -> Evaluator:
    cluster = Cluster.local(2)
    if memory_bytes is not None:
        cluster = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, memory_bytes=memory_bytes))
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))
    base = prepare(model, (torch.randn(1, 64),), cluster, global_batch=4, dtype="fp32", optimizer="adam")
    return Evaluator(base.pgraph, cluster, base.cost_model, base.training, margin)


def test_a_plan_on_the_edge_is_refused_when_the_margin_pushes_it_over() -> None:
    """Fit is ``peak (1 + margin) <= memory (1 - reserve)``: a plan whose peak fits with room for half
    the margin fits without a margin and is refused with it."""
    stages = [StageSpec((0, 1)), StageSpec((2, 3))]
    mesh, schedule = Mesh(2, 1, 1), Schedule("1f1b", 2, 2)
    plan, _ = _mlp_evaluator(margin=0.0).make_plan(stages, mesh, schedule, method="manual")
    peak, margin = plan.predicted.peak_memory_bytes, 0.2
    memory = int(peak * (1 + margin / 2) / (1 - plan.training.memory_reserve)) + 1
    without, _ = _mlp_evaluator(memory, margin=0.0).make_plan(stages, mesh, schedule, method="manual")
    with_margin, _ = _mlp_evaluator(memory, margin=margin).make_plan(stages, mesh, schedule, method="manual")
    assert without.predicted.peak_memory_bytes == with_margin.predicted.peak_memory_bytes == peak
    assert without.predicted.fits and not with_margin.predicted.fits
    assert with_margin.predicted.memory_margin == margin
    with pytest.raises(PlanError, match="memory margin"):
        _mlp_evaluator(margin=-0.1)


def test_the_recorded_margin_is_every_plans_default_and_explain_states_it(tmp_path: Path, capsys, monkeypatch) -> None:
    rec = recorded_margin()
    assert _mlp_evaluator().memory_margin == rec.margin
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "mlp", "--cluster", "local-cpu:2", "--mesh", "pp=2", "--global-batch", "4",
                 "--method", "params", "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["predicted"]["memory_margin"] == rec.margin
    monkeypatch.setenv("COLUMNS", "300")
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    out = capsys.readouterr().out.splitlines()
    [line] = [l for l in out if l.startswith("memory margin: ")]
    assert f"+{rec.margin:.1%} on the predicted peak" in line and rec.source in line and f"{rec.ranks} ranks" in line
    [fit] = [l for l in out if l.startswith("fit: ")]
    assert f"+ {rec.margin:.1%} = " in fit and fit.endswith(": fits")
