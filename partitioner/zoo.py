"""Where models come from: the built-in zoo, Hugging Face classes, and user functions.

``load_model(spec, ...)`` turns the CLI's MODEL argument into an
``nn.Module`` on the meta device plus example inputs (batch 1) for capture:

* a zoo name (``gpt2``, ``gpt3-175b``, ``llama2-70b``, ``bert-large``, small
  ones for tests) built from a ``transformers`` config with random weights,
  never downloaded;
* ``hf:ClassName`` with ``key=value`` config overrides, e.g.
  ``hf:LlamaForCausalLM num_hidden_layers=4``;
* ``py:package.module:function`` returning ``(model, example_inputs)``.

Models are built on ``meta`` so that a 175B model costs no memory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import CaptureError

__all__ = ["ModelSpec", "LoadedModel", "EncoderDecoderLM", "ZOO", "load_model", "parse_config_overrides", "DTYPES_TORCH"]

DTYPES_TORCH = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.bfloat16,  # weights stay bf16 with fp8 matmuls; storage is the conservative choice
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A zoo entry: a transformers class and its config."""

    hf_class: str  # transformers class name
    config: Mapping[str, Any]  # config keyword arguments
    seq_len: int  # default sequence length
    about: str  # one line for `autopart inspect --list`


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for capture."""

    name: str
    model: torch.nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: Mapping[str, Any]
    seq_len: int | None
    batch_size: int


_GPT2 = "GPT2LMHeadModel"
_LLAMA = "LlamaForCausalLM"
_BERT = "BertForMaskedLM"

ZOO: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(_GPT2, dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024), 1024, "GPT-2 small, 124M"),
    "gpt2-medium": ModelSpec(_GPT2, dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024), 1024, "GPT-2 medium, 355M"),
    "gpt2-xl": ModelSpec(_GPT2, dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024), 1024, "GPT-2 XL, 1.5B"),
    # GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 96 heads, context 2048.
    "gpt3-175b": ModelSpec(
        _GPT2, dict(n_layer=96, n_embd=12288, n_head=96, n_positions=2048), 2048, "GPT-3 175B (GPT-2 architecture)"
    ),
    # Llama 2 (Touvron et al. 2023): 7B = 32 x 4096, MHA; 70B = 80 x 8192 with 8 KV heads (GQA).
    "llama2-7b": ModelSpec(
        _LLAMA,
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
        4096,
        "Llama 2 7B",
    ),
    "llama2-70b": ModelSpec(
        _LLAMA,
        dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
        4096,
        "Llama 2 70B (grouped-query attention)",
    ),
    "bert-large": ModelSpec(
        _BERT,
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        512,
        "BERT large, 340M, masked LM",
    ),
    # A deliberately unbalanced model: the vocabulary dwarfs each layer, so the
    # embedding and the head are far heavier than a layer (for baselines tests).
    "gpt-bigvocab": ModelSpec(
        _GPT2, dict(n_layer=8, n_embd=512, n_head=8, n_positions=512, vocab_size=256000), 512,
        "GPT, 8 x 512 with a 256k vocabulary: huge embedding and head",
    ),
    # Small models for tests and for this machine.
    "gpt2-tiny": ModelSpec(_GPT2, dict(n_layer=4, n_embd=64, n_head=4, n_positions=128, vocab_size=1000), 64, "tiny GPT-2 for tests"),
    "llama-tiny": ModelSpec(
        _LLAMA,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128),
        64,
        "tiny Llama (GQA) for tests",
    ),
    "bert-tiny": ModelSpec(
        _BERT,
        dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=1000,
             max_position_embeddings=128),
        64,
        "tiny BERT for tests",
    ),
}

# Not transformers models: plain nn.Module stacks.
_LOCAL = {
    "mlp": "a stack of 8 Linear+GELU layers, width 256 (for tests)",
    "hetero-lm": "a language model with mixed layer widths (MLP 512 to 16384) and a 128k vocabulary",
}


def zoo_names() -> list[str]:
    return sorted([*ZOO, *_LOCAL])


def load_model(
    spec: str,
    *,
    seq_len: int | None = None,
    dtype: str = "fp32",
    config: Mapping[str, Any] | None = None,
    device: str | torch.device = "meta",
) -> LoadedModel:
    """Build the model named by ``spec`` on ``device`` with a batch-1 example input."""
    if dtype not in DTYPES_TORCH:
        raise CaptureError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES_TORCH)}")
    torch_dtype = DTYPES_TORCH[dtype]
    overrides = dict(config or {})
    if spec in ZOO:
        z = ZOO[spec]
        return _build_hf(spec, z.hf_class, {**z.config, **overrides}, seq_len, torch_dtype, device, z.seq_len)
    if spec == "mlp":
        return _build_mlp(overrides, torch_dtype, device)
    if spec == "hetero-lm":
        return _build_hetero(overrides, seq_len, torch_dtype, device)
    if spec.startswith("hf:"):
        return _build_hf(spec, spec[3:], overrides, seq_len, torch_dtype, device)
    if spec.startswith("py:"):
        return _build_py(spec, torch_dtype, device)
    import difflib

    near = difflib.get_close_matches(spec, zoo_names(), n=2)
    hint = f" (did you mean {' or '.join(near)}?)" if near else ""
    raise CaptureError(
        f"unknown model {spec!r}{hint}: use a zoo name ({', '.join(zoo_names())}), "
        "hf:ClassName with --config key=value, or py:package.module:function"
    )


def parse_config_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["n_layer=4", "vocab_size=50000"]`` -> typed dict (int, float, bool, or string)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CaptureError(f"--config {pair!r} is not key=value (e.g. --config n_layer=4)")
        out[key.strip()] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _build_hf(
    name: str,
    class_name: str,
    config: Mapping[str, Any],
    seq_len: int | None,
    dtype: torch.dtype,
    device: Any,
    default_seq_len: int = 512,
) -> LoadedModel:
    """``seq_len=None`` means ``default_seq_len``, capped at the model's positions (which
    ``config`` may have lowered); an explicit ``seq_len`` above them is an error."""
    try:
        import transformers
    except ImportError:
        raise CaptureError(
            f"model {name!r} needs the transformers package: pip install 'autopart[hf]'"
        ) from None
    cls = getattr(transformers, class_name, None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "config_class"):
        raise CaptureError(
            f"hf:{class_name}: transformers has no model class of that name (e.g. hf:GPT2LMHeadModel, hf:LlamaForCausalLM)"
        )
    cfg_cls = cls.config_class
    defaults = cfg_cls()
    known = set(defaults.to_dict())
    unknown = sorted(k for k in config if k not in known and not hasattr(defaults, k))
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {difflib.get_close_matches(k, known, n=1)[0]}?)" if difflib.get_close_matches(k, known, n=1) else k for k in unknown]
        raise CaptureError(f"{cfg_cls.__name__} has no option {', '.join(hints)}")
    # Special token ids beyond a shrunken vocabulary only make transformers warn; they play no part in training.
    vocab = config.get("vocab_size", getattr(defaults, "vocab_size", None))
    fixes = {
        key: None
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if key not in config and isinstance(getattr(defaults, key, None), int) and vocab and getattr(defaults, key) >= vocab
    }
    try:
        cfg = cfg_cls(**{**config, **fixes, "use_cache": False})
    except Exception as exc:  # a value the config class rejects (wrong type, out of range)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CaptureError(f"--config for {cfg_cls.__name__}: {first}; check the values of {', '.join(config) or 'the config'}") from None
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if seq_len is None:
        seq_len = min(default_seq_len, max_pos or default_seq_len)
    if max_pos is not None and seq_len > max_pos:
        raise CaptureError(f"--seq-len {seq_len} exceeds the model's {max_pos} positions; lower it or raise the config")
    try:
        with torch.device(device):
            model = cls(cfg)
        model = model.to(dtype)
    except Exception as exc:  # a config that the class rejects
        raise CaptureError(f"building {class_name} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)  # token 0 exists in every vocabulary
    if getattr(cfg, "is_encoder_decoder", False):  # T5, BART: see EncoderDecoderLM
        return LoadedModel(name, EncoderDecoderLM(model), (ids, ids.clone()), {}, seq_len, 1)
    return LoadedModel(name, model, (ids,), {}, seq_len, 1)


class EncoderDecoderLM(torch.nn.Module):
    """A Hugging Face encoder-decoder (T5, BART) that takes its encoder and decoder token ids as
    positional inputs and returns the logits.

    It cannot run forward without decoder inputs, which transformers takes by keyword
    (``decoder_input_ids=``), while a pipeline stage, and so ``autopart run``, feeds a model
    positional inputs. The transformers model is the child ``model``, so its modules are named
    ``model.encoder.block.0`` and so on in a plan. Its ``config`` and ``_init_weights`` are the
    transformers model's."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        """The transformers config (the runtime initializes weights by its ``_init_weights``)."""
        return self.model.config

    def _init_weights(self, module: torch.nn.Module) -> None:
        """transformers' initialization of ``module`` (partitioner/materialize.py, building on meta)."""
        self.model._init_weights(module)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits


