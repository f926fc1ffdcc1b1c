"""Recomputation per block and selective recomputation: the plan field, the evaluator's terms, and
the search's choice ([Note: recompute per block] in partitioner/recompute.py, [Note: choosing the
recomputed blocks] in partitioner/solver/recompute.py).

The choice is checked against exhaustive search over every subset of recomputed blocks, with the
evaluator and the simulator as the judge. The runtime's equivalence for these plans is in
tests/test_runtime.py (layouts ``pp2-recompute-blocks``, ``tp2-recompute-selective``,
``dp2-zero3-selective`` and ``pp2-recompute-v4``)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.fx
from torch.utils.checkpoint import checkpoint

from cost_models import OpTime

from partitioner.baselines import Pins
from partitioner.capture import capture
from partitioner.cluster import Cluster
from partitioner.errors import PlanError
from partitioner.evaluate import BlockCost, StageSpec, backward_work
from partitioner.plan import PLAN_VERSION, Mesh, Plan, Schedule
from partitioner.planner import prepare
from partitioner.recompute import attention_core, checkpointed
from partitioner.solver import plan_ilp
from partitioner.solver.recompute import fewest_recomputed
from partitioner.zoo import load_model

GLOBAL_BATCH = 16
MESH = Mesh(2, 1, 4)
SCHED = Schedule("1f1b", 4, 1)


@pytest.fixture(scope="module")
def gpt2():
    lm = load_model("gpt2-tiny", dtype="bf16")
    return capture(lm.model, lm.example_inputs, name=lm.name, batch_size=lm.batch_size)


@pytest.fixture(scope="module")
def ev(gpt2):
    return prepare(gpt2, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=GLOBAL_BATCH)


def _split(ev):
    n = len(ev.pgraph.blocks)
    k = ev.pgraph.block_index("transformer.h.2")
    return (tuple(range(k)), tuple(range(k, n)))


def _tight(gpt2, fraction: float):
    """An evaluator whose memory limit lies ``fraction`` of the way from the peak with every block
    recomputed to the peak with none, on MESH/SCHED with the split of ``_split``."""
    ev = prepare(gpt2, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=GLOBAL_BATCH)
    a, b = _split(ev)
    keep, _ = ev.make_plan([StageSpec(a), StageSpec(b)], MESH, SCHED, method="manual")
    redo, _ = ev.make_plan([StageSpec.whole(a, True), StageSpec.whole(b, True)], MESH, SCHED, method="manual")
    lo, hi = redo.predicted.peak_memory_bytes, keep.predicted.peak_memory_bytes
    assert lo < hi
    limit = lo + fraction * (hi - lo)
    mem = ev.cluster.device.memory_bytes
    # The margin pinned to 0: the limit is placed between two predicted peaks.
    return prepare(gpt2, cluster=ev.cluster, global_batch=GLOBAL_BATCH, memory_reserve=1 - limit / mem, memory_margin=0.0)


def test_recomputing_k_blocks_prices_their_forward_and_keeps_their_inputs(ev):
    a, b = _split(ev)
    layers = tuple(i for i in b if ev.pgraph.blocks[i].name.startswith("transformer.h."))
    some = layers[:1]
    keep, _ = ev.make_plan([StageSpec(a), StageSpec(b)], MESH, SCHED, method="manual")
    part, _ = ev.make_plan([StageSpec(a), StageSpec(b, some)], MESH, SCHED, method="manual")
    costs = {i: ev.block_cost(ev.pgraph.blocks[i], 1, 1, {}) for i in b}
    k, p = keep.stages[1].predicted, part.stages[1].predicted
    assert part.stages[1].recompute == tuple(ev.pgraph.blocks[i].name for i in some)
    assert p.backward_s == pytest.approx(k.backward_s + sum(costs[i].time.forward_s for i in some))
    assert p.components.recompute_s == pytest.approx(SCHED.microbatches * sum(costs[i].time.forward_s for i in some))
    # Rank 1 holds one micro-batch in flight under 1F1B (pp=2): the activations drop by saved - inputs
    # of the recomputed block (all of them: it begins its stage), and its saved bytes come back once as
    # part of the backward's workspace, which the loss's backward may already exceed ([Note: what a step
    # holds] in evaluate.py). What the stage keeps of its received input is in torch's receive buffers,
    # not in the activations: the checkpoint keeps more of it (every input) than the layer saved.
    freed = sum(costs[i].saved_bytes - costs[i].kept_input_bytes(i, set(b)) for i in some)
    freed += ev.saved_received_bytes(StageSpec(b, some), 1, 1) - ev.saved_received_bytes(StageSpec(b), 1, 1)
    work = max(costs[i].saved_bytes for i in some)
    assert p.activation_bytes == pytest.approx(k.activation_bytes - freed, abs=2)
    assert k.memory_bytes - freed - 2 <= p.memory_bytes <= k.memory_bytes - freed + work + 2
    assert p.memory_bytes < k.memory_bytes


def test_selective_recompute_frees_the_attention_core_for_its_forward(ev, gpt2):
    a, b = _split(ev)
    keep, _ = ev.make_plan([StageSpec(a), StageSpec(b)], MESH, SCHED, method="manual")
    sel, _ = ev.make_plan([StageSpec(a), StageSpec(b, (), True)], MESH, SCHED, method="manual")
    costs = [ev.block_cost(ev.pgraph.blocks[i], 1, 1, {}) for i in b]
    cores = [attention_core(ev.pgraph.blocks[i].nodes, gpt2) for i in b]
    assert sum(bool(c) for c in cores) == 2  # transformer.h.2 and h.3: one scaled_dot_product_attention each
    assert all(c.core_bytes > 0 and c.core_forward_s > 0 for c, core in zip(costs, cores) if core)
    assert all(c.core_bytes == 0 for c, core in zip(costs, cores) if not core)
    k, s = keep.stages[1].predicted, sel.stages[1].predicted
    assert sel.stages[1].selective and not sel.stages[1].recompute
    assert s.backward_s == pytest.approx(k.backward_s + sum(c.core_forward_s for c in costs))
    freed = sum(c.core_bytes for c in costs)
    assert s.activation_bytes == pytest.approx(k.activation_bytes - freed, abs=2)
    assert k.memory_bytes - freed - 2 <= s.memory_bytes <= k.memory_bytes - freed + max(c.core_bytes for c in costs) + 2
    assert s.memory_bytes < k.memory_bytes


@pytest.mark.parametrize("fraction", [0.9, 0.6, 0.3])
def test_the_chosen_blocks_are_the_fewest_that_fit(gpt2, fraction):
    """Exhaustive over every subset of recomputed blocks (whole blocks only), judged by the simulator:
    no smaller subset fits, and of the subsets of the chosen size none replays less."""
    ev = _tight(gpt2, fraction)
    a, b = _split(ev)
    specs = [StageSpec(a), StageSpec(b)]
    chosen, report = fewest_recomputed(ev, specs, MESH, SCHED, {}, selective=False)
    plan, _ = ev.make_plan(chosen, MESH, SCHED, method="manual")
    assert plan.predicted.fits and all(r.fits for r in report)
    for s, spec in enumerate(chosen):
        others = [c for t, c in enumerate(chosen) if t != s]
        best = None
        for size in range(len(spec.blocks) + 1):
            for subset in itertools.combinations(spec.blocks, size):
                trial = list(others)
                trial.insert(s, StageSpec(spec.blocks, subset))
                p, _ = ev.make_plan(trial, MESH, SCHED, method="manual")
                if p.predicted.fits:
                    best = size if best is None else min(best, size)
        assert len(spec.recompute) == best, (s, spec.recompute, best)


def test_a_rank_that_fits_recomputes_nothing(ev):
    a, b = _split(ev)
    chosen, _ = fewest_recomputed(ev, [StageSpec.whole(a, True), StageSpec.whole(b, True)], MESH, SCHED, {})
    assert chosen == [StageSpec(a), StageSpec(b)]


def test_the_search_beats_whole_stage_recompute_under_a_tight_limit(gpt2):
    """Under a limit that forces recomputation, the ILP's plan with per-block and selective choice is
    predicted faster than the same search with whole stages only, and it fits."""
    ev = _tight(gpt2, 0.2)
    pins = dict(pp=2, tp=1, microbatches=4, schedule="1f1b", dp_shardings=("none",))
    whole = plan_ilp(ev, Pins(**pins, recompute_blocks=False), time_limit_s=2.0).plan
    blocks = plan_ilp(ev, Pins(**pins), time_limit_s=2.0).plan
    assert whole.predicted.fits and blocks.predicted.fits
    assert any(len(st.recompute) == len(st.modules) for st in whole.stages)
    assert any(0 < len(st.recompute) < len(st.modules) or st.selective for st in blocks.stages)
    assert blocks.predicted.step_time_s < whole.predicted.step_time_s
    assert blocks.solver.status == "FEASIBLE"  # outside the stage ILP's proof


def test_old_plans_with_recompute_true_load_as_every_block(ev):
    a, b = _split(ev)
    plan, _ = ev.make_plan([StageSpec.whole(a, True), StageSpec(b)], MESH, SCHED, method="manual")
    data = plan.to_dict()
    assert data["version"] == PLAN_VERSION and list(data["stages"][0]["recompute"]) == list(plan.stages[0].modules)
    old = json.loads(json.dumps(data))
    old["version"] = 4
    for st in old["stages"]:
        st["recompute"] = bool(st.pop("recompute"))
        del st["selective"]
    loaded = Plan.from_dict(old)
    assert loaded.stages[0].recompute == plan.stages[0].modules and loaded.stages[1].recompute == ()
    again, _ = ev.score(loaded)
    assert again.predicted.step_time_s == pytest.approx(plan.predicted.step_time_s)
    assert again.predicted.peak_memory_bytes == plan.predicted.peak_memory_bytes


def test_a_recompute_list_must_name_the_stage_s_modules(ev):
    a, b = _split(ev)
    plan, _ = ev.make_plan([StageSpec(a), StageSpec(b)], MESH, SCHED, method="manual")
    data = json.loads(plan.to_json())
    data["stages"][0]["recompute"] = ["lm_head"]
    with pytest.raises(PlanError, match=r"stages\[0\]\.recompute names 'lm_head'.*not one of the stage's modules"):
        Plan.from_dict(data)
    data["stages"][0]["recompute"] = "yes"
    with pytest.raises(PlanError, match=r"stages\[0\]\.recompute must be an array"):
        Plan.from_dict(data)


def test_explain_says_what_the_recomputation_frees_and_costs(ev):
    from partitioner.explain import recompute_summary

    a, b = _split(ev)
    plan, _ = ev.make_plan([StageSpec(a), StageSpec(b, b[:1], True)], MESH, SCHED, method="manual")
    text = recompute_summary(plan, ev)
    assert text.startswith(f"recomputing 1 of {len(a) + len(b)} blocks and the attention cores of the others on 1 of 2 "
                           "stages frees "), text
    assert "MiB per device" in text and "of forward per step on pipeline rank" in text


@pytest.mark.parametrize("name, pp", [("gpt2-tiny", 1), ("mlp", 1), ("llama-tiny", 2)])
def test_a_stage_recomputing_every_block_keeps_each_block_s_inputs(name, pp):
    """A stage that recomputes every block runs each block through its own checkpoint (the tied embedding
    and head of GPT-2 through weightless modules: [Note: recompute in the runtime]): its forward keeps
    the bytes the memory model counts, each block's inputs ([Note: recompute per block]), a storage that
    several blocks read (the causal mask, Llama's rotary cos and sin, GPT-2's position ids) once
    ([Note: tensors several blocks read] in partitioner/graph.py); and its gradients equal the plain
    stage's. Llama's is its second stage of two, which receives the mask, cos and sin with the hidden
    states."""
    import copy

    import torch

    from partitioner.evaluate import recompute_terms
    from partitioner.measure import StorageMeter
    from partitioner.planner import plan_parallelism
    from partitioner.recompute import checkpoint_in_graph
    from partitioner.rewrite import microbatch_inputs, split_model

    torch.manual_seed(0)
    lm = load_model(name, dtype="fp32", device="cpu")
    # One sample, the capture's batch: the mask, cos and sin have no batch dim, and the evaluator scales
    # every activation by micro-batch / capture batch ([Note: costs are per capture batch]).
    batch = 1
    example = microbatch_inputs(lm.example_inputs, batch)
    result = plan_parallelism(lm.model, lm.example_inputs, Cluster.local(pp), global_batch=batch, dtype="fp32",
                              method="params", pp=pp, tp=1, dp=1, microbatches=1, recompute=True)
    stage = result.plan.stages[-1]
    assert stage.recompute == stage.modules
    program = split_model(copy.deepcopy(lm.model), result.plan, example).stages[-1]
    inputs = example if pp == 1 else tuple(torch.ones(shape, dtype=dtype) for shape, dtype in program.input_specs)
    plain = program.module
    redo = copy.deepcopy(plain)
    checkpoint_in_graph(redo, stage)
    ckpts = [n for n in redo.graph.nodes if "checkpoint" in str(n.target)]
    assert len(ckpts) == len(stage.modules)
    grads, kept = [], []
    for module in (plain, redo):
        torch.manual_seed(1)
        with StorageMeter([module], None) as meter:
            out = module(*inputs)
            outs = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
            # What the forward leaves alive beside its output (the logits, which no block keeps): what the
            # checkpoints keep, the stage's inputs among them (a storage made before the step is counted
            # once autograd saves it).
            kept.append(meter.live_bytes - sum(t.untyped_storage().nbytes() for t in outs))
        loss = sum(t.float().square().mean() for t in outs if t.is_floating_point())
        loss.backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0)
    ev = result.evaluator
    blocks = [ev.pgraph.block_index(m) for m in stage.modules]
    costs = [ev.block_cost(ev.pgraph.blocks[b], batch, 1, {}) for b in blocks]
    act, _, _ = recompute_terms(StageSpec.whole(blocks, True), costs)
    assert kept[1] < kept[0]
    if name == "gpt2-tiny":
        # GPT-2's position-embedding block also holds mask-building glue that the runtime runs outside the
        # block's checkpoint ([Note: recompute in the runtime]): the model counts the int64 tensor that glue
        # reads (8 bytes per token) as kept, and the runtime does not keep it.
        assert act - kept[1] == 8 * example[0].numel(), (kept[1], act)
    else:
        assert act == kept[1], (kept[1], act)


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_the_ilp_s_kept_inputs_and_its_first_block_margin_cover_the_evaluator_s(sequence_parallel):
    """[Note: a recomputed block's inputs]: for every stage of consecutive blocks that recomputes them all,
    the figures the stage ILP adds per block (``input_bytes``) and the most any block keeps beyond its figure
    when it begins a stage (what the search keeps free per micro-batch in flight) are not below what the
    evaluator counts, each storage once; and the excess is the first block's alone: stages that differ
    only in their first block differ by it. On llama-tiny at tp=2 with and without sequence parallelism
    (its layers read the causal mask, cos and sin)."""
    from partitioner.evaluate import kept_inputs_bytes
    from partitioner.sharding import megatron_sharding

    lm = load_model("llama-tiny", dtype="bf16")
    cap = capture(lm.model, lm.example_inputs, name=lm.name, batch_size=lm.batch_size)
    ev = prepare(cap, cluster=Cluster.preset("dgx-a100-80g", 1), global_batch=GLOBAL_BATCH)
    costs = [ev.block_cost(b, 1, 2, megatron_sharding(cap, 2, sequence_parallel)) for b in ev.pgraph.blocks]
    margin = max(c.whole_input_bytes - c.input_bytes for c in costs)
    layers = [b.index for b in ev.pgraph.blocks if b.is_layer]
    mask = {k.storage for k in costs[layers[0]].inputs} & {k.storage for k in costs[layers[-1]].inputs}
    assert len(mask) == 3, mask  # the mask, cos and sin, read by every layer
    n = len(costs)
    for i in range(n):
        for j in range(i + 1, n + 1):
            stage = range(i, j)
            exact = kept_inputs_bytes(stage, costs[i:j], set(stage))
            per_block = sum(c.input_bytes for c in costs[i:j])
            assert exact <= per_block + margin, (i, j, exact, per_block, margin)
            # Past the first block each block adds its input_bytes exactly.
            assert exact == pytest.approx(costs[i].whole_input_bytes + per_block - costs[i].input_bytes), (i, j)


def test_a_replay_is_priced_beside_its_own_blocks_gradients_not_the_largest_of_any_block() -> None:
    """The blocks back-propagate one at a time ([Note: recompute per block]): a block's replay is live with its
    own nodes' gradients, never with another block's (a head's logits gradient beside a layer's replay)."""
    t = OpTime(1.0, 2.0)
    layer = BlockCost(t, OpTime(0.0, 0.0), saved_bytes=1000.0, input_bytes=10.0, core_forward_s=0.5, core_bytes=300.0)
    head = BlockCost(t, OpTime(0.0, 0.0), saved_bytes=50.0, input_bytes=10.0)
    costs, nodes = [layer, head], [100.0, 700.0]
    assert backward_work(StageSpec((0, 1), (0, 1)), costs, nodes) == 1100.0  # the layer's 1000 + 100, not 1000 + 700
    assert backward_work(StageSpec((0, 1), (1,)), costs, nodes) == 750.0  # only the head replays
    assert backward_work(StageSpec((0, 1)), costs, nodes) == 700.0  # nothing replays: the largest node
    assert backward_work(StageSpec((0, 1), (), True), costs, nodes) == 700.0  # the core's 300 + 100 < 700


def test_explain_prices_the_plan_without_recomputation_under_the_plan_s_own_sharding(ev):
    """A search may choose ZeRO-3 over the evaluator's DDP; the plan without recomputation is then the
    same ZeRO-3 plan with nothing recomputed (it once came out as the DDP peak: "frees 1216 GiB")."""
    from dataclasses import replace

    from partitioner.baselines import with_dp_sharding
    from partitioner.explain import recompute_summary
    from partitioner.fmt import fmt_bytes

    a, b = _split(ev)
    zero3 = with_dp_sharding(ev, "zero3")
    plan, _ = zero3.make_plan([StageSpec.whole(a, True), StageSpec.whole(b, True)], MESH, SCHED, method="manual")
    assert plan.training.dp_sharding == "zero3"
    bare = replace(plan, stages=tuple(replace(st, recompute=(), selective=False) for st in plan.stages))
    keep = zero3.score(bare)[0].predicted.peak_memory_bytes
    ddp = ev.score(bare)[0].predicted.peak_memory_bytes
    assert keep < ddp  # ZeRO-3 shards the weights, gradients and Adam state over dp=4
    text = recompute_summary(plan, ev)
    assert f"{fmt_bytes(keep)} without)" in text and f"frees {fmt_bytes(keep - plan.predicted.peak_memory_bytes)} " in text, text


_RUNS: list[str] = []  # what _noted saw, in order


def _noted(x):
    _RUNS.append("ran")
    return x * 2.0  # a product by a number saves no tensor for the backward


torch.fx.wrap("_noted")


class _Block(torch.nn.Module):
    """A linear layer, a GELU (each saving a tensor), then a node after the last saved tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return _noted(torch.nn.functional.gelu(self.linear(x)))


def test_a_folded_block_s_replay_runs_to_its_end_not_through_an_early_stop():
    """[Note: a replay that stops early]: the runtime's checkpoint replays a GraphModule block to its end, so
    that no exception crosses fx's _WrappedCall (a traceback extracted per block and micro-batch); torch's
    default would stop the replay before the block's last node. The gradients are the same either way."""
    torch.manual_seed(0)
    block = torch.fx.symbolic_trace(_Block())
    x = torch.randn(3, 4, requires_grad=True)
    grads = []
    for run in (lambda: checkpointed(block, x), lambda: checkpoint(block, x, use_reentrant=False)):
        _RUNS.clear()
        run().sum().backward()
        grads.append((x.grad.clone(), block.linear.weight.grad.clone()))
        x.grad, block.linear.weight.grad = None, None
        grads[-1] += (len(_RUNS),)
    (gx, gw, ours), (gx0, gw0, torch_default) = grads
    assert (ours, torch_default) == (2, 1)  # forward and a whole replay; forward and a replay stopped early
    torch.testing.assert_close((gx, gw), (gx0, gw0))
