"""Golden plans: small (model, cluster) cases whose plan JSON is kept in this folder.

A change of plan (a new cost, a new search choice, a reordered candidate) shows up as a diff of
these files that a reviewer reads, the way torch's pipelining tests keep golden schedules.
``tests/test_baselines.py::test_golden_plans`` plans every case and compares; when a change is
meant, regenerate them with one command from the repository root:

    PYTHONPATH=$PWD python -m tests.golden.cases

Each case is an ``autopart plan`` command line on a preset cluster (a ``local-cpu`` cluster would
record this machine's CPU and memory in the plan, and the files would differ from machine to machine). The plan JSON is compared with the timing field
(``solver.wall_s``) left out; an infeasible case keeps its one-line error text instead (``.err``).
The search is budgeted by deterministic work (see [Note: deterministic budget] in
partitioner/solver/search.py), so these files do not depend on how busy the machine is.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
TIMING_FIELDS = ("wall_s",)  # solver fields that measure the clock, not the plan


@dataclass(frozen=True, slots=True)
class GoldenCase:
    name: str  # file stem in tests/golden/
    argv: tuple[str, ...]  # `autopart plan` arguments (without --json)


class _SkipNet(nn.Module):
    """A DAG with skip connections: block 0's output is read again by blocks 2 and 4."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(4))
        self.out = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.inp(x)
        h = h0
        for i, layer in enumerate(self.layers):
            h = layer(h) + (h0 if i % 2 == 1 else 0)
        return self.out(h)


def skip_net():
    """``py:tests.golden.cases:skip_net``: the DAG case's model and example input."""
    torch.manual_seed(0)
    return _SkipNet(), (torch.randn(4, 64),)


_TINY = ("--cluster", "dgx-a100-80g", "--time-limit", "2")
CASES = (
    GoldenCase("chain-mlp", ("--model", "mlp", *_TINY, "--global-batch", "16")),
    GoldenCase("dag-skip", ("--model", "py:tests.golden.cases:skip_net", *_TINY, "--global-batch", "16", "--mesh", "pp=2")),
    GoldenCase("tied-gpt2-tiny", ("--model", "gpt2-tiny", *_TINY, "--global-batch", "16")),
    GoldenCase("bigvocab", ("--model", "gpt-bigvocab", "--config", "n_layer=4", "n_embd=128", "n_head=4",
                            "--seq-len", "128", *_TINY, "--global-batch", "16")),
    GoldenCase("pinned-interleaved", ("--model", "gpt2-tiny", *_TINY, "--global-batch", "16", "--mesh", "pp=2",
                                      "--schedule", "interleaved", "--virtual-stages", "2")),
    # Llama 2 7B's width with 4 layers (1.1B parameters, 17 GB of weights and Adam state) on one 16 GB V100.
    GoldenCase("infeasible", ("--model", "llama2-7b", "--config", "num_hidden_layers=4", "--seq-len", "512",
                              "--cluster", "p3-v100", "--nodes", "1", "--gpus-per-node", "1", "--global-batch", "8",
                              "--time-limit", "2")),
)


def strip_timing(plan: dict) -> dict:
    """The plan JSON without the fields that measure the clock."""
    solver = {k: v for k, v in plan["solver"].items() if k not in TIMING_FIELDS}
    return {**plan, "solver": solver}


def run_case(case: GoldenCase) -> tuple[str, str]:
    """(suffix, text): ``("json", plan JSON without timing)`` or ``("err", the error line)``."""
    from partitioner.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(["plan", *case.argv, "--json", str(out)])
        if rc != 0:
            return "err", err.getvalue().strip().splitlines()[-1] + "\n"
        return "json", json.dumps(strip_timing(json.loads(out.read_text())), indent=1, sort_keys=True) + "\n"


def regenerate() -> None:
    for case in CASES:
        suffix, text = run_case(case)
        for old in HERE.glob(f"{case.name}.*"):
            if old.suffix in (".json", ".err"):
                old.unlink()
        (HERE / f"{case.name}.{suffix}").write_text(text)
        print(f"wrote tests/golden/{case.name}.{suffix}")


if __name__ == "__main__":
    sys.exit(regenerate())
