"""ILP vs expert, measured: both plans of each case run for real here, in alternating rounds.

Each case is planned by ``expert`` (the tuned Megatron-style grid, partitioner/baselines.py) and by
``ilp`` from the same costs (``partitioner.compare.run_case`` with ``--profile``'s measured costs,
on a cluster file ``autopart calibrate`` measured just before, so that the overheads it measures
price both plans). Where the two plans differ, each is run with ``autopart run`` under ``torchrun``
(2 ranks, gloo, one thread each) in rounds that alternate their order (expert, ilp; then ilp,
expert; ...), so that the other jobs on these shared cores slow both alike. A plan's measured step
is the median of its warm steps over every round; the measured ratio expert/ilp is set beside the
predicted one. This is item 7 of issue 11.

    python -m benchmarks.measured_quality [--report benchmarks/results/YYYY-MM-DD-measured-quality.md] \\
        [--rounds 3] [--steps 4] [--warmup 2] [--only TEXT] [--no-calibrate] [--cache PATH] [--force]

Each model is planned twice: free (every method chooses its mesh) and with ``pp=2`` pinned, the
layout where the cut between the stages decides the step time. Where the ILP returns the expert's
plan, the row says "same plan" and nothing is run: the measured ratio is 1 by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from partitioner.compare import CaptureCache, Case, CompareError, MeasureSettings, ProfileSettings, machine_info, run_case, run_plan
from partitioner.errors import AutopartError

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# A narrow GPT-2 with its real 50,257-token vocabulary: the head outweighs the 4 layers together.
GPT2_50K = ("n_layer=4", "n_embd=128", "n_head=4", "n_positions=128")
# compare_measured's hetero-lm: mixed MLP widths 32 to 2048 and a 4,000-token vocabulary.
HETERO = ("vocab_size=4000", "d_model=128", "widths=64,1024,32,2048,128,512,64,256")
# A funnel, its layers from widest to narrowest: Megatron's split by layer count puts 6,144 of the 6,624
# MLP widths on the first stage (the mix above splits 3,168 | 960 beside a head of about 2,000).
FUNNEL = ("vocab_size=4000", "d_model=128", "widths=2048,2048,1024,1024,256,128,64,32")
# (title, model, config, vocab chunks): the last splits the head's vocabulary and the loss into that many blocks
# ([Note: vocabulary chunks] in partitioner/vocab_split.py). The expert plans both the chunked and the whole head and
# keeps the faster (its split keeps every chunk on its last stage).
MODELS = (
    ("gpt2 4x128, vocab 50257", "gpt2", GPT2_50K, 1),
    ("gpt2 4x128, vocab 50257 in 4 chunks", "gpt2", GPT2_50K, 4),
    ("hetero-lm (mixed widths)", "hetero-lm", HETERO, 1),
    ("hetero-lm funnel (widths 2048 down to 32)", "hetero-lm", FUNNEL, 1),
    ("t5 2+2 x128, vocab 32128", "py:benchmarks.measured_quality:t5_small", (), 1),
)
SEQ_LEN = 64


def t5_small() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A small T5 (2 encoder and 2 decoder layers of width 128) with T5's 32,128-token vocabulary, taking
    its encoder and decoder token ids positionally as the zoo's ``hf:`` encoder-decoders do
    (``EncoderDecoderLM``); the runtime draws both inputs as token ids."""
    import transformers

    from partitioner.zoo import EncoderDecoderLM

    cfg = transformers.T5Config(num_layers=2, num_decoder_layers=2, d_model=128, d_ff=512, num_heads=4, d_kv=32,
                                vocab_size=32128, use_cache=False)
    torch.manual_seed(0)
    ids = torch.zeros(1, SEQ_LEN, dtype=torch.long)
    return EncoderDecoderLM(transformers.T5ForConditionalGeneration(cfg)), (ids, ids.clone())
