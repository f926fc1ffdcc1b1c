"""Tests for coarsening captured nodes into blocks (partitioner/graph.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import ALL_ZOO, SMALL, SMALL_LAYERS, SMALL_SEQ
from partitioner.capture import capture
from partitioner.errors import CaptureError
from partitioner.graph import PartitionGraph, build_partition_graph
from partitioner.zoo import ZOO

F32 = 4  # bytes per float32 element


def expected_blocks(name: str) -> list[str]:
    layers = range(SMALL_LAYERS)
    if name == "mlp":
        return [*(f"layers.{i}" for i in layers), "head"]
    hf = ZOO[name].hf_class
    if hf == "GPT2LMHeadModel":
        return ["transformer.wte", "transformer.wpe", *(f"transformer.h.{i}" for i in layers), "transformer.ln_f", "lm_head"]
    if hf == "LlamaForCausalLM":
        return ["model.embed_tokens", *(f"model.layers.{i}" for i in layers), "model.norm", "lm_head"]
    if hf == "BertForMaskedLM":
        return ["bert.embeddings", *(f"bert.encoder.layer.{i}" for i in layers), "cls"]
    raise AssertionError(f"no expectation for {name}")


def assert_well_formed(pg: PartitionGraph) -> None:
    """Blocks partition the compute nodes, are topologically ordered, and add up to the model."""
    cm = pg.captured
    assert [b.index for b in pg.blocks] == list(range(len(pg.blocks)))
    placed = [n for b in pg.blocks for n in b.nodes]
    assert sorted(placed) == sorted(n.name for n in cm.compute_nodes())
    for e in pg.edges:
        assert e.src < e.dst, f"edge {e} points backwards"
        assert e.bytes == sum(cm.nodes[t].output_bytes for t in e.tensors) > 0
        assert set(e.tensors) <= set(pg.blocks[e.src].nodes)
    # every data dependency between blocks is an edge
    for b in pg.blocks:
        for n in b.nodes:
            for i in cm.nodes[n].inputs:
                if i in pg._block_of_node and pg.block_of(i) != b.index:
                    assert pg.block_graph.has_edge(pg.block_of(i), b.index)
    assert sum(b.forward_flops for b in pg.blocks) == cm.forward_flops
    assert sum(b.backward_flops for b in pg.blocks) == cm.backward_flops
    assert pg.params_bytes(range(len(pg.blocks)))[0] == cm.param_count
    assert pg.boundary_bytes(0) == 0 and pg.boundary_bytes(len(pg.blocks)) == 0


# --- zoo models ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in ALL_ZOO if n != "hetero-lm"])
def test_zoo_blocks_match_layers(zoo_capture, name):
    _, cm, pg = zoo_capture(name)
    assert [b.name for b in pg.blocks] == expected_blocks(name)
    assert_well_formed(pg)
    layers = [b for b in pg.blocks if b.is_layer]
    assert len(layers) == SMALL_LAYERS
    assert len({b.type_id for b in layers}) == 1, "identical layers must share a type"
    assert all(b.type_id != layers[0].type_id for b in pg.blocks if not b.is_layer)
    assert len({(b.param_count, b.forward_flops, b.activation_bytes) for b in layers}) == 1
    assert all(b.activation_bytes > 0 and b.param_count > 0 for b in layers)
    # without the module tree the containers are inferred from numbered module names
    assert [b.name for b in build_partition_graph(cm).blocks] == expected_blocks(name)


def test_gpt2_layer_flops_and_boundaries(zoo_capture):
    lm, cm, pg = zoo_capture("gpt2-tiny")
    cfg = SMALL["GPT2LMHeadModel"]
    s, h, vocab = SMALL_SEQ, cfg["n_embd"], cfg["vocab_size"]
    hidden = s * h * F32  # one [1, s, h] float32 activation
    for b in pg.blocks:
        if b.is_layer:
            want = 24 * s * h * h + 4 * s * s * h
            assert abs(b.forward_flops - want) / want < 0.03
            # parameters of one layer: attn (4h^2 + 4h), mlp (8h^2 + 5h), two layer norms (4h)
            assert b.param_count == 12 * h * h + 13 * h
    assert pg.blocks[pg.block_index("lm_head")].forward_flops == 2 * s * h * vocab
    h0, h1 = pg.block_index("transformer.h.0"), pg.block_index("transformer.h.1")
    layer_edge = next(e for e in pg.edges if (e.src, e.dst) == (h0, h1))
    assert layer_edge.bytes == hidden
    # the residual stream crosses the cut between layers, plus whatever glue (mask) later layers need
    assert hidden <= pg.boundary_bytes(h1) < 2 * hidden
    assert pg.stage_boundary_bytes([h0, h1]) == [pg.boundary_bytes(h0), pg.boundary_bytes(h1)]


def test_gpt2_tied_embedding_is_shared_by_first_and_last_block(zoo_capture):
    _, cm, pg = zoo_capture("gpt2-tiny")
    last = len(pg.blocks) - 1
    assert pg.shared_params() == {"transformer.wte.weight": [0, last]}
    assert pg.blocks[0].name == "transformer.wte" and pg.blocks[last].name == "lm_head"
    wte = cm.params["transformer.wte.weight"]
    # a stage holding both ends counts the tied weight once
    count, size = pg.params_bytes([0, last])
    assert count == wte.numel and size == wte.bytes
    assert pg.blocks[last].param_count == wte.numel  # the head has no weight of its own


def test_block_types_and_lookup(zoo_capture):
    _, _, pg = zoo_capture("llama-tiny")
    types = pg.block_types()
    layer_type = pg.blocks[pg.block_index("model.layers.0")].type_id
    assert types[layer_type] == [pg.block_index(f"model.layers.{i}") for i in range(SMALL_LAYERS)]
    assert sum(len(v) for v in types.values()) == len(pg.blocks)
    # a module inside a block finds its block
    assert pg.block_index("model.layers.1.mlp.down_proj") == pg.block_index("model.layers.1")
    with pytest.raises(CaptureError, match=r"no block is named 'model.layer.1'; did you mean model.layers.1"):
        pg.block_index("model.layer.1")
    for i, b in enumerate(pg.blocks):
        assert all(pg.block_of(n) == i for n in b.nodes)
        assert pg.block_graph.nodes[i]["block"] is b


# --- hand-made branching models ------------------------------------------------------


class Blk(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x, skip=None):
        y = torch.relu(self.lin(x))
        if skip is not None:
            y = y + skip
        return y


class SkipNet(nn.Module):
    """Four blocks; block 0's output is also added inside block 2."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Blk() for _ in range(4))

    def forward(self, x):
        a = self.blocks[0](x)
        b = self.blocks[1](a)
        c = self.blocks[2](b, skip=a)
        return self.blocks[3](c)


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_skip_connection_across_blocks(tracer):
    with torch.device("meta"):
        model = SkipNet()
    cm = capture(model, (torch.zeros(2, 8, device="meta"),), tracer=tracer)
    pg = build_partition_graph(cm, model)
    assert [b.name for b in pg.blocks] == [f"blocks.{i}" for i in range(4)]
    assert_well_formed(pg)
    act = 2 * 8 * F32
    assert {(e.src, e.dst): e.bytes for e in pg.edges} == {(0, 1): act, (0, 2): act, (1, 2): act, (2, 3): act}
    skip = next(e for e in pg.edges if (e.src, e.dst) == (0, 2))
    assert skip.tensors == next(e for e in pg.edges if (e.src, e.dst) == (0, 1)).tensors  # the same tensor
    assert pg.block_graph.edges[0, 2]["bytes"] == act
    # block 0's output crosses the cuts before blocks 1 and 2, once each
    assert [pg.boundary_bytes(k) for k in range(5)] == [0, act, 2 * act, act, 0]
    assert pg.blocks[2].input_bytes == 2 * act and pg.blocks[0].output_bytes == act
    # blocks 0, 1 and 3 are the same computation; block 2 adds the skip
    tid = [b.type_id for b in pg.blocks]
    assert tid[0] == tid[1] == tid[3] != tid[2]
    assert pg.block_types() == {tid[0]: [0, 1, 3], tid[2]: [2]}