class _MLPStack(torch.nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(depth)
        )
        self.head = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _MixedLayer(torch.nn.Module):
    """A pre-norm residual MLP layer of its own width."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d_model)
        self.up = torch.nn.Linear(d_model, width)
        self.down = torch.nn.Linear(width, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class _HeteroLM(torch.nn.Module):
    """Deliberately unbalanced: layers of very different widths and a huge vocabulary."""

    def __init__(self, vocab: int, d_model: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.layers = torch.nn.ModuleList(_MixedLayer(d_model, w) for w in widths)
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


_HETERO_WIDTHS = (1024, 8192, 512, 16384, 2048, 8192, 1024, 4096, 512, 16384, 2048, 4096)


def _build_hetero(config: Mapping[str, Any], seq_len: int | None, dtype: torch.dtype, device: Any) -> LoadedModel:
    vocab = int(config.get("vocab_size", 128_000))
    d_model = int(config.get("d_model", 2048))
    widths = tuple(int(w) for w in str(config.get("widths", ",".join(map(str, _HETERO_WIDTHS)))).split(","))
    with torch.device(device):
        model = _HeteroLM(vocab, d_model, widths).to(dtype)
    seq = seq_len or 1024
    ids = torch.zeros(1, seq, dtype=torch.long, device=device)
    return LoadedModel("hetero-lm", model, (ids,), {}, seq, 1)


def _build_mlp(config: Mapping[str, Any], dtype: torch.dtype, device: Any) -> LoadedModel:
    width = int(config.get("width", 256))
    depth = int(config.get("depth", 8))
    with torch.device(device):
        model = _MLPStack(width, depth).to(dtype)
    x = torch.zeros(1, width, dtype=dtype, device=device)
    return LoadedModel("mlp", model, (x,), {}, None, 1)


def _build_py(spec: str, dtype: torch.dtype, device: Any) -> LoadedModel:
    target = spec[3:]
    mod_name, sep, fn_name = target.partition(":")
    if not sep or not mod_name or not fn_name:
        raise CaptureError(f"{spec!r} is not py:package.module:function")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:
        raise CaptureError(f"{spec}: cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from None
    fn: Callable[..., Any] | None = getattr(module, fn_name, None)
    if not callable(fn):
        raise CaptureError(f"{spec}: module {mod_name!r} has no function {fn_name!r}")
    try:
        result = fn()
    except Exception as exc:
        raise CaptureError(f"{spec}: {fn_name}() raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise CaptureError(f"{spec}: {fn_name}() must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    bsz = int(first.shape[0]) if first is not None and first.dim() else 1
    return LoadedModel(fn_name, model, inputs, {}, None, bsz)
