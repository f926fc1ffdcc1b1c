"""Every injected failure, on 2 gloo ranks (pp=2, 1F1B): by hand, under torchrun, and under autopart's launcher.

    PYTHONPATH=. python benchmarks/failure_matrix.py [--out benchmarks/results/DATE-failure-matrix.md]

For each of raise / exit / SIGKILL / hang, on rank 0 (stage 0, in its forward; it hosts the
job's store) and rank 1 (stage 1, in its loss), launched by hand and by ``torchrun``
(tests/runtime_harness.py's ``fail`` job, ``timeout_s=5``), it records the seconds from the
fault to the exit of each rank, the exit codes, and the first error line (tests/test_runtime.py
``first_error_line``). tests/test_runtime.py runs six of these cases.

The launcher mode runs the real command, ``autopart run --nproc-per-node 2`` (launch.py), on
tests/fault_model.py (``AUTOPART_FAULT``: the fault in both ranks' stage forward, in the
second step; ``autopart run``'s watchdog ``timeout_s`` is 20 s), and records besides whether
stderr's first line is the error line and whether that line comes once. About 30 s a case on a
busy 2-core machine (24 cases).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from runtime_harness import launch  # noqa: E402
from test_runtime import first_error_line  # noqa: E402


HEADER = ("| launch | fault | rank (where) | s from fault to exit, rank 0, 1 | exit codes | first error line names rank "
          "and stage | first error line (of the surviving rank's output; under a launcher, the whole job's) |")


def harness_rows(torchrun: bool) -> tuple[list[str], bool]:
    """The 8 cases of tests/runtime_harness.py's ``fail`` job, by hand or under torchrun."""
    rows, ok = [], True
    for how in ("raise", "exit", "kill", "hang"):
        for rank, where in ((1, "loss"), (0, "forward")):
            tmp = Path(tempfile.mkdtemp(prefix="autopart-failure-"))
            fault = tmp / "fault"
            reports = launch(2, "fail", {"fail_rank": rank, "how": how, "where": where, "timeout_s": 5.0,
                                         "fault_file": str(fault), "layout": dict(pp=2, microbatches=2, global_batch=2)},
                             tmp, timeout_s=180, torchrun=torchrun)
            t = float(fault.read_text()) if fault.exists() else float("nan")
            after = [r["ended_at"] - t for r in reports]
            survivor = reports[1 - rank]
            line = first_error_line(survivor["stderr"])
            named = f"rank {rank} (stage {rank})" in line
            # under torchrun every rank's output is one stream: autopart's line comes once (torchrun's summary,
            # indented, quotes it again)
            once = sum(x.startswith("autopart: error") for x in survivor["stderr"].splitlines()) == 1
            ok &= all(a < 60 for a in after) and all(r["rc"] != 0 for r in reports) and (once or not torchrun)
            if torchrun and not once:
                line += " (autopart's line comes more than once)"
            rows.append(f"| {'torchrun' if torchrun else 'by hand'} | {how} | {rank} ({where}) | "
                        f"{', '.join(f'{a:.1f}' for a in after)} | {', '.join(str(r['rc']) for r in reports)} | "
                        f"{'yes' if named else 'no'} | `{line[:150]}` |")
            print(rows[-1], flush=True)
    return rows, ok


def launcher_rows() -> tuple[list[str], list[str], bool]:
    """The 8 cases under ``autopart run --nproc-per-node 2`` (table rows, summary rows, all good)."""
    tmp = Path(tempfile.mkdtemp(prefix="autopart-launcher-"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "AUTOPART_FAULT", "AUTOPART_FAULT_FILE") and not k.startswith("TORCHELASTIC")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    plan = tmp / "plan.json"
    subprocess.run([sys.executable, "-m", "partitioner", "plan", "--model", "py:fault_model:build", "--cluster",
                    "local-cpu:2", "--mesh", "pp=2", "--microbatches", "2", "--global-batch", "4", "--schedule", "1f1b",
                    "--json", str(plan), "--quiet"], env=env, check=True, capture_output=True)
    rows, checks, ok = [], [], True
    for how in ("raise", "exit", "kill", "hang"):
        for rank in (1, 0):
            fault = tmp / f"fault-{how}-{rank}"
            # Each rank's stage has 2 fault points and each step 2 micro-batches: the 5th call is in the second step.
            case_env = dict(env, AUTOPART_FAULT=f"{how}:{rank}:5", AUTOPART_FAULT_FILE=str(fault))
            proc = subprocess.run([sys.executable, "-m", "partitioner", "run", "--nproc-per-node", "2", "--plan", str(plan),
                                   "--steps", "3"], env=case_env, capture_output=True, text=True, timeout=300)
            ended = time.time()
            after = ended - float(fault.read_text()) if fault.exists() else float("nan")
            lines = proc.stderr.strip().splitlines()
            line = first_error_line(proc.stderr)
            named = f"rank {rank} (stage {rank})" in line
            first = bool(lines) and lines[0] == line
            once = sum(x.startswith("autopart: error") for x in lines) == 1
            clean = "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
            good = after < 60 and proc.returncode != 0 and named and first and once and clean
            ok &= good
            rows.append(f"| autopart run --nproc-per-node 2 | {how} | {rank} (forward) | {after:.1f}, {after:.1f} | "
                        f"{proc.returncode} | {'yes' if named else 'no'} | `{line[:150]}` |")
            checks.append(f"| {how} | {rank} | {'yes' if first else 'no'} | {'yes' if once else 'no'} | "
                          f"{'yes' if clean else 'no'} | {len(lines)} | {'yes' if good else 'NO'} |")
            print(rows[-1], checks[-1], flush=True)
    return rows, checks, ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-failure-matrix.md"))
    args = ap.parse_args()
    rows: list[str] = []
    ok = True
    for torchrun in (False, True):
        more, good = harness_rows(torchrun)
        rows += more
        ok &= good
    more, checks, good = launcher_rows()
    rows += more
    ok &= good
    named = sum(r.split(" | ")[5] == "yes" for r in rows)
    torchrun_rows = sum(r.startswith("| torchrun |") for r in rows)
    torchrun_once = sum(r.startswith("| torchrun |") and "comes more than once" not in r for r in rows)
    text = "\n".join([
        f"# Injected failures ({time.strftime('%Y-%m-%d')})",
        "",
        "Command: `PYTHONPATH=. python benchmarks/failure_matrix.py` (2 ranks, gloo, pp=2, 1F1B). By hand and under "
        "torchrun: the test MLP of tests/runtime_harness.py, `timeout_s=5`, the fault in the second step. Under "
        "autopart's launcher: `autopart run --nproc-per-node 2 --plan plan.json --steps 3` on tests/fault_model.py, "
        "the fault in the second step, `timeout_s=20` (autopart run's).",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"The first error line names the failing rank and its stage in {named} of {len(rows)} cases. Under "
        f"torchrun (every rank's output one stream) autopart's line comes once in {torchrun_once} of "
        f"{torchrun_rows} cases.",
        "",
        "Under autopart's launcher (the launcher's exit is the job's: every rank has ended by then):",
        "",
        "| fault | rank | stderr's first line is the error line | once | no Traceback / ChildFailedError | stderr lines | all good |",
        "|---|---|---|---|---|---|---|",
        *checks,
        "",
    ])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
