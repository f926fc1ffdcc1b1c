"""Predicted vs measured: step time and per-rank peak memory of many layouts on this CPU (issue 12).

For each layout: calibrate the cluster once per world size (``autopart calibrate`` under
torchrun, the documented path for links and device rates), plan the model with measured costs
(``autopart plan --profile --cluster calibrated.toml`` with the layout's axes, schedule and
recomputation pinned), run the plan (``autopart run --json``, which measures each rank's memory
by category and the step's time components, see partitioner/measure.py), and set the plan's
predictions against the measurements: the step time (the mean of the timed steps) and every
rank's peak memory. Prints the table and the summary (median and worst absolute error) and,
with ``--report``, writes it as markdown with the command, and keeps every plan and run record
beside it so that ``autopart explain --measured RUN.json`` can show where each one is wrong.

    python -m benchmarks.fidelity [--report benchmarks/results/YYYY-MM-DD-fidelity.md] [--steps 10] [--min-seconds 2]
        [--warmup 2] [--only TEXT] [--no-calibrate] [--calibrate-each] [--calibration-tries 3] [--rounds 1]
        [--also-without-overheads] [--cache PATH] [--force] [--memory-only] [--profile] [--record-margin]
        [--record-step-error]

Every calibration and run is metered for the machine's other load ([Note: other load] in
partitioner/hostload.py: the share of its CPUs that went to processes not ours, or to the hypervisor).
A calibration that saw more than 10% is taken again, up to ``--calibration-tries`` times, keeping the
quietest; a run is never taken again: the table shows each one's load, and where a run was not quiet,
the summary adds the figures over the quiet runs beside the figures over all.

A quiet machine's speed still moves between minutes: with no other load, calibrate's compute slowdown
(CPU time) read 1.04-1.35 before different layouts of one run, and the same plan of gpt2-tiny pp2 1f1b
measured 51-76 ms in five runs. ``--rounds R`` calibrates, profiles (a cache a round), plans and runs
every layout R times (all layouts, then all again) and sets each layout's mean prediction against its mean measured step; every
single run's error is reported beside it, and in the summary.

[Note: the rounds' standard error]
A layout's error over R rounds is its mean prediction over its mean measured step; its rounds' own
errors scatter (the machine moves between minutes: [Note: calibrating once a round]), and their sample
standard deviation over sqrt(R) is the standard error of that mean, shown beside it (``±``). An error
further from 0 than twice its standard error is more than the scatter explains: the model is off
there, and the table and the summary name those layouts ("beyond 2 se"). An error within it may
still be a bias the rounds were too few to show. In fidelity-session29 (6 rounds, calibrated once a
round) the standard errors were 2.3-7.1% (median 4.8%) and 7 of 17 layouts lay beyond twice theirs,
6 of them under-predicted; its worst, gpt2-tiny pp2 x dp2 ZeRO-1 at -21.1% ± 3.4%, read 20.9% over
rounds 1-3 and 21.2% over rounds 4-6: a bias of the model, which more rounds do not shrink.

[Note: calibrating once a round]
A round calibrates once per world size, as a user calibrates a machine once and plans every layout
with that file; ``--calibrate-each`` calibrates again right before each layout instead. The latter
was meant to follow the machine's speed into each prediction, and it does not: over the recorded runs
of fidelity sessions 20-28 (7 runs of 3 rounds, 345 layout runs), a layout's measured compute over its
predicted compute (forward and backward, summed over ranks) scattered as widely when the profile had
been measured seconds before the run (the round's first layout of a model: sd 0.23 in log, 63 runs) as
when it was minutes old (the later layouts: 0.13-0.21), and in sessions 26-28 the drift of calibrate's GEMM rate between a
round's first calibration of a model and a layout's own did not correlate with that layout's error
(correlation 0.04, -0.19, -0.04). What the machine does in the minute of a run is not seen a minute
before; only more runs, at more moments, average it out. A calibration a layout costs about 40 s, more
than half of a round's time: session28's 3 rounds calibrated per layout took 3217 s, session29's 6
rounds calibrated once a round 2634 s.

``--memory-only`` measures peak memory alone, which does not depend on the machine's load: each
layout is planned on the ``local-cpu:N`` preset without profiling and run for one step after one
warm-up (the meter watches the first step and a steady one). ``--memory-only --profile`` measures
the memory of the plans the time figures use: each layout is planned as the full benchmark plans
it (``--profile`` on the cluster ``autopart calibrate`` measured, once per world size, or on
``local-cpu:N`` with ``--no-calibrate``) and run for one step after one warm-up.
``--record-margin`` writes the worst excess of a measured peak over its prediction into
``cost_models/memory_margin.json``, with this command and the report, as the memory margin every
plan adds to its predicted peak (item 5 of issue 12; cost_models/memory.py, ``recorded_margin``).
``--record-step-error`` writes the step time's median, worst and signed range of errors over the
layouts into ``cost_models/step_error.json``, with this command, the device and the report, which
``autopart explain`` states under every plan's step time ([Note: the recorded step-time error] in
cost_models/step_error.py).

Nothing here is tuned: the predictions are what the planner writes into the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from cost_models.memory import MARGIN_FILE
from cost_models.step_error import STEP_ERROR_FILE, RecordedStepError
from partitioner.hostload import OTHER_LOAD_WARN, LoadMeter, OtherLoad, own_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Layout:
    """One plan to predict and run: a model and the plan flags that pin its layout."""

    name: str
    model: str
    world: int  # ranks (local-cpu:N)
    flags: tuple[str, ...]  # autopart plan flags: --mesh, --schedule, --microbatches, --recompute, --zero1 ...


def _layout(name: str, model: str, world: int, mesh: str, schedule: str = "1f1b", mb: int = 4,
            *extra: str) -> Layout:
    flags = ("--mesh", mesh, "--schedule", schedule, "--microbatches", str(mb), "--global-batch", "8", *extra)
    if "--recompute" not in extra:
        flags += ("--no-recompute",)
    return Layout(name, model, world, flags)


LAYOUTS = (
    _layout("gpt2-tiny pp2 1f1b", "gpt2-tiny", 2, "pp=2,tp=1,dp=1", "1f1b"),
    _layout("gpt2-tiny pp2 gpipe", "gpt2-tiny", 2, "pp=2,tp=1,dp=1", "gpipe"),
    _layout("gpt2-tiny pp2 interleaved v2", "gpt2-tiny", 2, "pp=2,tp=1,dp=1", "interleaved", 4, "--virtual-stages", "2"),
    _layout("gpt2-tiny pp2 1f1b recompute", "gpt2-tiny", 2, "pp=2,tp=1,dp=1", "1f1b", 4, "--recompute"),
    # a split backward (I and W), with stages between the first and the last ([Note: zero-bubble memory])
    _layout("gpt2-tiny pp2 zb v2", "gpt2-tiny", 2, "pp=2,tp=1,dp=1", "zb", 4, "--virtual-stages", "2"),
    # the head and the loss in two vocabulary chunks, one a stage ([Note: vocabulary chunks] in vocab_split.py)
    _layout("gpt2-tiny pp2 1f1b vocab2", "gpt2-tiny", 2, "pp=2,tp=1,dp=1", "1f1b", 4, "--vocab-chunks", "2",
            "--split-at", "lm_head.vocab1"),
    _layout("gpt2-tiny dp2", "gpt2-tiny", 2, "pp=1,tp=1,dp=2", "1f1b", 4),
    _layout("gpt2-tiny tp2", "gpt2-tiny", 2, "pp=1,tp=2,dp=1", "1f1b", 4),
    _layout("gpt2-tiny pp2 dp2 zero1", "gpt2-tiny", 4, "pp=2,tp=1,dp=2", "1f1b", 4, "--zero1"),
    _layout("llama-tiny pp2 1f1b", "llama-tiny", 2, "pp=2,tp=1,dp=1", "1f1b"),
    _layout("llama-tiny dp2 zero1", "llama-tiny", 2, "pp=1,tp=1,dp=2", "1f1b", 4, "--zero1"),
    # FSDP pinned: --zero1 is only the least the search shards, and on a calibrated CPU it keeps ZeRO-1.
    _layout("llama-tiny dp2 zero3", "llama-tiny", 2, "pp=1,tp=1,dp=2", "1f1b", 4, "--dp-sharding", "zero3"),
    _layout("llama-tiny pp4 1f1b", "llama-tiny", 4, "pp=4,tp=1,dp=1", "1f1b"),
    _layout("llama-tiny tp2", "llama-tiny", 2, "pp=1,tp=2,dp=1", "1f1b", 4),
    _layout("mlp pp2 gpipe", "mlp", 2, "pp=2,tp=1,dp=1", "gpipe"),
    _layout("mlp dp2", "mlp", 2, "pp=1,tp=1,dp=2", "1f1b", 4),
    _layout("mlp pp2 interleaved recompute", "mlp", 2, "pp=2,tp=1,dp=1", "interleaved", 4, "--virtual-stages", "2",
            "--recompute"),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One layout's predicted and measured figures."""

    layout: str
    predicted_step_s: float
    measured_step_s: float  # the mean of the timed steps
    step_spread: float  # (max - min) / mean of the timed steps
    memory: tuple[tuple[int, int, int], ...]  # (rank, predicted peak bytes, measured peak bytes)
    largest_residual: str  # explain --measured's line for time
    reserve: float  # the plan's training.memory_reserve
    memory_residual: str = ""  # explain --measured's line for memory
    # the same plan priced on the same cluster without its [overheads] (the time model without the
    # measured software overheads, cost_models/overheads.py); None unless asked for
    predicted_bare_s: float | None = None
    # what the plan shards over dp when it is more than the layout asked for (``--zero1`` is the least the
    # search may shard: on some clusters it picks zero2), else ""
    dp_sharding: str = ""
    steps: int = 0  # how many steps were timed
    # the machine's other load ([Note: other load] in partitioner/hostload.py) during the run and during the
    # calibration the plan was priced on; None where not metered
    run_load: float | None = None
    calibration_load: float | None = None
    round_errors: tuple[float, ...] = ()  # each round's error where the figures are the mean of rounds (--rounds)
    # every round's ``memory`` where there are several (its plan may differ: each round is calibrated anew);
    # the summary's memory figures and the margin read them all
    round_memory: tuple[tuple[tuple[int, int, int], ...], ...] = ()

    @property
    def name(self) -> str:
        """The layout's name, with the sharding level the plan chose where it is not the one asked for."""
        return f"{self.layout} (planned {self.dp_sharding})" if self.dp_sharding else self.layout

    @property
    def step_error(self) -> float:
        return self.predicted_step_s / self.measured_step_s - 1.0

    @property
    def round_error_se(self) -> float | None:
        """The standard error of the rounds' mean error (their sample standard deviation over the square
        root of their count), or None with fewer than two rounds ([Note: the rounds' standard error])."""
        n = len(self.round_errors)
        return statistics.stdev(self.round_errors) / math.sqrt(n) if n >= 2 else None

    @property
    def biased(self) -> bool:
        """The error is further from 0 than twice its standard error: more than the rounds' scatter explains."""
        se = self.round_error_se
        return se is not None and abs(self.step_error) > 2 * se

    @property
    def memory_errors(self) -> list[float]:
        """Each rank's predicted / measured peak - 1, of every round."""
        return [p / m - 1.0 for _, p, m in self.all_memory]

    @property
    def all_memory(self) -> tuple[tuple[int, int, int], ...]:
        """(rank, predicted, measured peak) of every rank of every round."""
        return tuple(r for rnd in (self.round_memory or (self.memory,)) for r in rnd)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="400")  # explain's lines unwrapped
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


