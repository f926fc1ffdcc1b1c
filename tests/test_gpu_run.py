"""benchmarks/gpu_run.py's dry run on the CPU: the prepared GPU script runs end to end before any GPU minute is spent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_run_dry_mode_plans_trains_and_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--device", "cpu", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [md] = list(tmp_path.glob("*-gpu-run-cpu.md"))
    result = json.loads(md.with_suffix(".json").read_text())
    assert result["dry_run"] and result["device"] == "cpu" and result["steps"] == 2
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert result["step_time_s"] > 0 and result["predicted_step_time_s"] > 0
    assert result["mfu"] > 0 and result["tokens_per_s"] > 0
    assert result["peak_memory_bytes"] is None  # the CPU allocator keeps no peak; a GPU run fills it
    eq = result["equivalence"]
    assert eq["loss_rel"] <= 1e-6 and eq["grad_rel_max"] <= 1e-5  # cpu against cpu: the same computation
    text = md.read_text()
    assert "DRY RUN" in text and "| MFU |" in text and "python benchmarks/gpu_run.py --device cpu" in text