MESHES = (None, "pp=2")  # free, and the pipeline pinned


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """What the report says about one plan."""

    mesh: str
    schedule: str  # e.g. "1f1b", "interleaved v2"
    microbatches: str  # "M x size"
    stages: tuple[str, ...]  # "first..last (n blocks)" per stage
    recompute: int  # blocks that recompute
    dp_sharding: str
    origin: str  # solver.origin, or the method for a baseline
    predicted_s: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """One case: both plans, and their runs where they differ."""

    title: str
    model: str
    config: tuple[str, ...]
    mesh: str | None
    costs: str  # what priced both plans (CaseResult.costs)
    expert: PlanSummary | None
    ilp: PlanSummary | None
    same_plan: bool
    predicted_ratio: float | None  # expert / ilp, predicted
    expert_steps_s: tuple[tuple[float, ...], ...] = ()  # per round, the warm steps
    ilp_steps_s: tuple[tuple[float, ...], ...] = ()
    note: str = ""  # why there is no measurement (a failed run, no plan)

    @property
    def expert_median_s(self) -> float | None:
        return _median(self.expert_steps_s)

    @property
    def ilp_median_s(self) -> float | None:
        return _median(self.ilp_steps_s)

    @property
    def measured_ratio(self) -> float | None:
        if self.same_plan:
            return 1.0
        e, i = self.expert_median_s, self.ilp_median_s
        return e / i if e and i else None

    @property
    def round_ratios(self) -> tuple[float, ...]:
        """Each round's expert/ilp ratio of medians: the spread of the measured ratio."""
        return tuple(statistics.median(e) / statistics.median(i)
                     for e, i in zip(self.expert_steps_s, self.ilp_steps_s) if e and i)

    @property
    def error(self) -> float | None:
        """predicted / measured ratio - 1."""
        m = self.measured_ratio
        return self.predicted_ratio / m - 1 if m and self.predicted_ratio else None


def _median(rounds: Sequence[Sequence[float]]) -> float | None:
    steps = [t for r in rounds for t in r]
    return statistics.median(steps) if steps else None


def summarize(plan) -> PlanSummary:
    sch = plan.schedule
    name = sch.name + (f" v{sch.virtual_stages}" if sch.virtual_stages > 1 else "")
    stages = tuple(f"{s.modules[0]}..{s.modules[-1]} ({len(s.modules)})" if len(s.modules) > 1 else s.modules[0]
                   for s in plan.stages)
    return PlanSummary(
        mesh=str(plan.mesh), schedule=name, microbatches=f"{sch.microbatches} x {sch.micro_batch_size}", stages=stages,
        recompute=sum(len(s.recompute) for s in plan.stages), dp_sharding=plan.training.dp_sharding,
        origin=plan.solver.origin or plan.solver.method, predicted_s=plan.predicted.step_time_s,
    )


