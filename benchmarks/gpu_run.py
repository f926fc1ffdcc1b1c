"""The prepared GPU run: profile, plan and train a ~1B Llama on one GPU; predicted vs measured.

    python benchmarks/gpu_run.py                 # on a GPU machine: < 6 minutes
    python benchmarks/gpu_run.py --device cpu    # dry run: a tiny Llama on the CPU, checks the script

Steps, each a command a user would type (printed as it runs):
  (a) ``autopart plan --profile --device cuda``: profile the model's blocks on this GPU and plan for
      one GPU of its preset (``gpu_preset``), bf16 with adam-mixed;
  (b) ``torchrun --nproc-per-node 1 -m partitioner run``: 20 training steps (2 warm-up);
  (c) the report: measured step time, tokens/s, MFU and peak allocated memory against the
      plan's predictions (issue 13's targets: MFU within 15%, peak memory within 5%);
  (d) equivalence: one fp32 training step of a small Llama on this device against the CPU
      (TF32 off), relative difference of the loss and of every gradient.
Results go to ``benchmarks/results/DATE-gpu-run-<device>.{md,json}`` (or ``--out DIR``).
The dry run uses the same code paths with a 2-layer Llama, a local-cpu cluster, 2 steps after 1 warm-up,
and plans without profiling (the analytic model);
its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ~1.1B parameters: TinyLlama-1.1B's shape (22 layers, d 2048, GQA 32/4 heads, ffn 5632).
LLAMA_1B = dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
LLAMA_SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=32)


def _config_args(config: dict) -> list[str]:
    return ["--config", *[f"{k}={v}" for k, v in config.items()]]


def _run(cmd: list[str], env: dict[str, str], timeout_s: float) -> str:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_run: step failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1]}\n"
                         f"{proc.stderr[-3000:]}")
    return proc.stdout


def equivalence(device: str) -> dict[str, float]:
    """One fp32 step of a small Llama on ``device`` against the CPU: relative loss and worst gradient gap."""
    import copy

    import torch

    from partitioner.zoo import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    lm = load_model("llama2-7b", config=LLAMA_SMALL, seq_len=16, dtype="fp32", device="cpu")
    cpu_model = lm.model.train()
    dev_model = copy.deepcopy(cpu_model).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, LLAMA_SMALL["vocab_size"], (4, 16), generator=g)
    target = torch.randint(0, LLAMA_SMALL["vocab_size"], (4, 16), generator=g)
    out = {}
    grads = {}
    for name, model in (("cpu", cpu_model), ("device", dev_model)):
        logits = model(ids.to(next(model.parameters()).device)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 target.to(logits.device).reshape(-1))
        loss.backward()
        out[name] = float(loss)
        grads[name] = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    worst = max(float((grads["device"][n] - g0).abs().max() / max(float(g0.abs().max()), 1e-8))
                for n, g0 in grads["cpu"].items())
    return dict(loss_cpu=out["cpu"], loss_device=out["device"],
                loss_rel=abs(out["device"] - out["cpu"]) / abs(out["cpu"]), grad_rel_max=worst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (the real run) or cpu (dry run)")
    ap.add_argument("--out", default=None, help="directory for the results (default benchmarks/results)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 20 on cuda, 2 on cpu)")
    args = ap.parse_args()

    import torch

    from partitioner.plan import Plan
    from partitioner.profile import gpu_preset

    started = time.perf_counter()
    dry = args.device == "cpu"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_run: no CUDA device here; run the dry run with --device cpu")
    device_name = torch.cuda.get_device_name(0) if not dry else "cpu"
    steps = args.steps or (2 if dry else 20)
    warmup = 1 if dry else 2
    if dry:
        # The smallest model that has every part (embedding, 2 layers, head): the dry run checks code paths.
        model, config, seq, batch, cluster, dtype = "llama2-7b", LLAMA_SMALL, 16, 2, "local-cpu:1", "fp32"
    else:
        model, config, seq, batch, cluster, dtype = "llama2-7b", LLAMA_1B, 2048, 8, gpu_preset(device_name), "bf16"
    out_dir = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    stem = out_dir / f"{time.strftime('%Y-%m-%d')}-gpu-run-{slug}"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dry:
        env["AUTOPART_DEVICE"] = "cpu"  # gloo on CPU even on a GPU machine (partitioner/devices.py)
    with tempfile.TemporaryDirectory() as tmp:
        plan_path, run_json = Path(tmp) / "plan.json", Path(tmp) / "run.json"
        # (a) profile and plan
        _run([sys.executable, "-m", "partitioner", "plan", "--model", model, *_config_args(config), "--seq-len", str(seq),
              "--cluster", cluster, "--nodes", "1", "--gpus-per-node", "1", "--global-batch", str(batch),
              "--dtype", dtype, "--time-limit", "10", "--json", str(plan_path),
              # The dry run plans with the analytic model: `plan --profile` on the CPU is tested on its own
              # (tests/test_profile.py), and measuring here would double the dry run's time.
              *([] if dry else ["--profile", "--device", args.device, "--cache", str(Path(tmp) / "profile-cache.json")])],
             env, 240)
        plan = Plan.load(plan_path)
        # (b) train
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "partitioner",
              "run", "--plan", str(plan_path), "--model", model, *_config_args(config), "--seq-len", str(seq),
              "--steps", str(steps), "--warmup", str(warmup), "--json", str(run_json)], env, 240)
        run = json.loads(run_json.read_text())
    # (c) predicted vs measured
    pred = plan.predicted
    step = sum(run["step_times_s"]) / len(run["step_times_s"])
    tokens = plan.training.global_batch * seq
    mfu = pred.mfu * pred.step_time_s / step  # the same model FLOPs per step, in the measured time
    peak = max((p for p in run.get("peak_memory_bytes") or [] if p is not None), default=None)
    # (d) equivalence on this device against the CPU
    eq = equivalence("cpu" if dry else "cuda")
    result = dict(
        device=device_name, dry_run=dry, model=model, config=config, seq_len=seq, plan_mesh=str(plan.mesh),
        plan_schedule=plan.schedule.name, microbatches=plan.schedule.microbatches, dtype=plan.training.dtype,
        optimizer=plan.training.optimizer, params=plan.model.params, steps=steps,
        step_time_s=step, predicted_step_time_s=pred.step_time_s, tokens_per_s=tokens / step,
        predicted_tokens_per_s=tokens / pred.step_time_s, mfu=mfu, predicted_mfu=pred.mfu,
        mfu_rel_error=(mfu - pred.mfu) / pred.mfu, peak_memory_bytes=peak, predicted_peak_memory_bytes=pred.peak_memory_bytes,
        peak_rel_error=None if peak is None else (peak - pred.peak_memory_bytes) / pred.peak_memory_bytes,
        losses=run["losses"], equivalence=eq, wall_s=time.perf_counter() - started,
    )
    gib = 2**30
    lines = [
        f"# GPU run on {device_name}{' (DRY RUN on CPU: checks the script, not a GPU)' if dry else ''} ({time.strftime('%Y-%m-%d')})",
        "", f"Command: `python benchmarks/gpu_run.py --device {args.device}` ({result['wall_s']:.0f} s in all).", "",
        f"{model} with {config} ({plan.model.params / 1e9:.2f}B params), seq {seq}, global batch {plan.training.global_batch}, "
        f"{plan.training.dtype}/{plan.training.optimizer}; plan {plan.mesh}, {plan.schedule.name} x{plan.schedule.microbatches}.", "",
        "| figure | predicted | measured | error |", "|---|---|---|---|",
        f"| step time | {pred.step_time_s * 1e3:.1f} ms | {step * 1e3:.1f} ms | {(step - pred.step_time_s) / pred.step_time_s:+.1%} |",
        f"| tokens/s | {tokens / pred.step_time_s:.0f} | {tokens / step:.0f} | |",
        f"| MFU | {pred.mfu:.1%} | {mfu:.1%} | {result['mfu_rel_error']:+.1%} (target within 15%) |",
        f"| peak memory | {pred.peak_memory_bytes / gib:.2f} GiB | "
        + (f"{peak / gib:.2f} GiB | {result['peak_rel_error']:+.1%} (target within 5%) |" if peak is not None
           else "not measured (the CPU allocator keeps no peak) | |"),
        "", f"Equivalence, one fp32 step of a 2-layer Llama on {'cpu' if dry else 'cuda'} vs cpu: loss rel. diff "
        f"{eq['loss_rel']:.2e}, worst gradient rel. diff {eq['grad_rel_max']:.2e}.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