class RunFailed(Exception):
    """A command of one layout failed; the benchmark records it and goes on."""


def _run(cmd: Sequence[str], what: str, timeout_s: float = 900) -> str:
    return run_metered(cmd, what, timeout_s)[0]


def run_metered(cmd: Sequence[str], what: str, timeout_s: float = 900,
                 log: Path | None = None) -> tuple[str, OtherLoad | None]:
    """``_run``, and the machine's other load while it ran ([Note: other load] in partitioner/hostload.py):
    the command's processes, waited for, are this process's children. A failing command's whole output
    goes to ``log`` (where given), so that its cause is kept beside the line the report shows."""
    meter, own0 = LoadMeter(), own_cpu_seconds(children=True) + own_cpu_seconds()
    proc = subprocess.run(list(cmd), env=_env(), capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    load = meter.stop(own_cpu_seconds(children=True) + own_cpu_seconds() - own0)
    if proc.returncode != 0:
        text = (proc.stderr or proc.stdout).strip().splitlines()
        # the cause: autopart's own one line, a signal, else the last exception message that is not torchrun's
        # own wrapper (ChildFailedError), which only says that a rank failed
        causes = [l for l in text if re.match(r"(\[rank\d+\]:)?\s*[\w.]*(Error|Exception): ", l) and "ChildFailedError" not in l]
        first = next((l for l in text if "autopart: error" in l or "Signal" in l), None) or (
            causes[-1] if causes else text[-1] if text else "")
        kept = ""
        if log is not None:
            log.write_text(f"$ {' '.join(cmd)}\nrc {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
            kept = f" (output in {log.name})"
        raise RunFailed(f"{what} failed (rc {proc.returncode}): {first.strip()[:200]}{kept}")
    return proc.stdout, load


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


@dataclass(frozen=True, slots=True)
class Calibration:
    """A calibrated cluster file, the machine's other load while it was measured, and how many tries it took."""

    path: Path
    load: float | None  # OtherLoad.fraction; None where the machine cannot be metered
    tries: int


def calibrate(world: int, out: Path, tries: int = 1) -> Calibration:  # a failure here ends the benchmark
    """``autopart calibrate`` on ``world`` ranks into ``out``; while the machine's other load is above
    hostload.OTHER_LOAD_WARN, again, up to ``tries`` times, keeping the quietest ([Note: other load])."""
    kept: tuple[OtherLoad | None, Path] | None = None
    done = 0
    while done < tries:
        done += 1
        path = out.with_name(f"{out.stem}.try{done}{out.suffix}")
        path.unlink(missing_ok=True)  # a file of an earlier run of this benchmark (--force) is replaced
        _, load = run_metered([*_torchrun(world), "-m", "partitioner", "calibrate", "--out", str(path)],
                               f"calibrate on {world} ranks")
        if kept is None or (load is not None and kept[0] is not None and load.fraction < kept[0].fraction):
            kept = (load, path)
        if load is None or load.quiet:
            break
    assert kept is not None
    out.unlink(missing_ok=True)
    kept[1].replace(out)
    for stale in out.parent.glob(f"{out.stem}.try*{out.suffix}"):
        stale.unlink()
    return Calibration(out, kept[0].fraction if kept[0] is not None else None, done)


def without_overheads(cluster: str | Path, out: Path, key: str | None = None) -> Path:
    """A copy of the cluster file ``cluster`` without its ``[overheads]`` table, or only without that
    table's ``key``."""
    import tomllib

    import tomli_w

    data = tomllib.loads(Path(cluster).read_text())
    if key is None:
        data.pop("overheads", None)
    else:
        data.get("overheads", {}).pop(key, None)
    out.write_text(tomli_w.dumps(data))
    return out


def reprice(made: dict, model: str, cluster: Path, cache: Path, plan_in: Path, plan_out: Path, what: str) -> float:
    """The predicted step of the plan ``made`` priced again, unchanged, on ``cluster`` (``autopart plan
    --plan ... --profile`` from the profile cache ``cache``); ``plan_in`` and ``plan_out`` are written."""
    plan_in.write_text(json.dumps(made, indent=1))
    plan_out.unlink(missing_ok=True)
    _run([sys.executable, "-m", "partitioner", "plan", "--plan", str(plan_in), "--model", model, "--cluster",
          str(cluster), "--profile", "--cache", str(cache), "--quiet", "--json", str(plan_out)], what)
    return json.loads(plan_out.read_text())["predicted"]["step_time_s"]


MAX_STEPS = 400  # the most steps --min-seconds asks for (a step predicted far too short must not run for ever)


def measure(layout: Layout, cluster: str, cache: Path, keep: Path, steps: int, warmup: int,
            profile: bool = True, bare: bool = False, min_seconds: float = 0.0, tag: str = "") -> Outcome:
    slug = layout.name.replace(" ", "-") + tag
    plan_path, run_path = keep / f"{slug}.plan.json", keep / f"{slug}.run.json"
    for p in (plan_path, run_path):
        p.unlink(missing_ok=True)
    priced = ["--profile", "--cache", str(cache)] if profile else []
    _run([sys.executable, "-m", "partitioner", "plan", "--model", layout.model, "--cluster", cluster, *priced,
          "--time-limit", "10", "--quiet", *layout.flags, "--json", str(plan_path)],
         f"plan {layout.name}")
    # A short step is timed over more steps: at least min_seconds of them, as predicted (a 10 ms step timed
    # 10 times is mostly the machine's jitter).
    predicted = json.loads(plan_path.read_text())["predicted"]["step_time_s"]
    if min_seconds > 0 and predicted > 0:
        steps = max(steps, min(MAX_STEPS, math.ceil(min_seconds / predicted)))
    _, run_load = run_metered([*_torchrun(layout.world), "-m", "partitioner", "run", "--plan", str(plan_path),
                                "--steps", str(steps), "--warmup", str(warmup), "--json", str(run_path)],
                               f"run {layout.name}", log=run_path.with_suffix(".failed.txt"))
    run = json.loads(run_path.read_text())
    plan = run["plan_data"]
    times = run["step_times_s"]
    mean = statistics.fmean(times)
    explain = _run([sys.executable, "-m", "partitioner", "explain", "--measured", str(run_path)], f"explain {layout.name}")
    line = next((l for l in explain.splitlines() if l.startswith("largest time residual:")), "")
    mem_line = next((l for l in explain.splitlines() if l.startswith("largest memory residual:")), "")
    predicted_bare = None
    if bare and Path(cluster).is_file():  # the same plan, re-priced without the measured overheads
        made = json.loads(plan_path.read_text())
        made["cluster"].pop("overheads", None)  # the plan, as made for the cluster without the table
        predicted_bare = reprice(made, layout.model, without_overheads(cluster, keep / f"{slug}.bare.toml"), cache,
                                 keep / f"{slug}.bare.in.json", keep / f"{slug}.bare.plan.json",
                                 f"re-price {layout.name} without overheads")
    return Outcome(
        layout=layout.name,
        predicted_step_s=plan["predicted"]["step_time_s"],
        measured_step_s=mean,
        step_spread=(max(times) - min(times)) / mean,
        steps=len(times),
        memory=tuple((m["rank"], m["predicted_peak_bytes"], m["peak_bytes"]) for m in run["memory"]),
        largest_residual=line.removeprefix("largest time residual: "),
        reserve=plan["training"]["memory_reserve"],
        memory_residual=mem_line.removeprefix("largest memory residual: "),
        predicted_bare_s=predicted_bare,
        dp_sharding=more_sharded(layout, plan),
        run_load=run_load.fraction if run_load is not None else None,
    )


def more_sharded(layout: Layout, plan: dict) -> str:
    """The plan's ``training.dp_sharding`` where it differs from the level the layout's flags ask for."""
    flags = layout.flags
    asked = (flags[flags.index("--dp-sharding") + 1] if "--dp-sharding" in flags
             else "zero1" if "--zero1" in flags else "none")
    chose = plan["training"].get("dp_sharding", asked)
    return chose if chose != asked and plan["mesh"]["dp"] > 1 else ""


def combine(rounds: Sequence[Outcome]) -> Outcome:
    """One layout over its rounds: the mean prediction against the mean measured step (each round calibrated,
    planned and run anew, so both sides are samples of a machine whose speed moves between minutes); memory,
    residuals and loads from the first round, the loads at their most, and every round's memory for the
    summary and the margin (a round's plan can differ, and with it its memory). One round is itself."""
    if len(rounds) == 1:
        return rounds[0]
    first = rounds[0]
    most = lambda xs: max(xs) if xs else None  # noqa: E731
    bare = [o.predicted_bare_s for o in rounds if o.predicted_bare_s is not None]
    return replace(
        first,
        predicted_step_s=statistics.fmean(o.predicted_step_s for o in rounds),
        measured_step_s=statistics.fmean(o.measured_step_s for o in rounds),
        predicted_bare_s=statistics.fmean(bare) if len(bare) == len(rounds) else None,
        step_spread=max(o.step_spread for o in rounds),
        steps=sum(o.steps for o in rounds),
        run_load=most([o.run_load for o in rounds if o.run_load is not None]),
        calibration_load=most([o.calibration_load for o in rounds if o.calibration_load is not None]),
        round_errors=tuple(o.step_error for o in rounds),
        round_memory=tuple(o.memory for o in rounds),
    )


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    step = [abs(o.step_error) for o in outcomes]
    bare = [abs(o.predicted_bare_s / o.measured_step_s - 1.0) for o in outcomes if o.predicted_bare_s is not None]
    mem = [abs(e) for o in outcomes for e in o.memory_errors]
    # The margin (explain.MemoryMargin): how far a measured peak went past its prediction, at worst.
    excess = max(m / p - 1.0 for o in outcomes for _, p, m in o.all_memory)
    reserve = max(o.reserve for o in outcomes)
    # the layouts whose run the machine's other work did not disturb ([Note: other load])
    quiet = [abs(o.step_error) for o in outcomes if o.run_load is not None and o.run_load <= OTHER_LOAD_WARN]
    se = [o.round_error_se for o in outcomes if o.round_error_se is not None]
    rounds = dict(se_median=statistics.median(se), se_worst=max(se),
                  biased=[o.name for o in outcomes if o.biased]) if se else {}
    return dict(step_median=statistics.median(step), step_worst=max(step), **rounds,
                **(dict(quiet_median=statistics.median(quiet), quiet_worst=max(quiet), quiet_layouts=len(quiet))
                   if quiet else {}),
                memory_median=statistics.median(mem), memory_worst=max(mem), layouts=len(outcomes), ranks=len(mem),
                memory_excess=excess, reserve=1.0 - (1.0 - reserve) / (1.0 + max(0.0, excess)),
                **(dict(bare_median=statistics.median(bare), bare_worst=max(bare)) if bare else {}))


def table(outcomes: Sequence[Outcome]) -> list[str]:
    bare = any(o.predicted_bare_s is not None for o in outcomes)
    extra = " without overheads: predicted (error) |" if bare else ""
    lines = [
        "| layout | predicted step | measured step (spread, steps) | error |" + extra
        + " peak memory per rank: predicted / measured (error) | other load: calibration / run | largest time residual |",
        "|---|---:|---:|---:|" + ("---:|" if bare else "") + "---|---:|---|",
    ]
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    rounds = lambda o: (f" ± {o.round_error_se:.1%}{' (beyond 2 se)' if o.biased else ''} (rounds "  # noqa: E731
                        f"{', '.join(f'{e:+.0%}' for e in o.round_errors)})" if o.round_error_se is not None else "")
    for o in outcomes:
        mem = "; ".join(f"r{r} {p / 2**20:.2f}/{m / 2**20:.2f} MiB ({p / m - 1:+.1%})" for r, p, m in o.memory)
        before = ""
        if bare:
            b = o.predicted_bare_s
            before = f" {b * 1e3:.1f} ms ({b / o.measured_step_s - 1:+.1%}) |" if b is not None else " - |"
        lines.append(f"| {o.name} | {o.predicted_step_s * 1e3:.1f} ms | {o.measured_step_s * 1e3:.1f} ms "
                     f"({o.step_spread:.0%}, {o.steps} steps) | {o.step_error:+.1%}{rounds(o)} |{before} {mem} | "
                     f"{pct(o.calibration_load)} / {pct(o.run_load)} | {o.largest_residual} |")
    return lines


def memory_table(outcomes: Sequence[Outcome]) -> list[str]:
    """One row per rank: predicted and measured peak, the error, and the layout's largest memory residual."""
    lines = [
        "| layout | rank | predicted peak | measured peak | error | largest memory residual (explain --measured) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        for i, (r, p, m) in enumerate(o.memory):
            lines.append(f"| {o.name if i == 0 else ''} | {r} | {p / 2**20:.3f} MiB | {m / 2**20:.3f} MiB | "
                         f"{p / m - 1:+.1%} | {o.memory_residual if i == 0 else ''} |")
    return lines


def recorded_source(report: Path) -> str:
    """How a record written from ``report`` names it: relative to the checkout where it lies inside it."""
    return str(report.resolve().relative_to(ROOT) if report.resolve().is_relative_to(ROOT) else report)


def record_margin(s: dict[str, float], command: str, report: Path) -> Path:
    """Write the memory margin (cost_models/memory.py, ``recorded_margin``): the worst excess of a
    measured peak over its prediction, never below zero, with where it comes from."""
    data = dict(
        margin=round(max(0.0, s["memory_excess"]), 4),
        worst_error=round(s["memory_worst"], 4),
        median_error=round(s["memory_median"], 4),
        ranks=int(s["ranks"]),
        layouts=int(s["layouts"]),
        command=command,
        date=time.strftime("%Y-%m-%d", time.gmtime()),
        source=recorded_source(report),
    )
    MARGIN_FILE.write_text(json.dumps(data, indent=1) + "\n")
    return MARGIN_FILE


def record_step_error(outcomes: Sequence[Outcome], runs: int, device: str, command: str, report: Path) -> Path:
    """Write the step-time model's measured error (cost_models/step_error.py, ``recorded_step_error``):
    over ``outcomes`` (each layout's mean over its rounds), the median and worst |error|, the most under-
    and over-predicted layout's signed error, on ``device`` with gloo, with where it comes from."""
    errors = [o.step_error for o in outcomes]
    rec = RecordedStepError(
        median_error=round(statistics.median(abs(e) for e in errors), 4),
        worst_error=round(max(abs(e) for e in errors), 4),
        most_under=round(min(errors), 4),
        most_over=round(max(errors), 4),
        layouts=len(outcomes),
        runs=runs,
        device=device,
        backend="gloo",
        command=command,
        date=time.strftime("%Y-%m-%d", time.gmtime()),
        source=recorded_source(report),
    )
    STEP_ERROR_FILE.write_text(json.dumps(asdict(rec), indent=1) + "\n")
    return STEP_ERROR_FILE


def plan_device(keep: Path) -> str:
    """The device name of the cluster the plans in ``keep`` were made for (every layout's is the same machine)."""
    for path in sorted(keep.glob("*.plan.json")):
        return json.loads(path.read_text())["cluster"]["device"]["name"]
    raise SystemExit(f"fidelity: no plan in {keep} to name the device by")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default=None, help="write the markdown report here (its plans and runs beside it)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    ap.add_argument("--min-seconds", type=float, default=2.0,
                    help="time more steps where the step is short: at least this many seconds of predicted steps, "
                         f"{MAX_STEPS} steps at most (default 2; 0 times --steps only)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    ap.add_argument("--only", default=None,
                    help="only layouts whose name contains this text (or one of these comma-separated texts)")
    ap.add_argument("--no-calibrate", action="store_true", help="plan on the local-cpu preset instead of a calibrated file")
    ap.add_argument("--calibrate-each", action="store_true",
                    help="calibrate again right before each layout, not once per world size a round (it does not "
                         "follow the machine's speed into the run: [Note: calibrating once a round])")
    ap.add_argument("--rounds", type=int, default=1,
                    help="calibrate (once per world size a round, or before each layout with --calibrate-each), "
                         "profile, plan and run every layout this many times, all layouts a round, and set each "
                         "layout's mean prediction against its mean measured step; every single run's figures are "
                         "reported too (default 1)")
    ap.add_argument("--calibration-tries", type=int, default=3,
                    help=f"calibrate again while the machine's other load is above {OTHER_LOAD_WARN * 100:.0f}%% (partitioner/hostload.py), "
                         "up to this many times, keeping the quietest (default 3; 1 takes the first)")
    ap.add_argument("--also-without-overheads", action="store_true",
                    help="also price each plan on its cluster without the [overheads] table (the time model "
                         "before the measured overheads), against the same run")
    ap.add_argument("--cache", default=None, help="profile cache (default: a fresh one in the keep folder, one a round "
                                                   "with --rounds)")
    ap.add_argument("--force", action="store_true", help="let --report overwrite an existing file")
    ap.add_argument("--memory-only", action="store_true",
                    help="peak memory alone: plan on local-cpu:N without profiling, run 1 step after 1 warm-up")
    ap.add_argument("--profile", action="store_true",
                    help="with --memory-only: plan as the time figures do (--profile, on a calibrated cluster "
                         "unless --no-calibrate), so that the peak memory of the profiled plans is measured")
    ap.add_argument("--record-step-error", action="store_true",
                    help="write the step-time error over the layouts to cost_models/step_error.json, which autopart "
                         "explain states under a plan's step time (needs --report, every layout and --rounds >= 2)")
    ap.add_argument("--record-margin", action="store_true",
                    help="write the worst measured excess over the predicted peak to cost_models/memory_margin.json "
                         "(needs --report and every layout)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.calibration_tries < 1:
        ap.error(f"--rounds {args.rounds} / --calibration-tries {args.calibration_tries}: use at least 1")
    if args.rounds > 1 and (args.no_calibrate or args.memory_only):
        ap.error("--rounds N calibrates every round (each round is a whole prediction: calibrated, profiled, planned "
                 "and run): not with --no-calibrate or --memory-only")
    if args.profile and not args.memory_only:
        raise SystemExit("fidelity: --profile goes with --memory-only (the full benchmark always plans with --profile)")
    if args.memory_only:
        args.steps, args.warmup, args.min_seconds = 1, 1, 0.0
        args.no_calibrate = args.no_calibrate or not args.profile
    if args.record_margin and (args.report is None or args.only is not None):
        raise SystemExit("fidelity: --record-margin needs --report (the margin names its source) and every layout "
                         "(no --only)")
    # (--memory-only is refused above with --rounds 2 or more)
    if args.record_step_error and (args.report is None or args.only is not None or args.rounds < 2):
        raise SystemExit("fidelity: --record-step-error needs --report (the record names its source), every layout "
                         "(no --only) and --rounds 2 or more (one run a layout is mostly the machine's drift)")
    report = Path(args.report) if args.report else None
    if report is not None and report.exists() and not args.force:
        raise SystemExit(f"fidelity: --report {report} exists; pass --force or pick a new path")
    keep = report.with_suffix("") if report else Path(tempfile.mkdtemp(prefix="autopart-fidelity-"))
    keep.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else keep / "profile.sqlite"
    layouts = [l for l in LAYOUTS if args.only is None or any(t in l.name for t in args.only.split(","))]
    started = time.monotonic()
    clusters: dict[int, str] = {}
    loads: dict[int, float | None] = {}  # the other load while each world size's cluster was calibrated
    retried = 0  # calibrations taken again because the machine was not quiet
    failed: list[str] = []
    runs: dict[str, list[Outcome]] = {}  # each layout's outcome of every round that ran
    for r in range(1, args.rounds + 1):
        tag = f"-r{r}" if args.rounds > 1 else ""  # each round's files beside the others'
        # One calibration per world size a round, as a user calibrates once and plans with it; with
        # --calibrate-each, one right before each layout instead ([Note: calibrating once a round]).
        for world in sorted({l.world for l in layouts}):
            if args.no_calibrate:
                clusters[world], loads[world] = f"local-cpu:{world}", None
            elif not args.calibrate_each:
                c = calibrate(world, keep / f"calibrated-{world}{tag}.toml", args.calibration_tries)
                clusters[world], loads[world], retried = str(c.path), c.load, retried + c.tries - 1
        for layout in layouts:
            try:
                if args.calibrate_each and not args.no_calibrate:
                    c = calibrate(layout.world, keep / f"calibrated-{layout.name.replace(' ', '-')}{tag}.toml",
                                  args.calibration_tries)
                    clusters[layout.world], loads[layout.world], retried = str(c.path), c.load, retried + c.tries - 1
                # each round profiles anew (its own cache), unless --cache names one: a round is a whole prediction
                rcache = cache if args.cache or not tag else keep / f"profile{tag}.sqlite"
                o = measure(layout, clusters[layout.world], rcache, keep, args.steps, args.warmup,
                            profile=args.profile or not args.memory_only, bare=args.also_without_overheads,
                            min_seconds=args.min_seconds, tag=tag)
                o = replace(o, calibration_load=loads[layout.world])
            except RunFailed as exc:  # recorded, not retried: a flaky layout should show
                failed.append(f"{layout.name}{f' (round {r})' if tag else ''}: {exc}")
                print(f"{layout.name}{tag}: {exc}", flush=True)
                continue
            runs.setdefault(layout.name, []).append(o)
            print(f"{o.name}{tag}: step predicted {o.predicted_step_s * 1e3:.1f} ms, measured "
                  f"{o.measured_step_s * 1e3:.1f} ms ({o.step_error:+.1%}); peak memory error per rank "
                  f"{', '.join(f'{e:+.1%}' for e in o.memory_errors)}", flush=True)
    outcomes = [combine(runs[l.name]) for l in layouts if l.name in runs]
    singles = [o for l in layouts for o in runs.get(l.name, [])]
    if not outcomes:
        raise SystemExit("fidelity: every layout failed: " + "; ".join(failed))
    s = summarize(outcomes)
    lines = memory_table(outcomes) if args.memory_only else table(outcomes)
    each = f", each the mean of {args.rounds} rounds" if args.rounds > 1 else ""
    summary = (f"step time over {s['layouts']} layouts{each}: median |error| {s['step_median']:.1%}, worst {s['step_worst']:.1%} "
               f"(target 10% / 20%)"
               + (f"; over the {len(singles)} single runs: median |error| "
                  f"{statistics.median(abs(o.step_error) for o in singles):.1%}, worst "
                  f"{max(abs(o.step_error) for o in singles):.1%}" if args.rounds > 1 else "")
               + (f"; a layout's error has a standard error of {s['se_median']:.1%} (median; at most {s['se_worst']:.1%}) "
                  f"from its rounds' scatter, and {len(s['biased'])} of {s['layouts']} lie beyond twice theirs"
                  + (f" ({', '.join(s['biased'])})" if s['biased'] else "") if "se_median" in s else "")
               + f"; peak memory over {s['ranks']} ranks: median |error| {s['memory_median']:.1%}, "
               f"worst {s['memory_worst']:.1%} (target 3% / 10%); memory margin: measured peaks up to "
               f"{s['memory_excess']:+.1%} over the prediction, covered by --memory-reserve {s['reserve']:.3f}")
    if args.memory_only:
        summary = (f"peak memory over {s['ranks']} ranks of {s['layouts']} layouts: median |error| "
                   f"{s['memory_median']:.1%}, worst {s['memory_worst']:.1%} (target 3% / 10%); measured peaks up to "
                   f"{s['memory_excess']:+.1%} over the prediction")
    if not args.memory_only and any(o.run_load is not None for o in outcomes):
        busy = [o.name for o in outcomes if o.run_load is not None and o.run_load > OTHER_LOAD_WARN]
        summary += (f"; the machine's other load was above {OTHER_LOAD_WARN:.0%} during the runs of {len(busy)} layout(s)"
                    + (f" ({', '.join(busy)})" if busy else "")
                    + (f", {retried} calibration(s) were taken again for it" if retried else ""))
        if busy and "quiet_median" in s:
            summary += (f"; step time over the {s['quiet_layouts']} quiet runs: median |error| {s['quiet_median']:.1%}, "
                        f"worst {s['quiet_worst']:.1%}")
    if "bare_median" in s:
        summary += (f"; the same plans priced without the measured overheads: median |error| {s['bare_median']:.1%}, "
                    f"worst {s['bare_worst']:.1%}")
    if failed:
        summary += f"; {len(failed)} layout(s) failed and are not in the figures: " + "; ".join(failed)
    print("\n".join(lines))
    print(summary)
    if report is not None:
        command = "python -m benchmarks.fidelity " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        where = keep.relative_to(ROOT) if keep.is_relative_to(ROOT) else keep
        planned = (
            "planned as the time figures plan it (`autopart plan --profile` with the layout's flags, on "
            + ("the `local-cpu:N` preset" if args.no_calibrate else "the cluster `autopart calibrate` measured, once "
               "per world size") + ")"
            if args.profile else
            "planned on the `local-cpu:N` preset without profiling (`autopart plan` with the layout's flags)")
        memory_how = (
            f"Memory only: each layout is {planned} and run with `autopart run --steps 1 --warmup 1 --json` (gloo, one thread per rank). "
            "The error is predicted / measured - 1. Peak memory is measured by the dispatch-mode storage meter "
            "(partitioner/measure.py) over the first step and a steady one; it does not depend on the machine's load. "
            f"Plans and runs are in `{where}/`; `autopart explain --measured RUN.json` shows every category."
        )
        text = [
            "# Fidelity: predicted vs measured step time and peak memory per rank (issue 12)",
            "",
            f"Command: `{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}, {time.monotonic() - started:.0f} s).",
            "",
            memory_how if args.memory_only else
            f"Each layout is calibrated ({'no' if args.no_calibrate else 'yes'}: `autopart calibrate` "
            f"{'right before each layout' if args.calibrate_each else 'per world size' + (', once a round' if args.rounds > 1 else '')}), "
            f"planned with `autopart plan --profile` and the layout's flags, and run with `autopart run --steps N "
            f"--warmup {args.warmup} --json` (gloo, one thread per rank; N is {args.steps}, or more where the step is "
            f"short: enough for {args.min_seconds:g} s of predicted steps). "
            "The error is predicted / measured - 1"
            + (f"; with {args.rounds} rounds (all layouts, then all again), each layout is calibrated, profiled (a cache a round), planned and run "
               "once a round, and its error is its mean prediction over its mean measured step (each round's error "
               "beside it). " if args.rounds > 1 else ". ")
            + "Peak memory is measured by the dispatch-mode storage meter (partitioner/measure.py) over the first step "
            "and a steady one; the table shows the first round's, the summary and the margin count every round's "
            "ranks (a round's plan can differ). Plans, runs and calibrations are in "
            f"`{keep.relative_to(ROOT) if keep.is_relative_to(ROOT) else keep}/`; "
            "`autopart explain --measured RUN.json` shows every component.",
            "",
            *lines,
            "",
            f"**Summary:** {summary}.",
            "",
        ]
        report.write_text("\n".join(text))
        (keep / "outcomes.json").write_text(json.dumps(
            [dict(layout=o.layout, dp_sharding=o.dp_sharding, predicted_step_s=o.predicted_step_s, measured_step_s=o.measured_step_s,
                  predicted_bare_s=o.predicted_bare_s, step_spread=o.step_spread, steps=o.steps, memory=o.memory, largest_residual=o.largest_residual, reserve=o.reserve,
                  run_load=o.run_load, calibration_load=o.calibration_load, round_errors=o.round_errors)
             for o in outcomes],
            indent=1) + "\n")
        print(f"wrote {report}")
        if args.record_margin:
            if failed:
                raise SystemExit("fidelity: --record-margin: some layouts failed, so the margin would not cover them; "
                                 "rerun")
            print(f"wrote {record_margin(s, command, report)}")
        if args.record_step_error:
            if failed:
                raise SystemExit("fidelity: --record-step-error: some layouts failed, so the record would not cover "
                                 "them; rerun")
            print(f"wrote {record_step_error(outcomes, len(singles), plan_device(keep), command, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
