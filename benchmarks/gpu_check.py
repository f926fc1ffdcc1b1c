"""GPU check: measured block times on one CUDA GPU against the analytic cost model's prediction.

For GPT-2 small and medium layers, a Llama-2-7B-style layer and the GPT-2
LM head, in bf16, this times forward and forward+backward with CUDA events
(warm-up, then the median of repeated runs) and prints them next to what
``cost_models.AnalyticCostModel`` predicts for the preset of this GPU (H100
or H200 -> dgx-h100 / dgx-h200, A100 -> dgx-a100-80g). It writes a JSON
result with the GPU's name. It needs a CUDA GPU and runs in about a minute.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json]

The project does not need a GPU for anything else; this script exits with a
clear message when there is none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

CASES = [  # name, zoo model, config overrides, batch, seq, which blocks to time
    ("gpt2-small layer", "gpt2", {"n_layer": 2}, 8, 1024, "transformer.h.0"),
    ("gpt2-medium layer", "gpt2-medium", {"n_layer": 2}, 8, 1024, "transformer.h.0"),
    ("llama2-7b layer", "llama2-7b", {"num_hidden_layers": 2}, 2, 2048, "model.layers.0"),
    ("gpt2 lm_head", "gpt2", {"n_layer": 2}, 8, 1024, "lm_head"),
]


def _preset_for(gpu: str) -> str:
    name = gpu.upper()
    if "H200" in name:
        return "dgx-h200"
    if "H100" in name:
        return "dgx-h100"
    if "A100" in name:
        return "dgx-a100-80g" if "80" in name else "dgx-a100-40g"
    if "V100" in name:
        return "p3-v100"
    return "dgx-h100"


def _time(fn, warmup: int = 5, reps: int = 20) -> tuple[float, float]:
    """Median and spread (max-min) in seconds of ``fn`` over ``reps`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), max(times) - min(times)


def _block_runner(model: torch.nn.Module, block: str, batch: int, seq: int):
    """A callable that runs just ``block`` on a random input of the right shape, and its input."""
    cfg = model.config
    hidden = getattr(cfg, "n_embd", None) or cfg.hidden_size
    dev, dt = "cuda", torch.bfloat16
    mod = model.get_submodule(block)
    x = torch.randn(batch, seq, hidden, device=dev, dtype=dt, requires_grad=True)
    if block == "lm_head":
        return lambda: mod(x), x
    kwargs = {}
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None:
        pos = torch.arange(seq, device=dev).unsqueeze(0).expand(batch, -1)
        kwargs["position_embeddings"] = rotary(x, pos)

    def run():
        out = mod(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run, x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a machine with one", file=sys.stderr)
        return 2
    from cost_models import AnalyticCostModel
    from partitioner.capture import capture
    from partitioner.cluster import Cluster
    from partitioner.graph import build_partition_graph
    from partitioner.plan import Training
    from partitioner.evaluate import Evaluator
    from partitioner.zoo import load_model

    gpu = torch.cuda.get_device_name(0)
    preset = _preset_for(gpu)
    cluster = Cluster.preset(preset, 1)
    cost = AnalyticCostModel(cluster)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for label, zoo, cfg, batch, seq, block in CASES:
        meta = load_model(zoo, dtype="bf16", config=cfg, seq_len=seq)
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        cap = capture(meta.model, (ids,), name=zoo, batch_size=batch)
        pg = build_partition_graph(cap, meta.model)
        ev = Evaluator(pg, cluster, cost, Training(global_batch=batch))
        b = pg.blocks[pg.block_index(block)]
        pred = ev.block_cost(b, batch, 1, {}).time

        real = load_model(zoo, dtype="bf16", config=cfg, seq_len=seq, device="cuda").model
        real.train()
        real.requires_grad_(True)
        for m in real.modules():  # dropout changes nothing in the cost; keep runs comparable
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        run, x = _block_runner(real, block, batch, seq)
        grad = None

        def fwd():
            with torch.no_grad():
                run()

        def fwd_bwd():
            nonlocal grad
            with torch.enable_grad():  # tracing may leave grad mode off on some torch versions
                out = run()
                if grad is None:
                    grad = torch.randn_like(out)
                out.backward(grad)

        f, f_spread = _time(fwd)
        fb, fb_spread = _time(fwd_bwd)
        row = dict(
            block=label, batch=batch, seq=seq,
            measured_forward_s=f, measured_backward_s=fb - f, spread_s=max(f_spread, fb_spread),
            predicted_forward_s=pred.forward_s, predicted_backward_s=pred.backward_s,
            forward_flops=b.forward_flops, backward_flops=b.backward_flops,
            capture_warnings=list(cap.warnings),
        )
        row["forward_error"] = pred.forward_s / f - 1
        row["backward_error"] = pred.backward_s / (fb - f) - 1
        rows.append(row)
        del real, x
        torch.cuda.empty_cache()
    mape = statistics.mean(abs(r[k]) for r in rows for k in ("forward_error", "backward_error"))
    print(f"{gpu} (priced as {preset}), torch {torch.__version__}, bf16, CUDA events, median of 20 after 5 warm-ups")
    print(f"{'block':20s} {'b x s':>10s} {'fwd meas':>10s} {'fwd pred':>10s} {'err':>7s} {'bwd meas':>10s} {'bwd pred':>10s} {'err':>7s}")
    for r in rows:
        print(
            f"{r['block']:20s} {r['batch']:>4d} x {r['seq']:<4d} {r['measured_forward_s'] * 1e3:9.3f}m "
            f"{r['predicted_forward_s'] * 1e3:9.3f}m {r['forward_error']:+7.1%} {r['measured_backward_s'] * 1e3:9.3f}m "
            f"{r['predicted_backward_s'] * 1e3:9.3f}m {r['backward_error']:+7.1%}"
        )
    print(f"mean absolute percentage error (forward and backward): {mape:.1%}")
    for r in rows:
        print(f"{r['block']:20s} counted FLOPs: forward {r['forward_flops']:.3e}, backward {r['backward_flops']:.3e}"
              + (f"; capture notes: {'; '.join(r['capture_warnings'])}" if r["capture_warnings"] else ""))
    result = dict(gpu=gpu, preset=preset, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=rows, mape=mape)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
