"""Sequence parallelism with tensor parallelism ([Note: sequence parallelism] in partitioner/tp_strategies.py).

A tp=2 plan with Megatron's sequence-parallel layout runs for real (two gloo ranks) and matches a
single-process reference; the memory model prices less activation memory for it than for the same
plan without; the sharding ILP picks it where memory binds and not where time does; the sequence dim
is found from the captured shapes and refused where it is ambiguous.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from partitioner.capture import capture
from partitioner.cluster import Cluster
from partitioner.planner import plan_parallelism
from partitioner.sharding import megatron_sharding
from partitioner.solver.sharding_ilp import FAST_WEIGHT, LEAN_WEIGHT, solve_block_sharding
from partitioner.tp_strategies import OUTPUT_LAYOUT, allowed_strategies, sequence_shape, token_dim
from partitioner.zoo import load_model

sys.path.insert(0, str(Path(__file__).parent))
from runtime_harness import MODELS, launch  # noqa: E402
from test_solver import _stack_evaluator  # noqa: E402

TOL = 1e-5
SP_MODELS = ["gpt2-tiny", "llama-tiny"]
# Micro-batches of 2 (GPT-2's flattened tokens split by DTensor on the batch dim) and of 1 (on the sequence).
# And the first layer recomputed with the other layers' attention cores (checkpointed node regions that
# gather sequence-split inputs again in backward; partitioner/recompute.py), on GPT-2 only.
LAYOUTS = {
    "tp2-sp": dict(pp=1, tp=2, dp=1, microbatches=1, global_batch=2, sequence_parallel=True),
    "tp2-sp-mb1": dict(pp=1, tp=2, dp=1, microbatches=2, global_batch=2, sequence_parallel=True),
    "tp2-sp-recompute": dict(pp=1, tp=2, dp=1, microbatches=1, global_batch=2, sequence_parallel=True,
                             recompute_layers=dict(blocks=1, selective=True)),
}
LAYOUT_MODELS = {"tp2-sp-recompute": ["gpt2-tiny"]}


@pytest.mark.slow
def test_sequence_parallel_matches_single_process(tmp_path: Path) -> None:
    reports = launch(2, "equivalence", {"layouts": LAYOUTS, "models": SP_MODELS, "layout_models": LAYOUT_MODELS},
                     tmp_path, timeout_s=400)
    for rank, r in enumerate(reports):
        assert r["rc"] == 0 and r.get("job_failed") is None, f"rank {rank}: {r.get('job_failed')}\n{r['stderr'][-4000:]}"
    for layout in LAYOUTS:
        for name in LAYOUT_MODELS.get(layout, SP_MODELS):
            for rank, r in enumerate(reports):
                m = r[layout][name]
                assert {"seq", "row_seq"} <= set(m["strategies"]), (layout, name, m["strategies"])
                assert m["loss"] == pytest.approx(m["ref_loss"], rel=TOL), (layout, name, rank)
                assert m["grad"] <= TOL, f"{layout} {name} rank {rank}: gradients differ by {m['grad']:.2e}"
                assert m["param"] <= TOL, f"{layout} {name} rank {rank}: parameters differ by {m['param']:.2e}"
                assert set(m["names"]) == set(m["all_names"]), (layout, name)  # tp: every rank checks every grad
                if "recompute_layers" in LAYOUTS[layout]:
                    assert all(len(b) == 1 for b in m["plan_recompute"]) and all(m["plan_selective"]), m


@pytest.fixture(scope="module")
def captured():
    out = {}
    for name in SP_MODELS:
        lm = load_model(name, config=MODELS[name], seq_len=8)
        out[name] = lm, capture(lm.model, lm.example_inputs, lm.example_kwargs, name=lm.name)
    return out


@pytest.mark.parametrize("name", SP_MODELS)
def test_megatron_sequence_parallel_layout(name: str, captured) -> None:
    """Row linears reduce-scatter, the norms and residual adds run on split tokens, the column
    linears are Megatron's as without sequence parallelism."""
    _, cap = captured[name]
    plain, sp = megatron_sharding(cap, 2), megatron_sharding(cap, 2, sequence_parallel=True)
    rows = {n for n, s in plain.items() if s == "row"}
    assert rows and rows == {n for n, s in sp.items() if s == "row_seq"}
    assert {n for n, s in plain.items() if s == "column"} == {n for n, s in sp.items() if s == "column"}
    norms = [n for n in cap.nodes.values() if "layer_norm" in n.target or "aten.mean" in n.target]
    assert norms and all(sp.get(n.name) == "seq" for n in norms), [(n.name, sp.get(n.name)) for n in norms]
    assert all(OUTPUT_LAYOUT[s] != "Q" for s in plain.values())


