"""Capture + annotation at scale on the meta device: wall time, peak RSS, FLOPs vs the closed form.

Targets (issue: foundation): gpt3-175b (96 layers, hidden 12288, seq 2048) and
llama2-70b captured and annotated in at most 30 s and 6 GB peak RSS on a
2-core machine; total forward FLOPs of GPT within 3% of the analytic count.

Each model runs in a fresh subprocess so that its peak RSS is its own.

    python -m benchmarks.capture_scale [--models gpt3-175b llama2-70b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from partitioner.zoo import load_model, ZOO
from partitioner.capture import capture
from partitioner.graph import build_partition_graph
t_import = time.perf_counter() - t0
name = sys.argv[1]
t1 = time.perf_counter()
lm = load_model(name, dtype="bf16")
cap = capture(lm.model, lm.example_inputs, name=name, batch_size=lm.batch_size)
pg = build_partition_graph(cap, lm.model)
t_capture = time.perf_counter() - t1
cfg = lm.model.config
b, s = 1, lm.seq_len
if hasattr(cfg, "n_embd"):      # GPT: 24 b s h^2 + 4 b s^2 h per layer, plus the LM head 2 b s h V
    h, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    analytic = L * (24 * b * s * h * h + 4 * b * s * s * h) + 2 * b * s * h * V
else:                            # Llama: q,o (2 h^2) + k,v (2 h h_kv) + MLP (3 h f), all x2 b s; attention 4 b s^2 h
    h, L, V, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    hkv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    analytic = L * (2 * b * s * (2 * h * h + 2 * h * hkv + 3 * h * f) + 4 * b * s * s * h) + 2 * b * s * h * V
print(json.dumps(dict(
    model=name, params=cap.param_count, nodes=len(cap.nodes), blocks=len(pg.blocks),
    block_types=len(pg.block_types()), import_s=round(t_import, 2), capture_annotate_s=round(t_capture, 2),
    peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    forward_flops=cap.forward_flops, analytic_forward_flops=analytic,
    flops_error=round(cap.forward_flops / analytic - 1, 5),
)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt3-175b", "llama2-70b"])
    args = ap.parse_args()
    rows = []
    for name in args.models:
        out = subprocess.run([sys.executable, "-c", CHILD, name], capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            raise SystemExit(1)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['model']:12s} params {row['params'] / 1e9:7.1f}B  nodes {row['nodes']:6d}  blocks {row['blocks']:4d} "
            f"({row['block_types']} types)  capture+annotate {row['capture_annotate_s']:6.2f} s "
            f"(+{row['import_s']:.1f} s imports)  peak RSS {row['peak_rss_gb']:.2f} GB  "
            f"fwd FLOPs {row['forward_flops']:.4e} vs analytic {row['analytic_forward_flops']:.4e} "
            f"({row['flops_error']:+.2%})"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
