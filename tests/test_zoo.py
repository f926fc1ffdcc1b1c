"""Tests for model loading (partitioner/zoo.py): zoo names, hf: classes, py: functions, --config."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from conftest import small_config
from partitioner.capture import capture
from partitioner.errors import CaptureError
from partitioner.zoo import ZOO, load_model, parse_config_overrides, zoo_names


def test_zoo_names_lists_every_model_sorted():
    names = zoo_names()
    assert names == sorted(names)
    assert set(ZOO) | {"mlp", "hetero-lm"} == set(names)
    for required in ("gpt2-tiny", "llama-tiny", "bert-tiny", "mlp", "gpt3-175b", "llama2-70b"):
        assert required in names


def test_zoo_model_is_built_on_meta_with_batch1_ids():
    lm = load_model("gpt2-tiny", config=small_config("gpt2-tiny"))
    assert lm.name == "gpt2-tiny"
    assert all(p.device.type == "meta" for p in lm.model.parameters())
    assert lm.model.config.n_layer == 2 and lm.model.config.use_cache is False
    # no --seq-len: the zoo entry's default
    assert lm.seq_len == ZOO["gpt2-tiny"].seq_len
    (ids,) = lm.example_inputs
    assert ids.shape == (1, lm.seq_len) and ids.dtype == torch.long and ids.device.type == "meta"
    assert lm.batch_size == 1 and dict(lm.example_kwargs) == {}


def test_default_seq_len_is_capped_by_config_positions():
    # gpt2's default is 1024; a config with fewer positions must not make the default invalid
    lm = load_model("gpt2", config=dict(n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=100))
    assert lm.seq_len == 256
    assert load_model("gpt2-tiny", seq_len=32).example_inputs[0].shape == (1, 32)


def test_seq_len_above_positions_names_both():
    with pytest.raises(CaptureError, match=r"--seq-len 4096 exceeds the model's 128 positions"):
        load_model("gpt2-tiny", seq_len=4096)


def test_dtype_sets_parameter_dtype_and_rejects_unknown():
    lm = load_model("llama-tiny", config=small_config("llama-tiny"), dtype="bf16", seq_len=8)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    with pytest.raises(CaptureError) as err:
        load_model("gpt2-tiny", dtype="fp64")
    assert "'fp64'" in str(err.value) and "bf16" in str(err.value)


@pytest.mark.parametrize(
    "typo, suggestion",
    [("gpt3", "gpt3-175b"), ("gtp2", "gpt2"), ("lama-tiny", "llama-tiny"), ("bert-tiyn", "bert-tiny")],
)
def test_unknown_name_suggests_close_match(typo, suggestion):
    with pytest.raises(CaptureError) as err:
        load_model(typo)
    msg = str(err.value)
    assert f"unknown model {typo!r}" in msg
    assert "did you mean" in msg and suggestion in msg.split("did you mean", 1)[1].split(")")[0]


def test_unknown_name_without_match_explains_the_forms():
    with pytest.raises(CaptureError) as err:
        load_model("zzzzzz")
    msg = str(err.value)
    assert "did you mean" not in msg
    assert "hf:ClassName" in msg and "py:package.module:function" in msg and "gpt2-tiny" in msg


@pytest.mark.parametrize(
    "spec, bad, good",
    [("gpt2-tiny", "n_layers", "n_layer"), ("hf:LlamaForCausalLM", "num_hidden_layer", "num_hidden_layers")],
)
def test_bad_config_key_names_key_and_suggestion(spec, bad, good):
    with pytest.raises(CaptureError) as err:
        load_model(spec, config={bad: 2})
    msg = str(err.value)
    assert f"has no option {bad}" in msg and f"did you mean {good}?" in msg


def test_hf_class_with_overrides():
    lm = load_model("hf:GPT2LMHeadModel", config=dict(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert type(lm.model).__name__ == "GPT2LMHeadModel"
    assert lm.model.config.n_layer == 1 and lm.model.config.n_embd == 32
    assert lm.name == "hf:GPT2LMHeadModel"
    assert lm.seq_len == 512  # min(n_positions=1024, 512)


@pytest.mark.parametrize("cls", ["NoSuchClass", "GPT2Config"])  # a config is not a model class
def test_hf_unknown_class(cls):
    with pytest.raises(CaptureError) as err:
        load_model(f"hf:{cls}")
    msg = str(err.value)
    assert f"hf:{cls}" in msg and "no model class" in msg and "hf:GPT2LMHeadModel" in msg


def test_hf_encoder_decoder_gets_decoder_inputs_and_captures():
    lm = load_model(
        "hf:T5ForConditionalGeneration",
        config=dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2),
        seq_len=8,
    )
    assert len(lm.example_inputs) == 2 and not lm.example_kwargs  # EncoderDecoderLM: ids, decoder ids
    cm = capture(lm.model, lm.example_inputs, lm.example_kwargs)
    assert cm.forward_flops > 0


def test_mlp_config():
    lm = load_model("mlp", config=dict(width=16, depth=3))
    assert len(lm.model.layers) == 3
    assert lm.example_inputs[0].shape == (1, 16)
    assert sum(p.numel() for p in lm.model.parameters()) == 4 * (16 * 16 + 16)


# --- py:module:function --------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``autopart_user_models`` on sys.path with a good and several bad factories."""
    (tmp_path / "autopart_user_models.py").write_text(
        textwrap.dedent(
            """
            import torch

            def good():
                return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), torch.zeros(3, 4)

            def only_model():
                return torch.nn.Linear(4, 4)

            def wrong_pair():
                return "model", torch.zeros(1)

            def broken():
                raise RuntimeError("weights file missing")

            not_callable = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "autopart_user_models", raising=False)
    yield "autopart_user_models"
    sys.modules.pop("autopart_user_models", None)


def test_py_function_loads_and_captures(user_module):
    lm = load_model(f"py:{user_module}:good")
    assert lm.name == "good"
    assert isinstance(lm.model, torch.nn.Sequential)
    assert len(lm.example_inputs) == 1 and lm.example_inputs[0].shape == (3, 4)
    assert lm.batch_size == 3
    cm = capture(lm.model, lm.example_inputs, lm.example_kwargs)
    assert cm.param_count == 4 * 8 + 8 + 8 * 2 + 2
    assert cm.forward_flops == 2 * 3 * (4 * 8 + 8 * 2)


@pytest.mark.parametrize("fn, type_name", [("only_model", "Linear"), ("wrong_pair", "tuple")])
def test_py_function_returning_wrong_thing(user_module, fn, type_name):
    with pytest.raises(CaptureError) as err:
        load_model(f"py:{user_module}:{fn}")
    msg = str(err.value)
    assert f"{fn}() must return (model, example_inputs)" in msg and f"got {type_name}" in msg


@pytest.mark.parametrize(
    "target, expected",
    [
        ("{m}:broken", "broken() raised RuntimeError: weights file missing"),
        ("{m}:missing", "has no function 'missing'"),
        ("{m}:not_callable", "has no function 'not_callable'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("{m}", "is not py:package.module:function"),
    ],
)
def test_py_loader_errors(user_module, target, expected):
    with pytest.raises(CaptureError) as err:
        load_model("py:" + target.format(m=user_module))
    assert expected in str(err.value)


# --- --config parsing ----------------------------------------------------------------


def test_parse_config_overrides_types():
    parsed = parse_config_overrides(
        ["n_layer=4", " n_embd = 768 ", "layer_norm_epsilon=1e-5", "dropout=0.1", "tie=true", "bias=False",
         "pad=none", "act=gelu_new", "offset=-2"]
    )
    assert parsed == {
        "n_layer": 4, "n_embd": 768, "layer_norm_epsilon": 1e-5, "dropout": 0.1, "tie": True, "bias": False,
        "pad": None, "act": "gelu_new", "offset": -2,
    }
    assert type(parsed["n_layer"]) is int and type(parsed["dropout"]) is float and type(parsed["tie"]) is bool
    assert parse_config_overrides([]) == {}
    assert parse_config_overrides(["a=1", "a=2"]) == {"a": 2}  # the last one wins


@pytest.mark.parametrize("bad", ["n_layer", "=4", " =4"])
def test_parse_config_overrides_rejects_non_pairs(bad):
    with pytest.raises(CaptureError, match=r"is not key=value \(e\.g\. --config n_layer=4\)"):
        parse_config_overrides([bad])


def test_parsed_overrides_reach_the_model():
    lm = load_model("gpt2-tiny", config=parse_config_overrides(["n_layer=1", "n_embd=32", "n_head=2"]), seq_len=8)
    assert len(lm.model.transformer.h) == 1 and lm.model.config.n_embd == 32
