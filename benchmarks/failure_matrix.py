"""Every injected failure, on 2 gloo ranks (pp=2, 1F1B, timeout_s=5), with and without torchrun.

    PYTHONPATH=. python benchmarks/failure_matrix.py [--out benchmarks/results/DATE-failures.md]

For each of raise / exit / SIGKILL / hang, on rank 0 (stage 0, in its forward; it hosts the
job's store) and rank 1 (stage 1, in its loss), launched by hand and by ``torchrun``, it
records the seconds from the fault to the exit of each rank, the exit codes, and the first
error line (tests/test_runtime.py ``first_error_line``). tests/test_runtime.py runs six of
these cases; this script runs all sixteen (about 30 s each on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from runtime_harness import launch  # noqa: E402
from test_runtime import first_error_line  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-failures.md"))
    args = ap.parse_args()
    rows = []
    ok = True
    for torchrun in (False, True):
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
                good = all(a < 60 for a in after) and all(r["rc"] != 0 for r in reports)
                ok &= good
                rows.append(f"| {'torchrun' if torchrun else 'by hand'} | {how} | {rank} ({where}) | "
                            f"{', '.join(f'{a:.1f}' for a in after)} | {', '.join(str(r['rc']) for r in reports)} | "
                            f"{'yes' if named else 'no'} | `{line[:150]}` |")
                print(rows[-1], flush=True)
    text = "\n".join([
        f"# Injected failures ({time.strftime('%Y-%m-%d')})",
        "",
        "Command: `PYTHONPATH=. python benchmarks/failure_matrix.py` (2 ranks, gloo, pp=2, 1F1B, the test MLP, "
        "`timeout_s=5`; the fault comes in the second step).",
        "",
        "| launch | fault | rank (where) | s from fault to exit, rank 0, 1 | exit codes | first error line names rank and stage | first error line (of the surviving rank's output; under torchrun, the whole job's) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
