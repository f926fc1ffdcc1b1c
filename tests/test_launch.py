"""autopart's own launcher (``autopart run --nproc-per-node N``): training runs, and a failed job is one line.

The line's choice is checked on failure records; real 2-rank jobs (gloo) check that a rank that
raises, a rank killed by SIGKILL and an error every rank meets each give one line, first, with no
traceback. Faults are injected by tests/fault_model.py (``AUTOPART_FAULT``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from partitioner.cli import main
from partitioner.launch import WorkerFailure, failure_line, strip_nproc

ROOT = Path(__file__).resolve().parents[1]


def stages_of(rank: int) -> str:
    return f"stage {rank}"


def test_the_primary_line_is_printed() -> None:
    failures = [
        WorkerFailure(0, 1, "autopart: error: rank 1 (stage 1) failed: ValueError: boom", primary=False),
        # It spoke, then the launcher stopped it (SIGTERM) when rank 0 ended first: still the job's line, status 1.
        WorkerFailure(1, -15, "autopart: error: rank 1 (stage 1) failed: ValueError: boom (first)", primary=True),
    ]
    assert failure_line(failures, stages_of) == ("autopart: error: rank 1 (stage 1) failed: ValueError: boom (first)", 1)
    # Only a rank that stops because of another spoke (the failing one was ended first): its line still names the cause.
    assert failure_line([failures[0], WorkerFailure(1, -15)], stages_of)[0].endswith("ValueError: boom")


def test_a_silent_failure_is_named_by_the_launcher_with_the_stage() -> None:
    killed = [WorkerFailure(0, -15), WorkerFailure(1, -9)]  # rank 0 was stopped by the launcher (SIGTERM)
    assert failure_line(killed, stages_of) == (
        "autopart: error: rank 1 (stage 1) was killed by SIGKILL (signal 9) — out of host memory?", 137)
    assert failure_line([WorkerFailure(0, 3), WorkerFailure(1, -15)], stages_of) == (
        "autopart: error: rank 0 (stage 0) exited with code 3", 3)
    assert failure_line([WorkerFailure(1, -int(signal.SIGSEGV))], None)[0] == (
        "autopart: error: rank 1 was killed by SIGSEGV (signal 11)")


def test_the_ranks_command_drops_nproc_per_node() -> None:
    assert strip_nproc(["run", "--nproc-per-node", "2", "--plan", "p.json"]) == ["run", "--plan", "p.json"]
    assert strip_nproc(["run", "--nproc-per-node=2", "--steps", "3"]) == ["run", "--steps", "3"]


# --------------------------------------------------------------------------------------
# Real jobs: 2 ranks over gloo. Each launches processes (9-19 s on a busy 2-core machine), so they are
# marked slow, as the project's multi-process tests are: `pytest -m "not slow"` leaves them out.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pp=2, 1F1B plan of tests/fault_model.py for 2 ranks: stage s on rank s."""
    path = tmp_path_factory.mktemp("launch") / "plan.json"
    rc = main(["plan", "--model", "py:fault_model:build", "--cluster", "local-cpu:2", "--mesh", "pp=2",
               "--microbatches", "2", "--global-batch", "4", "--schedule", "1f1b", "--json", str(path), "--quiet"])
    assert rc == 0
    return path


def autopart(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC") and k != "AUTOPART_FAULT"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    if fault:
        env["AUTOPART_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "partitioner", *args], env=env, capture_output=True, text=True,
                          timeout=240)


def assert_one_line(proc: subprocess.CompletedProcess, words: str) -> None:
    """stderr's first line is autopart's, holds ``words``, comes once; no traceback, rc != 0."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert lines and lines[0].startswith("autopart: error: ") and words in lines[0], proc.stderr[-3000:]
    assert sum(line.startswith("autopart: error") for line in lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_run_with_nproc_per_node_trains(fault_plan: Path) -> None:
    proc = autopart("run", "--nproc-per-node", "2", "--plan", str(fault_plan), "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout and "mean step" in proc.stdout, proc.stdout
    assert proc.stderr.strip() == "", proc.stderr[-3000:]  # no launcher noise


@pytest.mark.slow
def test_a_rank_that_raises_is_one_line(fault_plan: Path) -> None:
    # The 5th call of rank 1's fault point: its first forward of a step after the warm-up.
    proc = autopart("run", "--nproc-per-node", "2", "--plan", str(fault_plan), "--steps", "2", fault="raise:1:5")
    assert_one_line(proc, "rank 1 (stage 1) failed: ValueError: injected failure")


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_one_line_naming_its_stage(fault_plan: Path) -> None:
    proc = autopart("run", "--nproc-per-node", "2", "--plan", str(fault_plan), "--steps", "2", fault="kill:0:5")
    assert_one_line(proc, "rank 0 (stage 0) was killed by SIGKILL (signal 9)")
    assert proc.returncode == 128 + 9


@pytest.mark.slow
def test_an_error_every_rank_meets_is_one_line(fault_plan: Path) -> None:
    # The wrong model for the plan: both ranks refuse it, the launcher prints it once.
    proc = autopart("run", "--nproc-per-node", "2", "--plan", str(fault_plan), "--model", "mlp")
    assert_one_line(proc, "this plan was made for model")
    assert proc.stdout == ""


def test_a_wrong_world_size_is_refused_before_any_rank_starts(fault_plan: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["run", "--nproc-per-node", "4", "--plan", str(fault_plan)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "needs 2 ranks but --nproc-per-node 4 starts 4; pass --nproc-per-node 2" in err