@pytest.mark.parametrize("name", SP_MODELS)
def test_memory_model_divides_sequence_parallel_activations(name: str, captured) -> None:
    """The same tp=2 plan with and without sequence parallelism: less activation memory with it,
    the same parameters; per layer the saved bytes of the split regions are divided by tp."""
    lm, cap = captured[name]
    results = {
        sp: plan_parallelism(cap, (), Cluster.local(2), dtype="fp32", method="params", pp=1,
                             tp=2, dp=1, microbatches=1, global_batch=2, sequence_parallel=sp)
        for sp in (False, True)
    }
    without, with_sp = (results[sp].sim for sp in (False, True))
    assert with_sp.peak_activation_bytes[0] < without.peak_activation_bytes[0]
    assert with_sp.peak_parts[0].static == without.peak_parts[0].static
    ev = results[True].evaluator
    layer = next(b for b in ev.pgraph.blocks if b.is_layer)
    by_name = {sp: {ev.captured.node_of_key[k]: s for k, s in results[sp].plan.sharding.items()} for sp in results}
    saved = {sp: ev.block_cost(layer, 1, 2, by_name[sp]).saved_bytes for sp in (False, True)}
    assert saved[True] < saved[False]


def test_ilp_chooses_sequence_parallelism_where_memory_binds() -> None:
    """On a wide MLP block the fast layout keeps the norm whole (its slice and the gathers cost
    time); the lean layout, for meshes short of memory, runs it on split tokens and saves its input
    as slices; with sequence parallelism ruled out neither does."""
    ev = _stack_evaluator(1024, 512)
    tables = ev.layout_costs(ev.pgraph.blocks[0], 2, 2)
    fast = solve_block_sharding(tables, FAST_WEIGHT)
    lean = solve_block_sharding(tables, LEAN_WEIGHT)
    lean_off = solve_block_sharding(tables, LEAN_WEIGHT, sequence_parallel=False)
    assert not any(OUTPUT_LAYOUT[s] == "Q" for s in fast.strategies.values())
    assert lean.strategies.get("layer_norm") == "seq"
    assert not any(OUTPUT_LAYOUT[s] == "Q" for s in lean_off.strategies.values())

    def saved(sol):
        return tables.evaluate({n: sol.strategies.get(n, "replicate") for n in tables.nodes})[2]

    assert saved(lean) < saved(lean_off)
    assert lean.time_s > fast.time_s  # memory bought with time: the gathers at the block's edges


def test_the_sequence_dim_comes_from_the_shapes_and_ambiguity_is_refused() -> None:
    assert token_dim((2, 8, 32), (2, 8)) == 1
    assert token_dim((16, 32), (2, 8)) == 0  # GPT-2's Conv1D flattens the tokens
    assert token_dim((2, 4, 8, 8), (2, 8)) is None  # attention's heads
    assert token_dim((8, 8), (1, 8)) is None  # (tokens, x) or (batch, seq)? refused
    assert token_dim((2, 8, 32), None) is None
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 32))
    for shape, ok in (((2, 8, 32), True), ((8, 8, 32), False), ((2, 7, 32), False)):  # batch == seq; 7 % 2
        cap = capture(model, (torch.zeros(shape, device="meta"),), name="ln")
        assert (sequence_shape(cap) is not None) == (shape[0] != shape[1])
        norm = next(n for n in cap.nodes.values() if "layer_norm" in n.target)
        assert ("seq" in allowed_strategies(norm, cap, 2)) == ok, shape


def _exported_node(module: torch.nn.Module, *inputs: torch.Tensor, op: str):
    gm = torch.export.export(module, inputs).module()
    return next(n for n in gm.graph.nodes if op in str(n.target))


