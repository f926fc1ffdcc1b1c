"""Why a plan is what it is: step-time breakdown, bottleneck, memory headroom, runner-up; and plan diffs.

``breakdown`` reads the step-time components the plan stores per stage
(``StageComponents``, computed by the evaluator from the simulation when the
plan was made) and sums them over the bottleneck rank: forward, backward and
recomputation compute, tensor-parallel collectives, waiting on point-to-point
transfers, the exposed data-parallel reduction, and the pipeline bubble. They
add up to the step time; nothing is recomputed here. ``autopart plan
--explain`` prints it with the rest; ``autopart diff`` compares two plan files
side by side. ``autopart explain --measured run.json`` sets the plan's components
next to those a run measured (measure.py) and names the largest residual.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from cost_models import recorded_margin, recorded_step_error

from .errors import PlanError
from .measure import RankMemory, RankTime, StageTime
from .plan import Plan
from .schedules import spec as schedule_spec, stage_rank

__all__ = ["breakdown", "print_explanation", "print_diff", "MeasuredRun", "MemoryMargin", "Residual", "memory_margin", "print_measured",
           "SEQUENCE_PARALLEL", "SequenceParallelEffect", "sequence_parallel_effect",
           "sequence_parallel_summary"]

GIB = 1 << 30
COMPONENTS = ("forward", "backward", "recompute", "tp_comm", "p2p", "dp_reduce", "dp_gather", "bubble", "optimizer", "overhead",
              "tied_sum")
# Priced only on a calibrated cluster ([Note: software overheads] in cost_models/overheads.py), or only where a
# weight is shared across pipeline ranks ([Note: tied weights' gradient sums] in simulate.py): shown when not 0.
SHOWN_WHEN_NONZERO = ("optimizer", "overhead", "tied_sum")
LABELS = {
    "forward": "forward compute",
    "backward": "backward compute",
    "recompute": "recomputation",
    "tp_comm": "tensor-parallel communication",
    "p2p": "pipeline transfers (waiting)",
    "dp_reduce": "data-parallel reduction (exposed)",
    "dp_gather": "ZeRO-2/3 gathers and scatters (exposed)",
    "bubble": "pipeline bubble",
    "optimizer": "optimizer step",
    "overhead": "runtime overhead (per action and step)",
    "tied_sum": "tied weights' gradient sums",
}


def breakdown(plan: Plan) -> dict[str, float]:
    """Seconds per step by component on the bottleneck rank, summing to the plan's step time.

    The bottleneck rank is the pipeline rank with the most work (compute and
    tensor-parallel communication, lowest index on ties); its stages'
    stored components are summed.
    """
    missing = [st.index for st in plan.stages if st.predicted is None or st.predicted.components is None]
    if missing:
        raise PlanError(
            f"stage {missing[0]} of the plan has no predicted components; re-price the plan "
            "(autopart plan --plan FILE) to get them"
        )
    pp = plan.mesh.pp
    per_rank = [{k: 0.0 for k in COMPONENTS} for _ in range(pp)]
    layout = schedule_spec(plan.schedule.name).layout
    for st in plan.stages:
        c = st.predicted.components
        r = stage_rank(st.index, pp, layout)
        for k in COMPONENTS:
            per_rank[r][k] += getattr(c, f"{k}_s")

    def work(r: int) -> float:
        return sum(per_rank[r][k] for k in ("forward", "backward", "recompute", "tp_comm"))

    busiest = max(range(pp), key=lambda r: (work(r), -r))
    return {**per_rank[busiest], "bottleneck_rank": float(busiest)}


def _fmt(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if abs(s) < 1 else f"{s:.3f} s"


def print_explanation(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    plan = result.plan
    console = Console(width=max(100, Console().width))
    parts = breakdown(plan)
    step = plan.predicted.step_time_s
    table = Table(title="where the step time goes")
    table.add_column("component")
    table.add_column("time", justify="right")
    table.add_column("share", justify="right")
    for k in COMPONENTS:
        if k in SHOWN_WHEN_NONZERO and parts[k] == 0.0:
            continue
        table.add_row(LABELS[k], _fmt(parts[k]), f"{parts[k] / step:.1%}" if step else "")
    table.add_row("step time", _fmt(step), "100%")
    console.print(table)
    console.print(step_error_line(plan))
    r = int(parts["bottleneck_rank"])
    layout = schedule_spec(plan.schedule.name).layout
    stages = [st for st in plan.stages if stage_rank(st.index, plan.mesh.pp, layout) == r]
    console.print(
        f"bottleneck: pipeline rank {r} (stage{'s' if len(stages) > 1 else ''} "
        f"{', '.join(str(s.index) for s in stages)}: {', '.join(m for s in stages for m in s.modules[:3])}"
        f"{' ...' if sum(len(s.modules) for s in stages) > 3 else ''})"
    )
    mem = Table(title="memory per device (activations and temporaries at the rank's peak)")
    for col in ("stage", "static", "activations", "temporaries", "peak", "headroom"):
        mem.add_column(col, justify="right")
    limit = plan.predicted.memory_limit_bytes
    margin = plan.predicted.memory_margin
    for st in plan.stages:
        sp = st.predicted
        mem.add_row(
            str(st.index), _fmt_bytes(sp.static_bytes), _fmt_bytes(sp.activation_bytes), _fmt_bytes(sp.workspace_bytes),
            _fmt_bytes(sp.memory_bytes), _fmt_bytes(limit - sp.memory_bytes * (1 + margin)),
        )
    console.print(mem)
    console.print(margin_line(plan))
    evaluator = getattr(result, "evaluator", None)
    if evaluator is not None and plan.training.dp_sharding != "none" and plan.mesh.dp > 1:
        console.print(dp_sharding_summary(plan, evaluator))
    if evaluator is not None and any(st.recomputes for st in plan.stages):
        console.print(recompute_summary(plan, evaluator))
    if evaluator is not None and any(s in SEQUENCE_PARALLEL for s in plan.sharding.values()):
        console.print(sequence_parallel_summary(plan, evaluator))
    report = getattr(result, "report", None)
    if report is not None:
        console.print(
            f"search: {report.candidates} candidates, {report.pruned_memory} dropped for memory, "
            f"{report.pruned_bound} pruned by the lower bound, {len(report.attempts)} solved with CP-SAT "
            f"({report.sharding_solves} block-sharding solves); bound {_fmt(report.bound_s)}, gap {report.gap:.1%}"
        )
        runner = report.runner_up(plan)
        if runner is not None:
            other = breakdown(runner.plan)
            diffs = {k: other[k] - parts[k] for k in COMPONENTS}
            worst = max(diffs, key=diffs.get)
            console.print(
                f"runner-up mesh: {runner.plan.mesh} ({runner.candidate.describe()}), "
                f"{_fmt(runner.simulated_s)} per step, {runner.simulated_s / step - 1:+.1%} slower; "
                f"mostly {LABELS[worst]} ({_fmt(other[worst])} vs {_fmt(parts[worst])})"
            )
        else:
            pruned = report.runner_up_bound(plan)
            if pruned is not None:
                console.print(
                    f"runner-up mesh: {pruned.mesh} ({pruned.describe()}), not solved: even its lower bound "
                    f"(perfect balance, no communication) is {_fmt(pruned.lower_bound_s)}, "
                    f"{pruned.lower_bound_s / step - 1:+.1%} against this plan"
                )
            else:
                console.print("runner-up mesh: no other mesh fits")


def dp_sharding_summary(plan: Plan, evaluator: Any) -> str:
    """What the plan's data-parallel sharding buys and costs: the peak memory it frees against the
    same split under DDP, and (ZeRO-2/3) its collectives per step on the bottleneck rank and how much
    of them compute hides ([Note: FSDP prefetch overlap] in evaluate.py)."""
    from dataclasses import replace

    from .baselines import with_dp_sharding
    from .dp_sharding import spec as dp_spec

    level = plan.training.dp_sharding
    ddp, _ = with_dp_sharding(evaluator, "none").score(replace(plan, training=replace(plan.training, dp_sharding="none")))
    freed = ddp.predicted.peak_memory_bytes - plan.predicted.peak_memory_bytes
    text = (f"{level} frees {freed / GIB:.2f} GiB per device (peak {plan.predicted.peak_memory_bytes / GIB:.2f} GiB, "
            f"{ddp.predicted.peak_memory_bytes / GIB:.2f} GiB under DDP with the same split)")
    if dp_spec(level).uses_fsdp:
        from .sharding import sharded_params

        ev = with_dp_sharding(evaluator, level)
        r = int(breakdown(plan)["bottleneck_rank"])
        layout = schedule_spec(plan.schedule.name).layout
        node_of_key = ev.captured.node_of_key
        split = (sharded_params(ev.captured, {node_of_key[k]: v for k, v in plan.sharding.items()})
                 if plan.mesh.tp > 1 else set())
        total = exposed = 0.0
        for st in plan.stages:
            if stage_rank(st.index, plan.mesh.pp, layout) != r:
                continue
            blocks = [ev.pgraph.block_index(m) for m in st.modules]
            _, _, _, per_mb = ev.fsdp_costs(blocks, plan.mesh, r, split, 0.0, 0.0)  # all collectives
            total += per_mb * plan.schedule.microbatches
            exposed += st.predicted.components.dp_gather_s
        hidden = 1 - exposed / total if total > 0 else 1.0
        text += (f"; it costs {_fmt(total)} of all-gathers and reduce-scatters per step on pipeline rank {r}, "
                 f"{hidden:.0%} hidden behind compute")
    return text


# The strategies of sequence parallelism ([Note: sequence parallelism] in tp_strategies.py), and what each
# becomes without it: a row linear all-reduces instead of reduce-scattering, a token-split node runs whole.
SEQUENCE_PARALLEL = {"row_seq": "row", "seq": "replicate"}


@dataclass(frozen=True, slots=True)
class SequenceParallelEffect:
    """A plan against the same plan without sequence parallelism (``sequence_parallel_effect``)."""

    nodes: int  # nodes of the plan on split tokens (seq) or reduce-scattering (row_seq)
    peak_bytes: int
    peak_without_bytes: int
    step_s: float
    step_without_s: float
    fits_without: bool

    @property
    def freed_bytes(self) -> int:
        return self.peak_without_bytes - self.peak_bytes


def sequence_parallel_effect(plan: Plan, evaluator: Any) -> SequenceParallelEffect:
    """The plan priced as it is and with its token-split nodes run whole and its row linears
    all-reducing (Megatron's layout without ``--sequence-parallel``), by the same evaluator under the
    plan's own data-parallel sharding."""
    from dataclasses import replace

    from .baselines import with_dp_sharding

    plain = {k: SEQUENCE_PARALLEL.get(s, s) for k, s in plan.sharding.items()}
    without, _ = with_dp_sharding(evaluator, plan.training.dp_sharding).score(replace(plan, sharding={k: s for k, s in plain.items() if s != "replicate"}))
    return SequenceParallelEffect(
        sum(s in SEQUENCE_PARALLEL for s in plan.sharding.values()), plan.predicted.peak_memory_bytes,
        without.predicted.peak_memory_bytes, plan.predicted.step_time_s, without.predicted.step_time_s,
        without.predicted.fits,
    )


def sequence_parallel_summary(plan: Plan, evaluator: Any) -> str:
    """What the plan's sequence parallelism buys and costs, in one line (``sequence_parallel_effect``)."""
    from .fmt import fmt_bytes

    e = sequence_parallel_effect(plan, evaluator)
    return (f"sequence parallelism on {e.nodes} nodes frees {fmt_bytes(e.freed_bytes)} per device (peak "
            f"{fmt_bytes(e.peak_bytes)}, {fmt_bytes(e.peak_without_bytes)} without"
            f"{'' if e.fits_without else ', which does not fit'}); the step is {_fmt(e.step_s)} against "
            f"{_fmt(e.step_without_s)} without ({e.step_without_s / e.step_s:.3f}x)")


def recompute_summary(plan: Plan, evaluator: Any) -> str:
    """What the plan's recomputation buys and costs: the peak memory it frees against the same plan
    with nothing recomputed, and the forward time replayed per step on the bottleneck rank
    ([Note: recompute per block] in recompute.py)."""
    from dataclasses import replace

    from .baselines import with_dp_sharding

    bare = replace(plan, stages=tuple(replace(st, recompute=(), selective=False) for st in plan.stages))
    # priced under the plan's own data-parallel sharding, which the search may have chosen over the
    # evaluator's (a ZeRO-3 plan's counterfactual is ZeRO-3 without recomputation, not DDP)
    keep, _ = with_dp_sharding(evaluator, plan.training.dp_sharding).score(bare)
    freed = keep.predicted.peak_memory_bytes - plan.predicted.peak_memory_bytes
    r = int(breakdown(plan)["bottleneck_rank"])
    layout = schedule_spec(plan.schedule.name).layout
    mine = [st for st in plan.stages if stage_rank(st.index, plan.mesh.pp, layout) == r]
    replay = sum(st.predicted.components.recompute_s for st in mine if st.predicted and st.predicted.components)
    blocks = sum(len(st.recompute) for st in plan.stages)
    total = sum(len(st.modules) for st in plan.stages)
    selective = sum(st.selective for st in plan.stages)
    what = f"recomputing {blocks} of {total} blocks" + (
        f" and the attention cores of the others on {selective} of {len(plan.stages)} stages" if selective else "")
    from .fmt import fmt_bytes

    return (f"{what} frees {fmt_bytes(freed)} per device (peak {fmt_bytes(plan.predicted.peak_memory_bytes)}, "
            f"{fmt_bytes(keep.predicted.peak_memory_bytes)} without); it replays {_fmt(replay)} of forward per "
            f"step on pipeline rank {r}")


def print_diff(a: Plan, b: Plan, name_a: str = "A", name_b: str = "B") -> None:
    """Two plans side by side: what they were made for, their choices and predicted figures."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    table = Table(title=f"{name_a} vs {name_b}")
    table.add_column("")
    table.add_column(name_a)
    table.add_column(name_b)
    table.add_column("B / A", justify="right")

    def row(label: str, x: Any, y: Any, ratio: bool = False) -> None:
        r = f"{y / x:.3f}" if ratio and isinstance(x, (int, float)) and x else ""
        style = "" if x == y else "bold"
        table.add_row(label, str(x), str(y), r, style=style)

    row("model", f"{a.model.name} ({a.model.fingerprint})", f"{b.model.name} ({b.model.fingerprint})")
    row("cluster", f"{a.cluster.get('name')} x{a.cluster.get('nodes')}", f"{b.cluster.get('name')} x{b.cluster.get('nodes')}")
    row("method", f"{a.solver.method} ({a.solver.status})", f"{b.solver.method} ({b.solver.status})")
    row("mesh", str(a.mesh), str(b.mesh))
    row("schedule", f"{a.schedule.name} v={a.schedule.virtual_stages}", f"{b.schedule.name} v={b.schedule.virtual_stages}")
    row("micro-batches x size", f"{a.schedule.microbatches} x {a.schedule.micro_batch_size}",
        f"{b.schedule.microbatches} x {b.schedule.micro_batch_size}")
    row("stages", len(a.stages), len(b.stages))
    row("recomputing stages", sum(s.recomputes for s in a.stages), sum(s.recomputes for s in b.stages))
    row("recomputed blocks", sum(len(s.recompute) for s in a.stages), sum(len(s.recompute) for s in b.stages))
    row("dp sharding", a.training.dp_sharding, b.training.dp_sharding)
    row("sharded nodes", len(a.sharding), len(b.sharding))
    if a.predicted and b.predicted:
        pa, pb = a.predicted, b.predicted
        row("step time (s)", round(pa.step_time_s, 6), round(pb.step_time_s, 6), True)
        row("samples/s", round(pa.samples_per_s, 2), round(pb.samples_per_s, 2), True)
        row("MFU", round(pa.mfu, 4), round(pb.mfu, 4), True)
        row("bubble", round(pa.bubble_fraction, 4), round(pb.bubble_fraction, 4))
        row("peak memory (GiB)", round(pa.peak_memory_bytes / GIB, 2), round(pb.peak_memory_bytes / GIB, 2), True)
        row("fits", pa.fits, pb.fits)
    if all(st.predicted and st.predicted.components for st in (*a.stages, *b.stages)):
        parts_a, parts_b = breakdown(a), breakdown(b)
        row("bottleneck rank", int(parts_a["bottleneck_rank"]), int(parts_b["bottleneck_rank"]))
        for k in COMPONENTS:
            if k in SHOWN_WHEN_NONZERO and parts_a[k] == parts_b[k] == 0.0:
                continue
            row(f"  {LABELS[k]} (s)", round(parts_a[k], 6), round(parts_b[k], 6), True)
    console.print(table)
    if a.model.fingerprint != b.model.fingerprint:
        console.print("[yellow]note:[/yellow] the plans are for different models")
    boundaries_a = [s.modules[0] for s in a.stages]
    boundaries_b = [s.modules[0] for s in b.stages]
    if boundaries_a != boundaries_b:
        console.print(f"stage starts in {name_a}: {', '.join(boundaries_a)}")
        console.print(f"stage starts in {name_b}: {', '.join(boundaries_b)}")
    if a.predicted and b.predicted:
        faster, ratio = (name_b, a.predicted.step_time_s / b.predicted.step_time_s) if b.predicted.step_time_s < a.predicted.step_time_s else (name_a, b.predicted.step_time_s / a.predicted.step_time_s)
        console.print(f"{faster} is {ratio:.2f}x faster per step (predicted)")


# --------------------------------------------------------------------------------------
# explain --measured: the plan's predictions against a run's measurements
# --------------------------------------------------------------------------------------

# Measured components (measure.TIME_COMPONENTS) and the predicted ones (StageComponents) each stands against.
MEASURED_AGAINST = {
    "forward": ("forward", "dp_gather_forward"),  # FSDP's gathers and hooks run inside the timed passes
    "backward": ("backward", "recompute", "dp_gather_backward"),
    "tp_comm": ("tp_comm",),
    "dp_reduce": ("dp_reduce",),
    "optimizer": ("optimizer",),
    "other": ("tied_sum",),
    "wait": ("p2p", "bubble", "overhead"),  # the runtime's overhead happens outside the timed stages
}
MEASURED_LABELS = {
    "forward": "forward compute",
    "backward": "backward compute (recomputation included)",
    "tp_comm": "tensor-parallel communication",
    "dp_reduce": "data-parallel reduction (exposed) and gradient scaling",
    "optimizer": "optimizer step",
    "other": "tied weights' gradient sums",
    "wait": "waiting (pipeline transfers, bubble and runtime overhead)",
}
MEMORY_ROWS = ("static", "activations", "temporaries", "peak")
MEMORY_LABELS = {
    "static": "parameters + gradients + optimizer state",
    "activations": "activations (at the peak)",
    "temporaries": "temporaries (at the peak)",
    "peak": "peak",
}


@dataclass(frozen=True, slots=True)
class Residual:
    """One predicted figure against its measurement."""

    where: str  # "pipeline rank 0" (time) or "rank 1" (memory)
    what: str  # a key of MEASURED_LABELS or MEMORY_LABELS
    predicted: float  # seconds per step, or bytes
    measured: float
    unit: str  # "s" or "B"

    @property
    def error(self) -> float:
        return self.measured - self.predicted

    def describe(self) -> str:
        label = MEASURED_LABELS.get(self.what) or MEMORY_LABELS[self.what]
        show = _fmt if self.unit == "s" else _fmt_bytes
        rel = f", {self.error / self.predicted:+.0%}" if self.predicted else ""
        return f"{label} ({self.where}): predicted {show(self.predicted)}, measured {show(self.measured)}{rel}"


@dataclass(frozen=True, slots=True)
class MeasuredRun:
    """A run's record (``autopart run --json``) read back with the plan it ran."""

    plan: Plan
    step_times_s: tuple[float, ...]
    memory: tuple[Mapping[str, Any], ...]  # measure.RankMemory as dicts, one per rank
    times: tuple[Mapping[str, Any], ...]  # measure.RankTime as dicts, one per rank
    recorded_steps: int = 1  # the steps ``times`` is the mean of (records before RECORDED_STEPS: one)

    @classmethod
    def load(cls, path: str) -> "MeasuredRun":
        import json

        where = f"--measured {path}"
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"{where}: no such file; pass the --json file of `autopart run`") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise PlanError(f"{where} is not a JSON file ({type(exc).__name__}); pass the --json file of `autopart run`") from None
        if not isinstance(data, dict) or "step_times_s" not in data:
            raise PlanError(f"{where} is not a run record (no step_times_s); pass the --json file of `autopart run`")
        missing = [k for k in ("plan_data", "memory", "times") if not data.get(k)]
        if missing:
            raise PlanError(f"{where} has no {', '.join(missing)}: it was written by an autopart run without "
                            "measurements; run it again with this version (autopart run --json)")
        plan = Plan.from_dict(data["plan_data"])
        memory, times = data["memory"], data["times"]
        need_mem = {f.name for f in fields(RankMemory)}
        need_time = {f.name for f in fields(RankTime)}
        for i, (m, t) in enumerate(zip(memory, times)):
            if not isinstance(m, dict) or not need_mem <= set(m) or not isinstance(t, dict) or not need_time <= set(t):
                raise PlanError(f"{where}: the measurements of rank {i} are incomplete; run the plan again with autopart run --json")
        if len(memory) != plan.mesh.world_size or len(times) != plan.mesh.world_size:
            raise PlanError(f"{where}: {len(times)} ranks measured but the plan's mesh has {plan.mesh.world_size}")
        breakdown(plan)  # its own one-line error when the plan has no predicted components
        recorded = data.get("recorded_steps", 1)
        if not isinstance(recorded, int) or recorded < 1:
            raise PlanError(f"{where}: recorded_steps is {recorded!r}, not a count of steps; run the plan again with autopart run --json")
        return cls(plan, tuple(float(x) for x in data["step_times_s"]), tuple(memory), tuple(times), recorded)

    def time_residuals(self) -> list[Residual]:
        """Per pipeline rank and measured component: the prediction (the rank's stages summed) and the
        measurement (the mean over the rank's tp x dp replicas)."""
        plan = self.plan
        layout = schedule_spec(plan.schedule.name).layout
        out = []
        for r in range(plan.mesh.pp):
            stages = [st for st in plan.stages if stage_rank(st.index, plan.mesh.pp, layout) == r]
            ranks = [t for t in self.times if t["rank"] // (plan.mesh.tp * plan.mesh.dp) == r]
            measured = [RankTime(t["rank"], t["step_s"], tuple(StageTime(**s) for s in t["stages"]), t["finish_s"],
                                 t["optimizer_s"], t["other_s"], t["wait_s"]).components() for t in ranks]
            for key, against in MEASURED_AGAINST.items():
                pred = sum(getattr(st.predicted.components, f"{k}_s") for st in stages for k in against)
                meas = sum(m[key] for m in measured) / len(measured)
                out.append(Residual(f"pipeline rank {r}", key, pred, meas, "s"))
        return out

    def memory_residuals(self) -> list[Residual]:
        """Per rank: static, activations, temporaries and peak bytes, predicted and measured."""
        out = []
        for m in self.memory:
            where = f"rank {m['rank']}"
            held = [self.plan.stages[s].predicted for s in m["stages"] if self.plan.stages[s].predicted is not None]
            workspace = max((p.workspace_bytes for p in held), default=0)  # per pipeline rank already
            out += [
                Residual(where, "static", m["predicted_static_bytes"], sum(m["resident"][k] for k in ("parameters", "gradients", "optimizer")), "B"),
                Residual(where, "activations", m["predicted_activation_bytes"], m["at_peak"]["activations"], "B"),
                Residual(where, "temporaries", workspace, m["at_peak"]["temporaries"], "B"),
                Residual(where, "peak", m["predicted_peak_bytes"], m["peak_bytes"], "B"),
            ]
        return out


@dataclass(frozen=True, slots=True)
class MemoryMargin:
    """How far a run's measured peak memory went past the plan's prediction, and the reserve that covers it.

    A plan fits when its predicted peak is at most ``(1 - memory_reserve)`` of device memory. If
    the measured peak is up to ``(1 + excess)`` times the prediction, a plan predicted to fit
    fits for real when ``(1 - reserve') = (1 - reserve) / (1 + excess)``: that ``reserve'`` is the
    margin the measurement asks for.
    """

    excess: float  # the largest measured / predicted - 1 over the ranks (negative: every peak covered)
    rank: int  # the rank where it was
    reserve: float  # the plan's training.memory_reserve
    needed_reserve: float  # the reserve that covers ``excess`` beyond the margin (== reserve when covered)
    margin: float = 0.0  # the plan's memory margin (Predicted.memory_margin)

    def describe(self) -> str:
        if self.excess <= 0:
            return (f"measured memory: every rank's measured peak is within its prediction (closest: rank {self.rank}, "
                    f"{self.excess:+.1%}); the plan's reserve of {self.reserve:.0%} is margin to spare")
        covered = (f"the plan's memory margin of +{self.margin:.1%} covers it" if self.margin >= self.excess else
                   f"beyond the plan's memory margin of +{self.margin:.1%}: plan with --memory-reserve "
                   f"{self.needed_reserve:.3f} (this plan: {self.reserve:.3f}) to cover it")
        return (f"measured memory: the measured peak is up to {self.excess:+.1%} over the prediction (rank {self.rank}); "
                + covered)


def memory_margin(run: MeasuredRun) -> MemoryMargin:
    """The margin a run's measured peaks ask for ([MemoryMargin])."""
    ratios = [(m["peak_bytes"] / m["predicted_peak_bytes"] - 1.0, m["rank"]) for m in run.memory
              if m["predicted_peak_bytes"] > 0]
    if not ratios:
        raise PlanError("explain --measured: the plan has no predicted peak memory; re-price it (autopart plan --plan FILE)")
    excess, rank = max(ratios)
    reserve = run.plan.training.memory_reserve
    margin = run.plan.predicted.memory_margin if run.plan.predicted else 0.0
    # fits for real when peak (1 + excess) <= memory (1 - reserve'), and the plan checked peak (1 + margin)
    needed = reserve if excess <= margin else 1.0 - (1.0 - reserve) * (1.0 + margin) / (1.0 + excess)
    return MemoryMargin(excess, rank, reserve, needed, margin)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def step_error_line(plan: Plan) -> str:
    """How far this model's step times have been measured from runs, on the plan's device or on which one
    ([Note: the recorded step-time error] in cost_models/step_error.py)."""
    device = str(plan.cluster.get("device", {}).get("name", "this device"))
    try:
        return recorded_step_error().describe(device, calibrated=bool(plan.cluster.get("overheads")))
    except ValueError as exc:
        return f"step time: no measured error recorded ({exc})"


def margin_line(plan: Plan) -> str:
    """Two lines: the plan's memory margin with where it comes from, and the fit check it enters
    ([Note: the memory margin] in cost_models/memory.py)."""
    pred = plan.predicted
    peak, margin = pred.peak_memory_bytes, pred.memory_margin
    verdict = "fits" if pred.fits else "does not fit"
    head = f"memory margin: +{margin:.1%} on the predicted peak"
    try:
        rec = recorded_margin()
    except ValueError:
        rec = None
    if rec is not None and abs(rec.margin - margin) < 5e-5:
        head = rec.describe()
    elif margin == 0:
        head = "memory margin: none (this plan was priced without one)"
    return (f"{head}\nfit: peak {_fmt_bytes(peak)} + {margin:.1%} = {_fmt_bytes(peak * (1 + margin))} "
            f"of {_fmt_bytes(pred.memory_limit_bytes)} (device memory less the {plan.training.memory_reserve:.0%} "
            f"reserve): {verdict}")


def print_measured(run: MeasuredRun) -> None:
    """The plan's predicted components next to the run's measured ones, and the largest residuals."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    plan = run.plan
    times = run.time_residuals()
    table = Table(title=f"{plan.model.name} · mesh {plan.mesh} · {plan.schedule.name}: time per step, predicted vs measured")
    for col in ("pipeline rank", "component", "predicted", "measured", "measured - predicted"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for res in times:
        table.add_row(res.where.removeprefix("pipeline rank "), MEASURED_LABELS[res.what], _fmt(res.predicted),
                      _fmt(res.measured), _fmt(res.error))
    console.print(table)
    mean = sum(run.step_times_s) / len(run.step_times_s) if run.step_times_s else float("nan")
    pred = plan.predicted.step_time_s if plan.predicted else float("nan")
    console.print(f"step time: predicted {_fmt(pred)}, measured {_fmt(mean)} (mean of {len(run.step_times_s)} timed steps), "
                  f"{mean / pred - 1:+.1%}; the components are "
                  + ("of one more step, recorded" if run.recorded_steps == 1 else f"the mean of {run.recorded_steps} more steps, recorded"))
    mem = Table(title="memory per rank, predicted vs measured")
    for col in ("rank", "category", "predicted", "measured", "measured - predicted"):
        mem.add_column(col, justify="left" if col == "category" else "right")
    memory = run.memory_residuals()
    for res in memory:
        mem.add_row(res.where.removeprefix("rank "), MEMORY_LABELS[res.what], _fmt_bytes(res.predicted),
                    _fmt_bytes(res.measured), _fmt_bytes(res.error))
    console.print(mem)
    for m in run.memory:
        r = m["resident"]
        console.print(f"rank {m['rank']} holds {_fmt_bytes(r['parameters'])} of parameters, {_fmt_bytes(r['gradients'])} "
                      f"of gradients, {_fmt_bytes(r['optimizer'])} of optimizer state (measured by {m['source']})")
    if plan.predicted is not None:
        console.print(margin_line(plan))
    console.print(memory_margin(run).describe())
    worst_t = max(times, key=lambda x: abs(x.error))
    worst_m = max((x for x in memory if x.what != "peak"), key=lambda x: abs(x.error))
    console.print(f"largest time residual: {worst_t.describe()}")
    console.print(f"largest memory residual: {worst_m.describe()}")
