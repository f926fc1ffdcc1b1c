"""What one measured overhead buys a fidelity run: each of its plans re-priced without it.

A fidelity run (``python -m benchmarks.fidelity``) keeps, per layout and round, the plan, the run,
the calibrated cluster and the round's profile cache. This re-prices every plan, unchanged, on its
own calibrated cluster less one ``[overheads]`` key (``autopart plan --plan ... --profile``, the
same cache), and prints its prediction's error against the same measured step with the key and
without it, and the summary the fidelity report gives (median and worst over layouts, each the
mean of its rounds). The runs are the same, so the difference is the term's alone.

    python -m benchmarks.fidelity_reprice KEEP_DIR --drop grad_accumulate_gbps

Run it where the fidelity run left its profile caches (``profile-rN.sqlite`` in KEEP_DIR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from benchmarks.fidelity import RunFailed, reprice, without_overheads


def priced_without(keep: Path, slug: str, key: str, work: Path) -> tuple[float, float, float, object]:
    """(with, without, measured) step seconds of ``slug``'s plan, and the key's value in its cluster."""
    plan = json.loads((keep / f"{slug}.plan.json").read_text())
    run = json.loads((keep / f"{slug}.run.json").read_text())
    value = plan["cluster"].get("overheads", {}).pop(key, None)  # the plan, as made for the cluster without it
    cluster = without_overheads(keep / f"calibrated-{slug}.toml", work / f"{slug}.toml", key)
    cache = keep / f"profile-{slug.rsplit('-', 1)[1]}.sqlite"
    try:
        without = reprice(plan, plan["model"]["name"], cluster, cache, work / f"{slug}.in.json",
                          work / f"{slug}.out.json", f"re-price {slug} without {key}")
    except RunFailed as exc:
        raise SystemExit(f"fidelity_reprice: {exc}") from None
    return plan["predicted"]["step_time_s"], without, statistics.fmean(run["step_times_s"]), value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("keep", type=Path, help="a fidelity run's folder (plans, runs, calibrated clusters, profile caches)")
    ap.add_argument("--drop", required=True, help="the [overheads] key to re-price without, e.g. grad_accumulate_gbps")
    args = ap.parse_args()
    slugs = sorted(p.name[: -len(".plan.json")] for p in args.keep.glob("*-r[0-9]*.plan.json") if ".bare." not in p.name)
    if not slugs:
        print(f"fidelity_reprice: no LAYOUT-rN.plan.json in {args.keep}", file=sys.stderr)
        return 2
    layouts: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for slug in slugs:
            with_, without, measured, value = priced_without(args.keep, slug, args.drop, Path(tmp))
            layouts[slug.rsplit("-", 1)[0]].append((with_, without, measured))
            print(f"{slug:40s} {args.drop} = {value}: with {with_ * 1e3:7.1f} ms ({with_ / measured - 1:+6.1%}), "
                  f"without {without * 1e3:7.1f} ms ({without / measured - 1:+6.1%}), measured {measured * 1e3:7.1f} ms",
                  flush=True)

    def summary(i: int) -> tuple[float, float]:
        errors = [abs(statistics.fmean(r[i] for r in rows) / statistics.fmean(r[2] for r in rows) - 1)
                  for rows in layouts.values()]
        return statistics.median(errors), max(errors)

    (m1, w1), (m0, w0) = summary(0), summary(1)
    print(f"{len(layouts)} layouts, each the mean of its rounds: with {args.drop}, median |error| {m1:.1%} "
          f"(worst {w1:.1%}); without it, {m0:.1%} (worst {w0:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
