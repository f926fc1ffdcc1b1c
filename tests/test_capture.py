"""Tests for tracing and annotation (partitioner/capture.py).

FLOP closed forms follow Narayanan et al. 2021 (Megatron-LM): a GPT layer costs
24*b*s*h^2 (QKV, projection, 4h MLP) plus 4*b*s^2*h for the attention scores
and their product with V, counting the full s x s matrix (flop_counter does not
skip the masked half); the LM head adds 2*b*s*h*V.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import ALL_ZOO, SMALL, small_config, unique_numel
from partitioner.capture import CapturedModel, capture, model_fingerprint
from partitioner.errors import CaptureError
from partitioner.zoo import load_model


def rel_err(got: float, want: float) -> float:
    return abs(got - want) / want


# --- every zoo model -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_ZOO)
def test_zoo_model_captures(zoo_capture, name):
    lm, cm, _ = zoo_capture(name)
    assert isinstance(cm, CapturedModel)
    assert cm.tracer == "export" and cm.warnings == ()
    assert cm.name == name
    assert cm.param_count == unique_numel(lm.model)
    assert cm.param_bytes == sum(t.numel() * t.element_size() for t in lm.model.parameters()) + sum(
        b.numel() * b.element_size() for b in lm.model.buffers()
    )
    assert cm.dtype == "float32" and cm.batch_size == 1
    assert cm.forward_flops > 0 and cm.backward_flops > cm.forward_flops
    compute = cm.compute_nodes()
    assert compute
    for n in compute:
        assert n.module_stack, f"{n.name} ({n.target}) has no owning module"
        assert n.module == n.module_stack[-1] and n.module_type
    # every parameter a node reads is a known canonical name
    read = {p for n in cm.nodes.values() for p in n.params}
    assert read <= set(cm.params)
    assert {p for p, info in cm.params.items() if not info.is_buffer} <= read


def test_node_annotations_are_consistent(zoo_capture):
    lm, cm, _ = zoo_capture("gpt2-tiny")
    names = list(cm.nodes)
    position = {n: i for i, n in enumerate(names)}
    for n in cm.nodes.values():
        assert all(position[i] < position[n.name] for i in n.inputs), "nodes are not in topological order"
        assert n.bytes_written == n.output_bytes == sum(t.bytes for t in n.outputs)
        for t in n.outputs:
            numel = 1
            for d in t.shape:
                numel *= d
            assert t.bytes == numel * torch.empty((), dtype=getattr(torch, t.dtype)).element_size()
        assert set(n.saved_inputs) <= set(n.inputs)
    # the head: logits [1, s, V] from the tied embedding
    head = [n for n in cm.compute_nodes() if n.module == "lm_head"]
    vocab, h, s = SMALL["GPT2LMHeadModel"]["vocab_size"], SMALL["GPT2LMHeadModel"]["n_embd"], lm.seq_len
    assert any(t.shape == (1, s, vocab) for n in head for t in n.outputs)
    assert sum(n.forward_flops for n in head) == 2 * s * h * vocab
    assert cm.input_shapes == ((1, s),)


def test_tracer_choice_and_bad_arguments(zoo_capture):
    lm = zoo_capture("mlp").loaded
    with pytest.raises(CaptureError, match="tracer='jit' is not one of"):
        capture(lm.model, lm.example_inputs, tracer="jit")
    with pytest.raises(CaptureError, match="expected a torch.nn.Module, got function"):
        capture(lambda x: x, lm.example_inputs)


# --- tied weights --------------------------------------------------------------------


def test_gpt2_tied_embedding_is_one_parameter(zoo_capture):
    lm, cm, _ = zoo_capture("gpt2-tiny")
    wte = cm.params["transformer.wte.weight"]
    assert wte.aliases == ("lm_head.weight",)
    assert "lm_head.weight" not in cm.params
    vocab, h = SMALL["GPT2LMHeadModel"]["vocab_size"], SMALL["GPT2LMHeadModel"]["n_embd"]
    assert wte.numel == vocab * h and wte.trainable and not wte.is_buffer
    with_duplicates = sum(p.numel() for _, p in lm.model.named_parameters(remove_duplicate=False))
    assert cm.param_count == with_duplicates - vocab * h
    # the head's matmul reads the embedding under its canonical name
    head_params = {p for n in cm.compute_nodes() if n.module == "lm_head" for p in n.params}
    assert head_params == {"transformer.wte.weight"}


def test_bert_tied_decoder(zoo_capture):
    _, cm, _ = zoo_capture("bert-tiny")
    assert "cls.predictions.decoder.weight" in cm.params["bert.embeddings.word_embeddings.weight"].aliases


# --- meta device ---------------------------------------------------------------------


class TwoLayer(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.norm(self.up(x))))


def test_model_built_on_meta_captures():
    with torch.device("meta"):
        model = TwoLayer()
    cm = capture(model, (torch.zeros(4, 16, device="meta"),))
    assert cm.param_count == unique_numel(model)
    assert cm.forward_flops == 2 * 4 * 16 * 32 * 2
    assert all(p.device.type == "meta" for p in model.parameters())


def test_cpu_model_matches_its_meta_twin():
    torch.manual_seed(0)
    cfg = small_config("gpt2-tiny")
    cpu = load_model("gpt2-tiny", config=cfg, seq_len=16, device="cpu")
    meta = load_model("gpt2-tiny", config=cfg, seq_len=16)
    assert next(cpu.model.parameters()).device.type == "cpu"
    before = {k: v.clone() for k, v in cpu.model.state_dict().items()}
    ids = torch.randint(0, cfg["vocab_size"], (2, 16))
    c = capture(cpu.model, (ids,))
    m = capture(meta.model, (torch.zeros(2, 16, dtype=torch.long, device="meta"),))
    assert (c.forward_flops, c.backward_flops, c.param_count, c.param_bytes) == (
        m.forward_flops, m.backward_flops, m.param_count, m.param_bytes,
    )
    assert [n.outputs for n in c.nodes.values()] == [n.outputs for n in m.nodes.values()]
    assert c.fingerprint == m.fingerprint == model_fingerprint(meta.model)
    # capturing does not touch real weights
    after = cpu.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fingerprint_tracks_architecture_not_batch(zoo_capture):
    base = zoo_capture("gpt2-tiny").captured
    wider = load_model("gpt2-tiny", config={**small_config("gpt2-tiny"), "n_embd": 128}, seq_len=16)
    deeper = load_model("gpt2-tiny", config={**small_config("gpt2-tiny"), "n_layer": 3}, seq_len=16)
    half = load_model("gpt2-tiny", config=small_config("gpt2-tiny"), seq_len=16, dtype="bf16")
    fps = {model_fingerprint(m.model) for m in (wider, deeper, half)}
    assert len(fps) == 3 and base.fingerprint not in fps
    same = load_model("gpt2-tiny", config=small_config("gpt2-tiny"), seq_len=8)
    assert model_fingerprint(same.model) == base.fingerprint


# --- FLOPs against closed forms -------------------------------------------------------


def test_gpt2_flops_match_closed_form():
    b, s, h, layers, heads, vocab = 2, 64, 128, 2, 4, 1000
    lm = load_model(
        "gpt2-tiny", config=dict(n_layer=layers, n_embd=h, n_head=heads, n_positions=128, vocab_size=vocab), seq_len=s
    )
    cm = capture(lm.model, (torch.zeros(b, s, dtype=torch.long, device="meta"),))
    assert cm.batch_size == b and cm.input_shapes == ((b, s),)
    expected = layers * (24 * b * s * h**2 + 4 * b * s**2 * h) + 2 * b * s * h * vocab
    assert rel_err(cm.forward_flops, expected) < 0.03
    assert rel_err(cm.backward_flops, 2 * cm.forward_flops) < 0.05


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_linear_stack_flops_are_exact(tracer):
    b, dims = 8, [16, 48, 32, 8]
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(i, o) for i, o in zip(dims, dims[1:])])
    cm = capture(model, (torch.zeros(b, dims[0], device="meta"),), tracer=tracer)
    assert cm.tracer == tracer
    per_layer = [n.forward_flops for n in cm.compute_nodes()]
    assert per_layer == [2 * b * i * o for i, o in zip(dims, dims[1:])]
    # each layer's weights are attributed to it, whichever tracer ran
    assert [n.params for n in cm.compute_nodes()] == [(f"{k}.weight", f"{k}.bias") for k in range(3)]
    # backward: grad of weight + grad of input, each as large as the forward matmul, except the first
    # layer's input gradient, which autograd does not compute (the model's input needs no gradient)
    assert cm.backward_flops == 2 * cm.forward_flops - per_layer[0]


def test_fx_and_export_agree_on_costs():
    with torch.device("meta"):
        model = TwoLayer()
    x = torch.zeros(4, 16, device="meta")
    ex, fx_ = capture(model, (x,), tracer="export"), capture(model, (x,), tracer="fx")
    assert fx_.tracer == "fx"
    assert (ex.forward_flops, ex.backward_flops, ex.param_count) == (fx_.forward_flops, fx_.backward_flops, fx_.param_count)
    up = next(n for n in fx_.compute_nodes() if n.module == "up")
    assert up.params == ("up.weight", "up.bias")
    assert up.bytes_read == (4 * 16 + 32 * 16 + 32) * 4  # input, weight, bias
    # the weight autograd keeps is a parameter, not an activation
    assert sum(n.saved_bytes for n in fx_.compute_nodes() if n.op == "call_module" and "Linear" in n.module_type) == 0


def test_fx_keyword_inputs_bind_by_name():
    class Optional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, mask=None, bias=None):
            y = self.lin(x)
            if mask is not None:
                y = y * mask
            if bias is not None:
                y = y + bias
            return y

    cm = capture(Optional(), (torch.zeros(2, 8),), {"bias": torch.zeros(8)}, tracer="fx")
    assert cm.nodes["bias"].outputs[0].shape == (8,)
    targets = [n.target for n in cm.compute_nodes()]
    assert not any("mul" in t for t in targets)  # mask was left out: its branch is not traced
    assert any("add" in t for t in targets)


# --- errors a person can act on ------------------------------------------------------


class DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:  # the line the error must point at
            return self.b(y)
        return y


class ItemBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        keep = int(x[0, 0].item())
        return self.a(x)[:, :keep]


@pytest.mark.parametrize(
    "model, line",
    [(DataDependentBranch, "if y.sum() > 0:"), (ItemBranch, "keep = int(x[0, 0].item())")],
)
def test_untraceable_model_raises_capture_error_naming_the_line(model, line):
    with pytest.raises(CaptureError) as err:
        capture(model(), (torch.randn(2, 4),))
    msg = str(err.value)
    assert f"could not trace {model.__name__}" in msg
    assert "torch.export:" in msg and "torch.fx.symbolic_trace:" in msg  # both tracers were tried
    assert line in msg and "test_capture.py:" in msg  # where in the user's code
    assert "Try:" in msg and "torch.cond" in msg and "data-dependent" in msg


def test_wrong_example_inputs_raise_capture_error():
    with pytest.raises(CaptureError) as err:
        capture(TwoLayer(), (torch.zeros(2, 5),))  # width 16 expected
    assert "check that example_inputs match forward()" in str(err.value)


def test_views_are_marked_and_copies_are_not(zoo_capture):
    """Aliases (view, transpose, getitem) cost nothing in the cost model; real kernels must not be marked."""
    cap = zoo_capture("gpt2-tiny").captured
    by_target: dict[str, set[bool]] = {}
    for n in cap.compute_nodes():
        by_target.setdefault(n.target, set()).add(n.is_view)
    assert by_target["aten.view.default"] == {True}
    assert by_target["aten.transpose.int"] == {True}
    assert by_target["getitem"] == {True}
    assert by_target["aten.addmm.default"] == {False}
    assert by_target["aten.layer_norm.default"] == {False}
    # GPT-2 makes the attention output contiguous after a transpose: a real copy.
    assert by_target["aten.contiguous.default"] == {False}


def test_capture_restores_grad_mode_and_counts_backward_under_no_grad_regions():
    """A model that switches grad mode inside forward (as Hugging Face rotary embeddings do)
    still gets backward FLOPs for its other ops, and the caller's grad mode is left as it was."""

    class Rotaryish(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            with torch.no_grad():
                scale = torch.arange(16, dtype=x.dtype, device=x.device).cos()
            return self.proj(x * scale)

    model = Rotaryish().to("meta")
    for mode in (True, False):
        torch.set_grad_enabled(mode)
        try:
            cap = capture(model, (torch.zeros(4, 16, device="meta"),))
            assert torch.is_grad_enabled() is mode
        finally:
            torch.set_grad_enabled(True)
        linear = [n for n in cap.compute_nodes() if n.target in ("aten.linear.default", "aten.addmm.default")]
        # The weight's gradient only: the linear's input (x * scale) needs no gradient, so autograd
        # computes no input gradient for it.
        assert linear and all(n.backward_flops == n.forward_flops > 0 for n in linear)
