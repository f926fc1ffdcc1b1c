"""GPU check: the profiler on one CUDA GPU in bf16, against the analytic and the calibrated models.

Profiles (``partitioner/profile/``, CUDA events) the blocks of GPT-2 small and a
Llama-2-7B-style model, fits the calibrated op model on them, then profiles GPT-2 medium and
a smaller Llama (widths the fit never saw) and compares every block with the analytic
prediction for this GPU's preset and with the calibrated prediction. The issue's target is
GEMM-dominated blocks (layers and the LM head) of the held-out models within 20% MAPE. It
prints a table and writes a JSON result with the GPU's name; it takes a few minutes.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json]
    python -m benchmarks.gpu_check --smoke      # tiny models on the CPU: checks the script, not a GPU

The project needs no GPU for anything else; without one (and without --smoke) this exits
with a clear message.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

GPT2 = "GPT2LMHeadModel"
LLAMA = "LlamaForCausalLM"
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=4096)
LLAMA1B = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
               vocab_size=32000, max_position_embeddings=4096)
GPT2S = dict(n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
GPT2M = dict(n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)

# (label, class, config, batch, seq)
FIT = [("gpt2-small", GPT2, dict(GPT2S, n_layer=2), 8, 1024), ("llama2-7b", LLAMA, dict(LLAMA7B, num_hidden_layers=2), 2, 2048)]
HELD_OUT = [("gpt2-medium", GPT2, dict(GPT2M, n_layer=2), 8, 1024), ("llama-1b", LLAMA, dict(LLAMA1B, num_hidden_layers=2), 4, 2048)]
SMOKE_FIT = [("gpt2-s", GPT2, dict(n_embd=128, n_head=2, vocab_size=1000, n_positions=256, n_layer=2), 2, 64),
             ("llama-s", LLAMA, dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2,
                                     vocab_size=1000, max_position_embeddings=256, num_hidden_layers=2), 2, 64)]
SMOKE_HELD = [("gpt2-m", GPT2, dict(n_embd=192, n_head=3, vocab_size=1500, n_positions=256, n_layer=2), 2, 64)]


def _graph(cls: str, config: dict, batch: int, seq: int, dtype: str):
    from partitioner.capture import capture
    from partitioner.graph import build_partition_graph
    from partitioner.zoo import load_model

    lm = load_model(f"hf:{cls}", dtype=dtype, config=config, seq_len=seq)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    cap = capture(lm.model, (ids,), name=cls, batch_size=batch)
    return build_partition_graph(cap, lm.model)


def _gemm_block(name: str) -> bool:
    """Layers and the LM head: the blocks the issue's GPU target is about."""
    return name == "lm_head" or ".h." in name or ".layers." in name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (tests the script only)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a machine with one (or --smoke to test the script on CPU)",
              file=sys.stderr)
        return 2
    from partitioner.cluster import Cluster
    from partitioner.profile import ProfileCache, ProfileOptions, calibration, fidelity, gpu_preset, profile_model

    device, dtype = ("cpu", "fp32") if args.smoke else ("cuda", "bf16")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        gpu = torch.cuda.get_device_name(0)
        preset = gpu_preset(gpu)
        cluster = Cluster.preset(preset, 1)
    else:
        gpu, preset, cluster = "cpu (smoke)", "local-cpu", Cluster.local(1)
    fit_cases, held_cases = (SMOKE_FIT, SMOKE_HELD) if args.smoke else (FIT, HELD_OUT)
    if args.smoke:  # one thread, CPU time: the smoke run checks the script, even on a busy machine
        torch.set_num_threads(1)
    opts = ProfileOptions(device=device, dtype=dtype, clock="cpu" if args.smoke else "wall")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with ProfileCache(Path(tmp) / "fit.sqlite") as fit_cache:
            fitted = []
            for label, cls, cfg, batch, seq in fit_cases:
                pg = _graph(cls, cfg, batch, seq, dtype)
                fitted.append((label, batch, seq, pg, profile_model(pg, fit_cache, opts)))
                print(f"profiled {label} in {fitted[-1][4].stats.profiling_s:.1f} s", file=sys.stderr)
            calib = calibration(fit_cache, fitted[-1][4].device)
        for label, batch, seq, pg, result in fitted:
            rows += [dict(case=label, held_out=False, batch=batch, seq=seq, **_row(f)) for f in fidelity(pg, result, cluster, calib, dtype)]
        with ProfileCache(Path(tmp) / "held.sqlite") as held_cache:
            for label, cls, cfg, batch, seq in held_cases:
                pg = _graph(cls, cfg, batch, seq, dtype)
                result = profile_model(pg, held_cache, opts)
                print(f"profiled {label} in {result.stats.profiling_s:.1f} s", file=sys.stderr)
                rows += [dict(case=label, held_out=True, batch=batch, seq=seq, **_row(f))
                         for f in fidelity(pg, result, cluster, calib, dtype)]
                if device == "cuda":
                    torch.cuda.empty_cache()
    wall = time.perf_counter() - started

    def mape(rs, model: str, i: int) -> float | None:
        errs = [abs(r[model][i] - r["measured"][i]) / r["measured"][i] for r in rs if r["measured"][i] > 0]
        return sum(errs) / len(errs) if errs else None

    print(f"{gpu} (analytic priced as {preset}), torch {torch.__version__}, {dtype}, profiler medians"
          + (", CUDA events" if device == "cuda" else ""))
    print(f"{'case':12s} {'block':22s} {'meas fwd':>9s} {'ana':>7s} {'cal':>7s} {'meas bwd':>9s} {'ana':>7s} {'cal':>7s}")
    for r in rows:
        (mf, mb), (af, ab), (cf, cb) = r["measured"], r["analytic"], r["calibrated"]

        def e(p: float, m: float) -> str:
            return f"{(p - m) / m:+7.0%}" if m > 0 else "      -"

        print(f"{r['case'] + ('*' if r['held_out'] else ''):12s} {r['block'][:22]:22s} {mf * 1e3:8.3f}m {e(af, mf)} {e(cf, mf)} "
              f"{mb * 1e3:8.3f}m {e(ab, mb)} {e(cb, mb)}")
    held_gemm = [r for r in rows if r["held_out"] and _gemm_block(r["block"])]
    summary = {
        f"{model}_{d}": mape(held_gemm, model, i) for model in ("analytic", "calibrated") for i, d in ((0, "fwd"), (1, "bwd"))
    }
    print("* held out (widths the fit never saw). MAPE over their GEMM-dominated blocks (layers, LM head):")
    for k, v in summary.items():
        print(f"  {k:16s} {v:.1%}" if v is not None else f"  {k:16s} -")
    result = dict(gpu=gpu, preset=preset, torch=torch.__version__, dtype=dtype, date=time.strftime("%Y-%m-%d"),
                  wall_s=wall, held_out_gemm_mape=summary, rows=rows, calibration=calib.to_dict())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"done in {wall:.0f} s")
    return 0


def _row(f) -> dict:
    return dict(block=f.block, count=f.count, measured=f.measured, analytic=f.analytic, calibrated=f.calibrated,
                spread=f.spread)


if __name__ == "__main__":
    raise SystemExit(main())