class EncLayer(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.lin = nn.Linear(w, w)

    def forward(self, x):
        return torch.relu(self.lin(x))


class DecLayer(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.self_lin = nn.Linear(w, w)
        self.cross = nn.Linear(w, w)

    def forward(self, x, memory):
        return torch.relu(self.self_lin(x)) + self.cross(memory).mean(dim=1, keepdim=True)


class EncDec(nn.Module):
    """Two branches joined by the encoder output, which every decoder layer reads."""

    def __init__(self, w: int = 8) -> None:
        super().__init__()
        self.enc_in = nn.Linear(w, w)
        self.enc = nn.ModuleList(EncLayer(w) for _ in range(2))
        self.dec_in = nn.Linear(w, w)
        self.dec = nn.ModuleList(DecLayer(w) for _ in range(2))
        self.head = nn.Linear(w, 4)

    def forward(self, src, tgt):
        h = self.enc_in(src)
        for layer in self.enc:
            h = layer(h)
        g = self.dec_in(tgt)
        for layer in self.dec:
            g = layer(g, h)
        return self.head(g)


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_encoder_decoder_branches(tracer):
    with torch.device("meta"):
        model = EncDec()
    src, tgt = torch.zeros(2, 5, 8, device="meta"), torch.zeros(2, 3, 8, device="meta")
    cm = capture(model, (src, tgt), tracer=tracer)
    pg = build_partition_graph(cm, model)
    names = ["enc_in", "enc.0", "enc.1", "dec_in", "dec.0", "dec.1", "head"]
    assert [b.name for b in pg.blocks] == names
    assert_well_formed(pg)
    assert [b.is_layer for b in pg.blocks] == [False, True, True, False, True, True, False]
    memory, stream = 2 * 5 * 8 * F32, 2 * 3 * 8 * F32
    assert {(e.src, e.dst): e.bytes for e in pg.edges} == {
        (0, 1): memory, (1, 2): memory, (2, 4): memory, (2, 5): memory,
        (3, 4): stream, (4, 5): stream, (5, 6): stream,
    }
    # the encoder output crosses every cut up to the last decoder layer, once per cut
    assert pg.stage_boundary_bytes([1, 2, 3, 4, 5, 6]) == [
        memory, memory, memory, memory + stream, memory + stream, stream,
    ]
    t = {b.name: b.type_id for b in pg.blocks}
    assert t["enc.0"] == t["enc.1"] and t["dec.0"] == t["dec.1"] and t["enc.0"] != t["dec.0"]
    assert pg.blocks[4].param_count == 2 * (8 * 8 + 8)


def test_t5_encoder_and_decoder_blocks():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, use_cache=False
    )
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(cfg)
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    dec_ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    cm = capture(model, (ids,), {"decoder_input_ids": dec_ids})
    assert cm.param_count == sum(p.numel() for p in model.parameters())
    pg = build_partition_graph(cm, model)
    assert_well_formed(pg)
    names = [b.name for b in pg.blocks]
    assert names == [
        "encoder.embed_tokens", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm",
        "decoder.embed_tokens", "decoder.block.0", "decoder.block.1", "decoder.final_layer_norm", "lm_head",
    ]
    idx = {n: i for i, n in enumerate(names)}
    # the shared embedding is read by both embeddings and the tied head
    assert pg.shared_params()["shared.weight"] == [idx["encoder.embed_tokens"], idx["decoder.embed_tokens"], idx["lm_head"]]
    # cross-attention: the encoder output feeds every decoder block
    enc_out = idx["encoder.final_layer_norm"]
    memory = 1 * 8 * 32 * F32
    for d in ("decoder.block.0", "decoder.block.1"):
        assert pg.block_graph.has_edge(enc_out, idx[d])
        assert pg.block_graph.edges[enc_out, idx[d]]["bytes"] >= memory
    assert pg.boundary_bytes(idx["decoder.block.1"]) >= memory + 1 * 4 * 32 * F32
    t = [b.type_id for b in pg.blocks]
    assert t[idx["encoder.block.0"]] != t[idx["decoder.block.0"]]
    assert t[idx["decoder.block.0"]] != t[idx["encoder.embed_tokens"]]


def test_model_without_parameters_still_has_blocks():
    class Act(nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2

    cm = capture(Act(), (torch.zeros(2, 3, device="meta"),))
    pg = build_partition_graph(cm)
    assert len(pg.blocks) >= 1 and sorted(n for b in pg.blocks for n in b.nodes) == sorted(
        n.name for n in cm.compute_nodes()
    )


def test_hetero_lm_layers_of_different_widths_are_different_types(zoo_capture):
    """The deliberately unbalanced zoo model: one block per layer, each width its own type."""
    _, cm, pg = zoo_capture("hetero-lm")
    assert [b.name for b in pg.blocks] == ["embed", "layers.0", "layers.1", "norm", "head"]
    assert_well_formed(pg)
    small, wide = pg.blocks[1], pg.blocks[2]  # widths 64 and 256 (tests/conftest.py)
    assert small.is_layer and wide.is_layer and small.type_id != wide.type_id
    assert wide.forward_flops > 3 * small.forward_flops  # the MLP dominates: 4x the width
