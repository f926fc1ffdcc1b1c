"""Profiler fidelity on this CPU: the calibrated model's per-block predictions on sizes it was not fitted on.

Fits the calibrated op model (cost_models/calibrated.py) to the nodes of
GPT-2-style and Llama-style models at some widths and sequence lengths, then
measures the blocks of the same architectures at *other* widths and lengths
and compares them with what the fitted model predicts (and with the datasheet
analytic model, for reference). Target (issue 4): per-block MAPE <= 15%.

    python -m benchmarks.profile_fidelity [--threads 1] [--json OUT]

Each run uses fresh caches in a temporary directory, so nothing measured
before leaks into the fit.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

GPT2 = "GPT2LMHeadModel"
LLAMA = "LlamaForCausalLM"


def gpt2(width: int, vocab: int) -> dict:
    return dict(n_layer=2, n_embd=width, n_head=width // 64, n_positions=1024, vocab_size=vocab)


def llama(width: int, vocab: int) -> dict:
    return dict(num_hidden_layers=2, hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64,
                num_attention_heads=width // 64, num_key_value_heads=max(1, width // 128), vocab_size=vocab,
                max_position_embeddings=1024)


# (label, class, config, seq): the fit set and the held-out set share no (width, seq, vocab).
FIT = [
    ("gpt2 d256 s128", GPT2, gpt2(256, 4096), 128),
    ("gpt2 d512 s128", GPT2, gpt2(512, 4096), 128),
    ("gpt2 d512 s384", GPT2, gpt2(512, 8192), 384),
    ("gpt2 d1024 s128", GPT2, gpt2(1024, 8192), 128),
    ("llama d256 s128", LLAMA, llama(256, 4096), 128),
    ("llama d512 s128", LLAMA, llama(512, 4096), 128),
    ("llama d512 s384", LLAMA, llama(512, 8192), 384),
    ("llama d1024 s128", LLAMA, llama(1024, 8192), 128),
]
HELD_OUT = [
    ("gpt2 d384 s256", GPT2, gpt2(384, 6000), 256),
    ("gpt2 d768 s256", GPT2, gpt2(768, 6000), 256),
    ("llama d384 s256", LLAMA, llama(384, 6000), 256),
    ("llama d768 s256", LLAMA, llama(768, 6000), 256),
]


def _graph(hf_class: str, config: dict, seq: int):
    from partitioner.capture import capture
    from partitioner.graph import build_partition_graph
    from partitioner.zoo import load_model

    lm = load_model(f"hf:{hf_class}", dtype="fp32", config=config, seq_len=seq)
    cm = capture(lm.model, lm.example_inputs, lm.example_kwargs, name=lm.name, batch_size=lm.batch_size)
    return build_partition_graph(cm, lm.model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads while measuring (default 1)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="wall time, or process CPU time (immune to other jobs on shared cores; one thread only)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from partitioner.cluster import Cluster
    from partitioner.profile import ProfileCache, ProfileOptions, calibration, fidelity, profile_model

    cluster = Cluster.local(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fit_cache = ProfileCache(Path(tmp) / "fit.sqlite")
        for label, cls, cfg, seq in FIT:
            t0 = time.perf_counter()
            r = profile_model(_graph(cls, cfg, seq), fit_cache, ProfileOptions(clock=args.clock))
            print(f"fit     {label:18s} {r.stats.measured:4d} measurements in {time.perf_counter() - t0:5.1f} s",
                  file=sys.stderr)
        calib = calibration(fit_cache, r.device)
        rows = []
        for label, cls, cfg, seq in HELD_OUT:
            held_cache = ProfileCache(Path(tmp) / f"held-{len(rows)}.sqlite")
            pg = _graph(cls, cfg, seq)
            r = profile_model(pg, held_cache, ProfileOptions(clock=args.clock))
            for f in fidelity(pg, r, cluster, calib, "fp32"):
                rows.append(dict(case=label, block=f.block, count=f.count, measured=f.measured,
                                 calibrated=f.calibrated, analytic=f.analytic, spread=f.spread))
            held_cache.close()
        fit_cache.close()
    wall = time.perf_counter() - started

    def ape(pred: float, meas: float) -> float:
        return abs(pred - meas) / meas

    print(f"{'case':18s} {'block':22s} {'meas fwd':>9s} {'cal fwd':>9s} {'err':>6s} {'meas bwd':>9s} {'cal bwd':>9s} "
          f"{'err':>6s} {'ana f+b err':>11s}")
    errs = {"calibrated_fwd": [], "calibrated_bwd": [], "calibrated_step": [], "analytic_step": []}
    for r in rows:
        (mf, mb), (cf, cb), (af, ab) = r["measured"], r["calibrated"], r["analytic"]
        errs["calibrated_fwd"].append(ape(cf, mf))
        if mb > 0:
            errs["calibrated_bwd"].append(ape(cb, mb))
        errs["calibrated_step"].append(ape(cf + cb, mf + mb))
        errs["analytic_step"].append(ape(af + ab, mf + mb))
        print(f"{r['case']:18s} {r['block']:22s} {mf * 1e3:8.3f}m {cf * 1e3:8.3f}m {(cf - mf) / mf:+6.0%} "
              f"{mb * 1e3:8.3f}m {cb * 1e3:8.3f}m {((cb - mb) / mb if mb else 0):+6.0%} "
              f"{(af + ab - mf - mb) / (mf + mb):+11.0%}")
    mape = {k: sum(v) / len(v) for k, v in errs.items() if v}
    print()
    for k, v in mape.items():
        print(f"MAPE {k:16s} {v:6.1%}  over {len(errs[k])} blocks")
    print(f"threads {torch.get_num_threads()} · clock {args.clock} · {platform.processor() or platform.machine()} · torch {torch.__version__} "
          f"· {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            threads=torch.get_num_threads(), clock=args.clock, torch=torch.__version__, wall_s=wall, mape=mape, rows=rows,
            fit=[c[0] for c in FIT], held_out=[c[0] for c in HELD_OUT],
            fits={k: v.to_dict() for k, v in calib.fits.items()},
        ), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