def calibrate(out: Path) -> Path:
    """``autopart calibrate`` on ``WORLD`` ranks here (one thread each), written to ``out``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "partitioner", "calibrate", "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise CompareError(f"autopart calibrate failed (rc {proc.returncode}): {lines[-1] if lines else ''}; "
                           "pass --no-calibrate to plan on the local-cpu preset")
    return out


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_model_case(title: str, case: Case, cluster: str, rounds: int, settings: MeasureSettings, profile: ProfileSettings,
                   captures: CaptureCache, work: Path, loads: list[float | None]) -> Outcome:
    res, costs = plan_case(case, ("expert", "ilp"), profile, captures, work)
    ex, il = res.row("expert"), res.row("ilp")
    paths = {m: work / "plans" / f"{case.slug}-{m}.json" for m in ("expert", "ilp")}
    took_whole = False
    if case.vocab_chunks > 1:
        # The expert may also keep the head whole (the loss after the graph, as Megatron runs it): it takes
        # the faster of its two predicted plans. Its split keeps every chunk on its last stage either way.
        whole, costs_whole = plan_case(replace(case, vocab_chunks=1), ("expert",), profile, captures, work / "whole")
        wx = whole.row("expert")
        if wx.ok and (not ex.ok or wx.step_s < ex.step_s):
            ex, costs, took_whole = wx, f"{costs}; the expert's plan (head whole): {costs_whole}", True
            paths["expert"] = work / "whole" / "plans" / f"{case.slug}-expert.json"
    base = dict(title=title, model=case.model, config=case.config, mesh=case.mesh, costs=costs,
                expert=summarize(ex.plan) if ex.ok else None, ilp=summarize(il.plan) if il.ok else None)
    if not (ex.ok and il.ok):
        return Outcome(**base, same_plan=False, predicted_ratio=None,
                       note=f"no plan: expert {ex.error or 'ok'}; ilp {il.error or 'ok'}")
    predicted = ex.step_s / il.step_s
    if il.same_as == "expert" and not took_whole:
        return Outcome(**base, same_plan=True, predicted_ratio=predicted)
    steps, note = alternate_runs(case, paths, rounds, settings, work / "measure", loads)
    return Outcome(**base, same_plan=False, predicted_ratio=predicted,
                   expert_steps_s=steps["expert"], ilp_steps_s=steps["ilp"], note=note)


def plan_case(case: Case, methods: Sequence[str], profile: ProfileSettings, captures: CaptureCache,
              work: Path):
    """``run_case`` with profiled costs, falling back to the calibrated analytic model where profiling fails.

    Returns the ``CaseResult`` and the line saying what priced its plans; the plans are saved
    under ``work/plans`` as ``SLUG-METHOD.json``."""
    say = lambda m: print(f"  {m}", flush=True)  # noqa: E731
    try:
        res = run_case(case, methods, profile=profile, captures=captures, workdir=work, progress=say)
        return res, res.costs
    except AutopartError as exc:
        # The profiler cannot time every model's blocks (T5's relative-position buckets): such a
        # case is priced by the (calibrated) analytic model instead, for every method alike.
        res = run_case(case, methods, captures=captures, workdir=work, progress=say)
        return res, f"{res.costs} (profiling failed: {str(exc).splitlines()[0][:160]})"


def alternate_runs(case: Case, paths: dict[str, Path], rounds: int, settings: MeasureSettings, logs: Path,
                   loads: list[float | None]) -> tuple[dict[str, tuple[tuple[float, ...], ...]], str]:
    """Run each plan of ``paths`` (label -> plan file) once per round, the order reversed every other round.

    Returns each label's warm step times per round, and a note naming the first failed run ("" when
    all ran; the rounds before it are kept). The load average is appended to ``loads`` before each round."""
    logs.mkdir(parents=True, exist_ok=True)
    labels = tuple(paths)
    steps: dict[str, list[tuple[float, ...]]] = {k: [] for k in labels}
    for r in range(rounds):
        loads.append(load())
        for label in (labels if r % 2 == 0 else labels[::-1]):
            m = run_plan(case, f"{label}-{r + 1}", paths[label], settings, logs,
                         lambda msg: print(f"  round {r + 1}/{rounds}: {msg}", flush=True))
            if m.median_s is None:
                return {k: tuple(v) for k, v in steps.items()}, f"{label} run {r + 1} {m.status}: {m.reason}"
            steps[label].append(m.step_times_s)
    return {k: tuple(v) for k, v in steps.items()}, ""


def _fmt_ms(s: float | None) -> str:
    return f"{s * 1e3:.0f} ms" if s is not None else "—"


def plan_cell(p: PlanSummary | None) -> str:
    """A plan in one markdown table cell: mesh, schedule, micro-batches, recompute, sharding, stages, origin."""
    if p is None:
        return "no plan"
    extra = (f", recompute {p.recompute} blocks" if p.recompute else "") + (
        f", {p.dp_sharding}" if p.dp_sharding != "none" else "")
    stages = " \\| ".join(p.stages)  # a bar inside a markdown table cell
    return f"{p.mesh} {p.schedule} {p.microbatches}{extra}; stages: {stages}; origin {p.origin}"


def report_markdown(outcomes: Sequence[Outcome], command: str, loads: Sequence[float | None], cluster: str,
                    settings: MeasureSettings, rounds: int, wall_s: float, work: str) -> str:
    machine = machine_info()
    ld = ", ".join(f"{x:.1f}" if x is not None else "?" for x in loads)
    lines = [
        "# Measured quality: ILP vs expert, both run here (issue 11, item 7)", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {wall_s:.0f} s).", "",
        f"Machine: {machine.get('cpu')}, {machine.get('cpus')} CPUs, torch {machine.get('torch')}. "
        f"Cluster for planning: `{cluster}`. Each plan runs under `torchrun` on {WORLD} ranks (gloo, "
        f"OMP_NUM_THREADS=1), {settings.warmup} warm-up + {settings.steps} measured steps per run, {rounds} rounds "
        "alternating the order (expert then ilp; ilp then expert; ...). A measured step is the median of a plan's "
        "warm steps over all rounds. 1-minute load average (`os.getloadavg`) at the start, before each round "
        f"and at the end: {ld}. The cores are shared with other engineers' jobs.", "",
        "| case | expert plan | ilp plan | predicted expert / ilp | measured expert / ilp | measured ratio (per round) "
        "| ratio: predicted / measured - 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        if o.same_plan:
            meas, ratio, rounds_txt = "same plan (not run)", "1.00 (same plan)", "—"
        elif o.measured_ratio is None:
            meas, ratio, rounds_txt = o.note, "—", "—"
        else:
            meas = f"{_fmt_ms(o.expert_median_s)} / {_fmt_ms(o.ilp_median_s)}"
            ratio = f"{o.measured_ratio:.2f}x"
            rounds_txt = ", ".join(f"{r:.2f}" for r in o.round_ratios)
        pred = (f"{_fmt_ms(o.expert.predicted_s)} / {_fmt_ms(o.ilp.predicted_s)} = {o.predicted_ratio:.2f}x"
                if o.predicted_ratio else "—")
        err = f"{o.error:+.1%}" if o.error is not None else "—"
        lines.append(f"| {o.title} | {plan_cell(o.expert)} | {plan_cell(o.ilp)} | {pred} | {meas} | {ratio} "
                     f"({rounds_txt}) | {err} |" if not o.same_plan else
                     f"| {o.title} | {plan_cell(o.expert)} | {plan_cell(o.ilp)} | {pred} | {meas} | {ratio} | — |")
    lines += ["", "Origin is the ILP plan's `solver.origin`: `ilp` where its own solve beat every seed, else the "
              "name of the seed (a baseline's plan) that nothing beat. What priced both plans of each case:", ""]
    lines += [f"- {o.title}: {o.costs}" for o in outcomes]
    lines += ["", f"Plans, logs and run JSON: `{work}` (outside the repository).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.measured_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default=None, metavar="PATH.md",
                    help="report to write, with its .json beside it "
                         "(default benchmarks/results/<today>-measured-quality.md)")
    add_run_arguments(ap)
    ap.add_argument("--only", default=None, metavar="TEXT", help="only the cases whose title contains TEXT")
    return run_main(ap, argv, "measured_quality", _run)


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every measured benchmark here takes besides ``--report`` and ``--only``."""
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of runs per case (default 3)")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per run (default 4)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps before them (default 2)")
    ap.add_argument("--no-calibrate", action="store_true", help="plan on the local-cpu:2 preset, not a calibrated file")
    ap.add_argument("--cache", default=None, metavar="PATH", help="profile cache file (as autopart plan --cache)")
    ap.add_argument("--force", action="store_true", help="replace an existing report")


