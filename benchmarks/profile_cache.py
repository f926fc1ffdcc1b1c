"""Profiling time of ``autopart plan --profile``, cold and with a warm cache (target: warm < 2 s for gpt2).

Runs ``autopart plan --model gpt2 --cluster local-cpu --profile`` twice against a fresh cache
in a temporary directory and reports the profiling time each run printed (the ``profiled on``
line) and the command's whole wall time (capture and planning included).

    python -m benchmarks.profile_cache [--model gpt2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE = re.compile(r"profiled on (.*): (\d+) measured, (\d+) from the cache.* in ([0-9.]+) s")


def run(model: str, cache: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "partitioner.cli", "plan", "--model", model, "--cluster", "local-cpu", "--profile",
           "--cache", str(cache), "--time-limit", "10", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"profile_cache: `{' '.join(cmd)}` failed:\n{proc.stderr}")
    m = LINE.search(proc.stdout)
    if m is None:
        raise SystemExit(f"profile_cache: no 'profiled on' line in:\n{proc.stdout}")
    return dict(device=m.group(1), measured=int(m.group(2)), cached=int(m.group(3)), profiling_s=float(m.group(4)),
                command_wall_s=wall, command=" ".join(cmd[1:]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--json", default=None)
    args, extra = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "profile.sqlite"
        cold = run(args.model, cache, extra)
        warm = run(args.model, cache, extra)
    for label, r in (("cold", cold), ("warm", warm)):
        print(f"{label}: {r['measured']:4d} measured, {r['cached']:4d} from the cache, profiling {r['profiling_s']:7.2f} s, "
              f"whole command {r['command_wall_s']:6.1f} s")
    print(f"device: {cold['device']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, cold=cold, warm=warm), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