def test_realize_splits_the_tokens_on_dtensor() -> None:
    """On DTensor (torch's fake process group: placements, not values), ``seq`` slices a whole
    input on the sequence dim and keeps a split it is given; ``row_seq`` reduce-scatters to the
    token dim of a (batch, seq, x) or a flattened (batch * seq, x) output."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from partitioner.tp_strategies import STRATEGIES, TPContext

    norm = _exported_node(torch.nn.LayerNorm(32), torch.zeros(2, 8, 32), op="layer_norm")
    linear = _exported_node(torch.nn.Linear(32, 32), torch.zeros(2, 8, 32), op="linear")
    flat = _exported_node(torch.nn.Linear(32, 32), torch.zeros(16, 32), op="linear")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        ctx = TPContext(mesh, lambda n, args, kwargs: n.target(*args, **kwargs))
        x, w, b = torch.randn(2, 8, 32), torch.ones(32), torch.zeros(32)
        args = (x, [32], w, b, 1e-5)
        out = STRATEGIES["seq"].realize(ctx, norm, args, {})
        assert isinstance(out, DTensor) and out.placements == (Shard(1),) and tuple(out.shape) == (2, 8, 32)
        by_batch = DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(0)])
        out = STRATEGIES["seq"].realize(ctx, norm, (by_batch, [32], w, b, 1e-5), {})
        assert out.placements == (Shard(0),)  # a token split it is given is kept, not moved
        weight = DTensor.from_local(torch.randn(32, 16), mesh, [Shard(1)], run_check=False)
        for node, shape, dim in ((linear, (2, 8, 16), 1), (flat, (16, 16), 0)):
            split = DTensor.from_local(torch.randn(*shape), mesh, [Shard(len(shape) - 1)], run_check=False)
            out = STRATEGIES["row_seq"].realize(ctx, node, (split, weight, torch.zeros(32)), {})
            assert out.placements == (Shard(dim),) and out.shape[-1] == 32, (shape, out.placements)
    finally:
        dist.destroy_process_group()


def test_explain_says_what_sequence_parallelism_frees_and_costs(captured) -> None:
    """``autopart plan --explain`` names what SP buys: the same plan priced with its token-split nodes run
    whole and its row linears all-reducing holds more memory."""
    from partitioner.explain import sequence_parallel_effect, sequence_parallel_summary

    lm, cap = captured["gpt2-tiny"]
    result = plan_parallelism(cap, (), Cluster.local(2), dtype="fp32", method="params", pp=1, tp=2, dp=1,
                              microbatches=1, global_batch=2, sequence_parallel=True)
    effect = sequence_parallel_effect(result.plan, result.evaluator)
    assert effect.nodes == sum(s in ("seq", "row_seq") for s in result.plan.sharding.values()) > 0
    assert effect.freed_bytes > 0
    plain = plan_parallelism(cap, (), Cluster.local(2), dtype="fp32", method="params", pp=1, tp=2, dp=1,
                             microbatches=1, global_batch=2, sequence_parallel=False)
    assert effect.peak_without_bytes == plain.plan.predicted.peak_memory_bytes  # Megatron's layout without SP
    assert sequence_parallel_summary(result.plan, result.evaluator).startswith(
        f"sequence parallelism on {effect.nodes} nodes frees ")


@pytest.mark.slow  # a two-rank launch
def test_a_recomputed_block_keeps_its_sequence_split_input_as_a_shard(tmp_path: Path, captured) -> None:
    """[Note: a recomputed block's inputs] in partitioner/recompute.py: with every block recomputed, a block
    whose input a sequence-split node of its stage made keeps that input's 1/tp shard. Measured by the storage
    meter at the loss's call (the end of the forward: every block's kept inputs and the logits): the bytes
    held with sequence parallelism and without differ by exactly what the memory model's activation bytes
    differ by (gpt2-tiny: the inputs of its 4 layers, its final norm and its head, halved), and the model's
    figure is not below what is held."""
    layout = dict(pp=1, tp=2, dp=1, microbatches=1, global_batch=2, recompute=True)
    runs = {key: dict(model="gpt2-tiny", layout=dict(layout, sequence_parallel=key == "sp")) for key in ("sp", "plain")}
    _, cap = captured["gpt2-tiny"]
    predicted = {key: plan_parallelism(cap, (), Cluster.local(2), dtype="fp32", method="params",
                                       **run["layout"]).sim.peak_activation_bytes[0] for key, run in runs.items()}
    reports = launch(2, "held", {"runs": runs}, tmp_path, timeout_s=400)
    for rank, r in enumerate(reports):
        assert r["rc"] == 0 and r.get("job_failed") is None, f"rank {rank}: {r.get('job_failed')}\n{r['stderr'][-4000:]}"
    for r in reports:
        sp, plain = r["sp"], r["plain"]
        assert {"seq", "row_seq"} <= set(sp["strategies"]) and all(len(rc) > 4 for rc in sp["recompute"]), sp
        held_sp, held_plain = min(sp["held_bytes"]), min(plain["held_bytes"])  # runtime_harness.job_held
        assert held_plain - held_sp == predicted["plain"] - predicted["sp"] > 0, (held_plain, held_sp, predicted)
        assert predicted["sp"] >= held_sp
