"""Why a plan is what it is: step-time breakdown, bottleneck, memory headroom, runner-up; and plan diffs.

``breakdown`` reads the step-time components the plan stores per stage
(``StageComponents``, computed by the evaluator from the simulation when the
plan was made) and sums them over the bottleneck rank: forward, backward and
recomputation compute, tensor-parallel collectives, waiting on point-to-point
transfers, the exposed data-parallel reduction, and the pipeline bubble. They
add up to the step time; nothing is recomputed here. ``autopart plan
--explain`` prints it with the rest; ``autopart diff`` compares two plan files
side by side.
"""

from __future__ import annotations

from typing import Any

from .errors import PlanError
from .plan import Plan
from .schedules import spec as schedule_spec, stage_rank

__all__ = ["breakdown", "print_explanation", "print_diff"]

GIB = 1 << 30
COMPONENTS = ("forward", "backward", "recompute", "tp_comm", "p2p", "dp_reduce", "dp_gather", "bubble")
LABELS = {
    "forward": "forward compute",
    "backward": "backward compute",
    "recompute": "recomputation",
    "tp_comm": "tensor-parallel communication",
    "p2p": "pipeline transfers (waiting)",
    "dp_reduce": "data-parallel reduction (exposed)",
    "dp_gather": "ZeRO-2/3 gathers and scatters (exposed)",
    "bubble": "pipeline bubble",
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
        table.add_row(LABELS[k], _fmt(parts[k]), f"{parts[k] / step:.1%}" if step else "")
    table.add_row("step time", _fmt(step), "100%")
    console.print(table)
    r = int(parts["bottleneck_rank"])
    layout = schedule_spec(plan.schedule.name).layout
    stages = [st for st in plan.stages if stage_rank(st.index, plan.mesh.pp, layout) == r]
    console.print(
        f"bottleneck: pipeline rank {r} (stage{'s' if len(stages) > 1 else ''} "
        f"{', '.join(str(s.index) for s in stages)}: {', '.join(m for s in stages for m in s.modules[:3])}"
        f"{' ...' if sum(len(s.modules) for s in stages) > 3 else ''})"
    )
    mem = Table(title="memory per device")
    for col in ("stage", "static", "activations", "peak", "headroom"):
        mem.add_column(col, justify="right")
    limit = plan.predicted.memory_limit_bytes
    for st in plan.stages:
        sp = st.predicted
        mem.add_row(
            str(st.index), f"{sp.static_bytes / GIB:.2f} GiB", f"{sp.activation_bytes / GIB:.2f} GiB",
            f"{sp.memory_bytes / GIB:.2f} GiB", f"{(limit - sp.memory_bytes) / GIB:.2f} GiB",
        )
    console.print(mem)
    evaluator = getattr(result, "evaluator", None)
    if evaluator is not None and plan.training.dp_sharding != "none" and plan.mesh.dp > 1:
        console.print(dp_sharding_summary(plan, evaluator))
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
            _, _, _, per_mb = ev.fsdp_costs(blocks, plan.mesh, r, split, 0.0, 0.0, st.recompute)  # all collectives
            total += per_mb * plan.schedule.microbatches
            exposed += st.predicted.components.dp_gather_s
        hidden = 1 - exposed / total if total > 0 else 1.0
        text += (f"; it costs {_fmt(total)} of all-gathers and reduce-scatters per step on pipeline rank {r}, "
                 f"{hidden:.0%} hidden behind compute")
    return text


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
    row("recomputing stages", sum(s.recompute for s in a.stages), sum(s.recompute for s in b.stages))
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
