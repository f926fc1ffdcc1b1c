"""Why a plan is what it is: step-time breakdown, bottleneck, memory headroom, runner-up; and plan diffs.

``breakdown`` splits a plan's simulated step time into the parts a person
tunes: compute and tensor-parallel communication on the bottleneck rank, the
pipeline bubble, point-to-point transfers, and the exposed data-parallel
reduction. They add up to the step time. ``autopart plan --explain`` prints
it with the rest; ``autopart diff`` compares two plan files side by side.
"""

from __future__ import annotations

from typing import Any

from .plan import Plan
from .schedules import spec as schedule_spec, stage_rank

__all__ = ["breakdown", "print_explanation", "print_diff"]

GIB = 1 << 30
COMPONENTS = ("compute", "tp_comm", "bubble", "pp_comm", "dp_comm")
LABELS = {
    "compute": "compute (bottleneck rank)",
    "tp_comm": "tensor-parallel communication",
    "bubble": "pipeline bubble",
    "pp_comm": "pipeline communication",
    "dp_comm": "data-parallel reduction (exposed)",
}


def breakdown(plan: Plan, ev: Any) -> dict[str, float]:
    """Seconds per step by component, summing to the plan's simulated step time.

    With ``r*`` the busiest rank: compute and tp_comm are its per-micro-batch
    figures times ``M``; pp_comm is one forward and one backward transfer per
    cut (the fill and drain path); dp_comm is what the reduction adds after
    the pipeline (the simulator's exposed part, not the whole reduction); the
    bubble is what remains: time the bottleneck rank waits.
    """
    m = plan.schedule.microbatches
    pp = plan.mesh.pp
    mbs = plan.schedule.micro_batch_size
    sharding = plan.sharding
    per_rank_compute = [0.0] * pp
    per_rank_tp = [0.0] * pp
    layout = schedule_spec(plan.schedule.name).layout
    for st in plan.stages:
        r = stage_rank(st.index, pp, layout)
        for name in st.modules:
            cost = ev.block_cost(ev.pgraph.blocks[ev.pgraph.block_index(name)], mbs, plan.mesh.tp, sharding)
            c = cost.compute.forward_s + cost.compute.backward_s
            t = cost.tp_comm.forward_s + cost.tp_comm.backward_s
            if st.recompute:  # the forward runs again in backward
                c += cost.compute.forward_s
                t += cost.tp_comm.forward_s
            per_rank_compute[r] += c
            per_rank_tp[r] += t
    busiest = max(range(pp), key=lambda r: (per_rank_compute[r] + per_rank_tp[r], -r))
    pred = plan.predicted
    step = pred.step_time_s
    sends = sum(st.predicted.send_s for st in plan.stages[:-1])
    compute = m * per_rank_compute[busiest]
    tp_comm = m * per_rank_tp[busiest]
    # The simulator's pipeline time (forward/backward only) follows from its bubble fraction,
    # 1 - sum(busy) / (pp * pipeline); the rest of the step is the exposed reduction. A rank's
    # reduction that overlaps its last backward is not exposed, so it must not be counted.
    total_busy = sum(st.predicted.busy_s for st in plan.stages)
    if total_busy > 0 and pred.bubble_fraction < 1:
        pipeline = min(step, total_busy / (pp * (1 - pred.bubble_fraction)))
        dp = step - pipeline
    else:  # nothing ran: fall back to the largest reduction as the exposed part
        dp_reduce = max((st.predicted.dp_reduce_s for st in plan.stages), default=0.0)
        dp = min(dp_reduce, max(0.0, step - compute - tp_comm))
        pipeline = step - dp
    pp_comm = min(2 * sends, max(0.0, pipeline - compute - tp_comm))
    bubble = max(0.0, pipeline - compute - tp_comm - pp_comm)
    # Whatever the simple model cannot place (rounding, a bubble-free fallback) goes to the reduction line.
    dp = max(0.0, step - compute - tp_comm - pp_comm - bubble)
    return {"compute": compute, "tp_comm": tp_comm, "bubble": bubble, "pp_comm": pp_comm, "dp_comm": dp,
            "bottleneck_rank": float(busiest)}


def _fmt(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if abs(s) < 1 else f"{s:.3f} s"


def print_explanation(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    plan, ev = result.plan, result.evaluator
    console = Console(width=max(100, Console().width))
    parts = breakdown(plan, ev)
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
    stages = [st for st in plan.stages if st.index % plan.mesh.pp == r]
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
    report = getattr(result, "report", None)
    if report is not None:
        console.print(
            f"search: {report.candidates} candidates, {report.pruned_memory} dropped for memory, "
            f"{report.pruned_bound} pruned by the lower bound, {len(report.attempts)} solved with CP-SAT "
            f"({report.sharding_solves} block-sharding solves); bound {_fmt(report.bound_s)}, gap {report.gap:.1%}"
        )
        runner = report.runner_up(plan)
        if runner is not None:
            other = breakdown(runner.plan, ev)
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
    row("sharded nodes", len(a.sharding), len(b.sharding))
    if a.predicted and b.predicted:
        pa, pb = a.predicted, b.predicted
        row("step time (s)", round(pa.step_time_s, 6), round(pb.step_time_s, 6), True)
        row("samples/s", round(pa.samples_per_s, 2), round(pb.samples_per_s, 2), True)
        row("MFU", round(pa.mfu, 4), round(pb.mfu, 4), True)
        row("bubble", round(pa.bubble_fraction, 4), round(pb.bubble_fraction, 4))
        row("peak memory (GiB)", round(pa.peak_memory_bytes / GIB, 2), round(pb.peak_memory_bytes / GIB, 2), True)
        row("fits", pa.fits, pb.fits)
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