def run_main(ap: argparse.ArgumentParser, argv: Sequence[str] | None, name: str,
             run: Callable[[argparse.Namespace, str], int]) -> int:
    """Parse ``argv`` and ``run(args, command)``; an AutopartError is one line on stderr and exit 2."""
    args = ap.parse_args(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    command = f"python -m benchmarks.{name}" + (" " + shlex.join(words) if words else "")
    try:
        return run(args, command)
    except AutopartError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2


def report_path(args: argparse.Namespace, stem: str) -> Path:
    """``--report`` (default benchmarks/results/<today>-``stem``.md), checked with ``--rounds`` before any work."""
    report = Path(args.report or ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-{stem}.md")
    if report.suffix != ".md":
        raise CompareError(f"--report {report} must end in .md")
    if not report.parent.is_dir():
        raise CompareError(f"--report {report}: directory {report.parent} does not exist")
    if not args.force:
        for t in (report, report.with_suffix(".json")):
            if t.exists():
                raise CompareError(f"{t} already exists; pass --force to replace it")
    if args.rounds < 1:
        raise CompareError(f"--rounds {args.rounds} must be >= 1")
    return report


@dataclass(frozen=True)
class Runs:
    """What every case of a measured benchmark shares: settings, folder, loads, cluster, caches."""

    settings: MeasureSettings
    work: Path
    loads: list[float | None]
    cluster: str
    profile: ProfileSettings
    captures: CaptureCache


def start_runs(args: argparse.Namespace, prefix: str) -> Runs:
    """The run settings, a work folder outside the repository, and the cluster to plan on: a freshly
    calibrated ``local-cpu:WORLD`` unless ``--no-calibrate``."""
    settings = MeasureSettings(steps=args.steps, warmup=args.warmup, timeout_s=300)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    loads: list[float | None] = [load()]
    os.environ["OMP_NUM_THREADS"] = "1"  # the runs' ranks, one thread each (run_plan keeps a set value)
    cluster = f"local-cpu:{WORLD}"
    if not args.no_calibrate:
        print(f"calibrating {WORLD} ranks", flush=True)
        cluster = str(calibrate(work / f"calibrated-{WORLD}.toml"))
    return Runs(settings, work, loads, cluster, ProfileSettings(cache=args.cache), CaptureCache())


def cluster_said(args: argparse.Namespace, runs: Runs) -> str:
    """How the report names the cluster the plans were made for."""
    return runs.cluster if args.no_calibrate else f"autopart calibrate ({WORLD} ranks) just before planning"


def write_report(report: Path, text: str, args: argparse.Namespace, runs: Runs, command: str, wall: float,
                 cases_json: list[dict]) -> None:
    """The markdown report and its .json beside it, printed and named."""
    report.write_text(text)
    data = {"command": command, "machine": machine_info(), "loads": runs.loads, "wall_s": wall,
            "settings": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "world": WORLD,
                         "calibrated": not args.no_calibrate},
            "cases": cases_json}
    report.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(text)
    print(f"wrote {report} and {report.with_suffix('.json').name}; plans and logs in {runs.work}")


def cases(only: str | None) -> list[tuple[str, Case]]:
    out = []
    for title, model, config, chunks in MODELS:
        for mesh in MESHES:
            full = f"{title}, {mesh or 'free mesh'}"
            if only and only not in full:
                continue
            out.append((full, Case(model=model, config=config, seq_len=None if model.startswith("py:") else SEQ_LEN, cluster="local-cpu:2", dtype="fp32", vocab_chunks=chunks,
                                   global_batch=8, mesh=mesh, time_limit=10, label=full)))
    if not out:
        raise CompareError(f"--only {only!r} matches no case; the cases are "
                           + "; ".join(f"{t}, {m or 'free mesh'}" for t, *_ in MODELS for m in MESHES))
    return out


def _run(args: argparse.Namespace, command: str) -> int:
    report = report_path(args, "measured-quality")
    todo = cases(args.only)
    started = time.perf_counter()
    runs = start_runs(args, "autopart-measured-quality-")
    outcomes = []
    for i, (title, case) in enumerate(todo, 1):
        t = time.perf_counter()
        o = run_model_case(title, replace(case, cluster=runs.cluster), runs.cluster, args.rounds, runs.settings,
                           runs.profile, runs.captures, runs.work / f"case-{i}", runs.loads)
        outcomes.append(o)
        got = ("same plan" if o.same_plan else
               f"measured {o.measured_ratio:.2f}x" if o.measured_ratio else o.note)
        pred = f"{o.predicted_ratio:.2f}x" if o.predicted_ratio else "—"
        print(f"[{i}/{len(todo)}] {title}: predicted {pred}, {got}; {time.perf_counter() - t:.0f} s", flush=True)
    runs.loads.append(load())
    wall = time.perf_counter() - started
    text = report_markdown(outcomes, command, runs.loads, cluster_said(args, runs), runs.settings, args.rounds, wall,
                           str(runs.work))
    write_report(report, text, args, runs, command, wall, [_outcome_json(o) for o in outcomes])
    return 0


def _outcome_json(o: Outcome) -> dict:
    from dataclasses import asdict

    out = asdict(o)
    out.update(expert_median_s=o.expert_median_s, ilp_median_s=o.ilp_median_s, measured_ratio=o.measured_ratio,
               round_ratios=o.round_ratios, error=o.error)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
