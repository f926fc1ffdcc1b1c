"""A fidelity run's plans priced again by this checkout: what a change of the model, or one measured
overhead, does to its errors against the same runs.

A fidelity run (``python -m benchmarks.fidelity``) keeps, per layout and round, the plan, the run,
the calibrated cluster and the round's profile cache. This re-prices every plan, unchanged, on its
own calibrated cluster (``autopart plan --plan ... --profile``, the same cache), with this checkout's
cost and memory models, and with ``--drop KEY`` without that one ``[overheads]`` key. It prints,
per plan, the step time and each rank's peak memory as recorded, as re-priced and as measured, and
the summaries the fidelity report gives (step time: median and worst over layouts, each the mean of
its rounds; memory: over every rank of every run). The runs are the same, so the difference is the
model's alone.

    python -m benchmarks.fidelity_reprice KEEP_DIR                          # this checkout's models
    python -m benchmarks.fidelity_reprice KEEP_DIR --drop grad_accumulate_gbps
    python -m benchmarks.fidelity_reprice KEEP_DIR --cores 2   # runs calibrated before oversubscribed existed
    python -m benchmarks.fidelity_reprice KEEP_DIR --set p2p_tensor_us=250  # a figure measured after the run

``--cores N`` writes ``oversubscribed = max(1, ranks / N)`` into each calibrated cluster that lacks it, as
``autopart calibrate`` now measures it on a machine of N cores ([Note: ranks sharing cores] in
partitioner/evaluate.py).

Run it where the fidelity run left its profile caches (``profile-rN.sqlite`` in KEEP_DIR).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fidelity import RunFailed, reprice, without_overheads


@dataclass(frozen=True)
class Repriced:
    """One plan of a fidelity run: its recorded and re-priced predictions beside what its run measured."""

    slug: str
    recorded_s: float
    repriced_s: float
    measured_s: float
    # per rank: (recorded predicted peak, re-priced predicted peak, measured peak), bytes
    memory: tuple[tuple[int, int, int], ...]


def with_cores(cluster: Path, plan: dict, cores: int) -> None:
    """Write ``oversubscribed = max(1, ranks / cores)`` into the cluster file ``cluster`` if it lacks the key,
    and into the cluster ``plan`` records (a plan is priced on the cluster it was made for)."""
    import tomllib

    import tomli_w

    data = tomllib.loads(cluster.read_text())
    table = data.setdefault("overheads", {})
    if "oversubscribed" not in table:
        table["oversubscribed"] = round(min(max(1.0, data["devices_per_node"] / cores), table.get("compute_slowdown", 1.0)), 3)
        cluster.write_text(tomli_w.dumps(data))
        if table["oversubscribed"] != 1.0:
            plan["cluster"].setdefault("overheads", {})["oversubscribed"] = table["oversubscribed"]


def with_keys(cluster: Path, plan: dict, keys: dict[str, float]) -> None:
    """Write each of ``keys`` (``[overheads]`` keys in file units) into the cluster file ``cluster`` where it lacks
    it, and into the cluster ``plan`` records: figures measured after the run was calibrated."""
    import tomllib

    import tomli_w

    data = tomllib.loads(cluster.read_text())
    table = data.setdefault("overheads", {})
    added = {k: v for k, v in keys.items() if k not in table}
    if added:
        table.update(added)
        cluster.write_text(tomli_w.dumps(data))
        plan["cluster"].setdefault("overheads", {}).update(added)


def calibration_of(keep: Path, slug: str, plan: dict) -> Path:
    """The calibrated cluster ``slug``'s plan was made on: the layout's own (``--calibrate-each``), else its
    round's for the plan's world size ([Note: calibrating once a round] in benchmarks/fidelity.py)."""
    own = keep / f"calibrated-{slug}.toml"
    if own.exists():
        return own
    mesh = plan["mesh"]
    round_ = keep / f"calibrated-{mesh['pp'] * mesh['tp'] * mesh['dp']}-{slug.rsplit('-', 1)[1]}.toml"
    if not round_.exists():
        raise SystemExit(f"fidelity_reprice: {keep} holds neither {own.name} nor {round_.name}, the calibrations "
                         f"{slug} could have been planned on")
    return round_


def priced_again(keep: Path, slug: str, key: str | None, work: Path, cores: int | None = None,
                 keys: dict[str, float] | None = None) -> Repriced:
    """``slug``'s plan priced by this checkout on its calibrated cluster (less ``key``; with ``oversubscribed``
    for ``cores`` cores where it lacks one), and its run."""
    plan = json.loads((keep / f"{slug}.plan.json").read_text())
    run = json.loads((keep / f"{slug}.run.json").read_text())
    if key is not None:
        plan["cluster"].get("overheads", {}).pop(key, None)  # the plan, as made for the cluster without it
    calibrated, cluster = calibration_of(keep, slug, plan), work / f"{slug}.toml"
    if key is None:
        shutil.copy(calibrated, cluster)
    else:
        without_overheads(calibrated, cluster, key)
    if cores is not None:
        with_cores(cluster, plan, cores)
    if keys:
        with_keys(cluster, plan, keys)
    # a copy: a block the recorded cache lacks (a key this checkout computes otherwise) is measured into the
    # copy, never into the recorded run's cache
    cache = work / f"profile-{slug.rsplit('-', 1)[1]}.sqlite"
    if not cache.exists():
        shutil.copy(keep / cache.name, cache)
    what = f"re-price {slug}" + (f" without {key}" if key else "")
    try:
        step = reprice(plan, plan["model"]["name"], cluster, cache, work / f"{slug}.in.json",
                       work / f"{slug}.out.json", what)
    except RunFailed as exc:
        raise SystemExit(f"fidelity_reprice: {exc}") from None
    stages = json.loads((work / f"{slug}.out.json").read_text())["stages"]
    memory = tuple((m["predicted_peak_bytes"], max(stages[s]["predicted"]["memory_bytes"] for s in m["stages"]),
                    m["peak_bytes"]) for m in run["memory"])
    return Repriced(slug, plan["predicted"]["step_time_s"], step, statistics.fmean(run["step_times_s"]), memory)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("keep", type=Path, help="a fidelity run's folder (plans, runs, calibrated clusters, profile caches)")
    ap.add_argument("--drop", help="an [overheads] key to re-price without, e.g. grad_accumulate_gbps")
    ap.add_argument("--cores", type=int, help="the cores of the machine the runs ran on, for clusters calibrated "
                    "before `oversubscribed` was measured")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an [overheads] key (file units) to give every calibrated cluster that lacks it, e.g. "
                         "p2p_tensor_us=250 (repeatable): a figure measured after the run")
    args = ap.parse_args()
    from cost_models.overheads import OVERHEAD_FILE_KEYS

    keys: dict[str, float] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            keys[key] = float(value)
        except ValueError:
            ap.error(f"--set {item!r}: give KEY=NUMBER")
        if key not in OVERHEAD_FILE_KEYS:
            ap.error(f"--set {item!r}: {key} is not an [overheads] key")
    slugs = sorted(p.name[: -len(".plan.json")] for p in args.keep.glob("*-r[0-9]*.plan.json") if ".bare." not in p.name)
    if not slugs:
        print(f"fidelity_reprice: no LAYOUT-rN.plan.json in {args.keep}", file=sys.stderr)
        return 2
    again = "without " + args.drop if args.drop else "re-priced" + (f" with {', '.join(args.set)}" if args.set else "")
    layouts: dict[str, list[Repriced]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for slug in slugs:
            r = priced_again(args.keep, slug, args.drop, Path(tmp), args.cores, keys)
            layouts[slug.rsplit("-", 1)[0]].append(r)
            ranks = " ".join(f"r{i} {old / m - 1:+.1%}->{new / m - 1:+.1%}" for i, (old, new, m) in enumerate(r.memory))
            print(f"{slug:38s} step: recorded {r.recorded_s / r.measured_s - 1:+6.1%}, {again} "
                  f"{r.repriced_s / r.measured_s - 1:+6.1%} (measured {r.measured_s * 1e3:.1f} ms); memory: {ranks}",
                  flush=True)

    def step(attr: str) -> tuple[float, float]:
        errors = [abs(statistics.fmean(getattr(r, attr) for r in runs) / statistics.fmean(r.measured_s for r in runs) - 1)
                  for runs in layouts.values()]
        return statistics.median(errors), max(errors)

    def memory(i: int) -> tuple[float, float]:
        errors = [abs(m[i] / m[2] - 1) for runs in layouts.values() for r in runs for m in r.memory]
        return statistics.median(errors), max(errors)

    (s1, sw1), (s0, sw0) = step("recorded_s"), step("repriced_s")
    (m1, mw1), (m0, mw0) = memory(0), memory(1)
    ranks = sum(len(r.memory) for runs in layouts.values() for r in runs)
    print(f"step time over {len(layouts)} layouts, each the mean of its rounds: recorded median |error| {s1:.1%} "
          f"(worst {sw1:.1%}); {again} {s0:.1%} (worst {sw0:.1%})")
    print(f"peak memory over {ranks} ranks: recorded median |error| {m1:.1%} (worst {mw1:.1%}); "
          f"{again} {m0:.1%} (worst {mw0:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
