"""Where a pipeline step's time goes, step by step: every action of every step recorded (issue 12).

``autopart run --json`` records the per-action events (``StepEvent``) of one extra step only, so a
residual between that step and the mean of the timed ones cannot be told apart from jitter. This
runs a plan for ``--steps`` steps with ``record=True`` on every one (the events cost two clock reads
per action) and writes, per step and rank, every action's start, end and CPU time, the step's wall
time, the thread's CPU time over the step and the components of ``RankTime``. ``--analyze`` then
splits each rank's step into: compute (the actions), gaps between actions whose input was already
there (the runtime's per-action work: ``_PipelineScheduleRuntime``'s SEND/RECV actions and the
stage's own Python), waits for an input still being computed or sent, and the tail after the last
action (gradient finishing, tied sums, optimizer, the loss's all-reduce); and it sets them against
the simulator's timeline of the same plan (the plan's predicted per-stage costs, ``simulate``).

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m benchmarks.pipeline_steps PLAN.json --steps 40 --out steps.json
    PYTHONPATH=. python -m benchmarks.pipeline_steps --analyze steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


REPLAYED = ("gpipe", "1f1b", "interleaved")  # the schedules the replay knows: F and B actions, stage s on rank s % pp


def _check_replayable(plan: dict[str, Any], where: str) -> None:
    """One line and exit unless the plan is a pipeline whose schedule the replay knows."""
    name, pp = plan["schedule"]["name"], plan["mesh"]["pp"]
    if name not in REPLAYED or pp < 2:
        raise SystemExit(f"{where}: schedule {name} on pp={pp}; this script replays pipelines (pp >= 2) of "
                         f"{', '.join(REPLAYED)} only")


def _run(plan_path: str, steps: int, warmup: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils._pytree import tree_unflatten

    from partitioner.corpus import TokenCorpus
    from partitioner.devices import leave_distributed
    from partitioner.plan import Plan
    from partitioner.planner import check_plan
    from partitioner.runtime.entry import join_process_group
    from partitioner.runtime.model import ParallelModel
    from partitioner.zoo import load_model

    plan = Plan.load(plan_path)
    _check_replayable(json.loads(Path(plan_path).read_text()), plan_path)
    source = plan.model_source(None, {}, None)
    loaded = load_model(source.spec, seq_len=source.seq_len, dtype="fp32", config=source.config, device="meta")
    model = loaded.model.train()
    plan = check_plan(plan, model, loaded.example_inputs)
    rank, world = join_process_group(None, 20.0)
    token_ids = all(not x.dtype.is_floating_point for x in loaded.example_inputs)

    def loss_fn(o: Any, y: torch.Tensor) -> torch.Tensor:
        o = getattr(o, "logits", o)
        if token_ids:
            return torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))
        return torch.nn.functional.mse_loss(o, y)

    # the optimizer the plan priced, as autopart run makes it (runtime/loop.py): SGD for "sgd", else AdamW
    opt = (lambda ps: torch.optim.SGD(ps, lr=1e-3)) if plan.training.optimizer == "sgd" else None
    pm = ParallelModel(model, plan, loaded.example_inputs, loss_fn, opt, timeout_s=20.0, init_seed=0)
    last = pm.split.stages[-1].output_specs
    probe = tree_unflatten([torch.empty(s, dtype=d, device="meta") for s, d in last], pm.split.out_spec)
    o = getattr(probe, "logits", probe)
    gb = plan.training.global_batch
    gen = torch.Generator().manual_seed(1)
    if token_ids:
        window = int(loaded.example_inputs[0].shape[1])
        corpus = TokenCorpus.make(o.shape[-1], window, None, seed=0)
        batches = [corpus.batch(i, gb, window) for i in range(4)]
        batches = [((ids,), y) for ids, y in batches]
    else:
        batches = [(tuple(torch.randn((gb, *x.shape[1:]), generator=gen) for x in loaded.example_inputs),
                    torch.randn((gb, *o.shape[1:]), generator=gen)) for _ in range(4)]
    records: list[dict[str, Any]] = []
    try:
        for i in range(warmup + steps):
            inputs, target = batches[i % 4]
            dist.barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            pm.step(*inputs, target=target, record=True)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if i >= warmup:
                # t0 on CLOCK_MONOTONIC, which the ranks of one machine share: the ranks leave the barrier
                # up to milliseconds apart, so each rank's events are moved onto rank 0's clock to compare them
                records.append(dict(t0_s=t0, wall_s=wall, thread_cpu_s=cpu, events=[asdict(e) for e in pm.events],
                                    times=asdict(pm.times)))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, records)
    finally:
        pm.close()
    if rank == 0:
        Path(out).write_text(json.dumps(dict(plan=plan_path, plan_data=plan.to_dict(), ranks=gathered)) + "\n")
        print(f"wrote {out}")
    leave_distributed()  # after a last barrier ([Note: the last barrier] in partitioner/devices.py)


def _split(events: list[dict[str, Any]], rank: int, last_stage: int) -> dict[str, float]:
    """One rank's step: compute, gaps with the input already there, waits for an input."""
    ends = {(e["stage"], e["kind"] if e["kind"] == "F" else "B", e["microbatch"]): e["end_s"] for e in events}
    mine = sorted((e for e in events if e["rank"] == rank), key=lambda e: e["start_s"])
    compute = sum(e["end_s"] - e["start_s"] for e in mine)
    cpu = sum(e["cpu_s"] for e in mine)
    gap = wait = 0.0
    free = 0.0
    for e in mine:
        s, m = e["stage"], e["microbatch"]
        dep = (s - 1, "F", m) if e["kind"] == "F" else (s + 1, "B", m)
        if e["kind"] == "F":
            ready = ends.get(dep, 0.0) if s > 0 else 0.0
        else:
            ready = ends.get(dep, 0.0) if s < last_stage else ends[(s, "F", m)]
        idle = e["start_s"] - free
        if ready > free:  # the input was still coming: the wait until it was computed elsewhere is bubble
            wait += min(idle, ready - free)
            gap += max(0.0, e["start_s"] - max(ready, free))
        else:
            gap += idle
        free = e["end_s"]
    return dict(compute=compute, compute_cpu=cpu, gaps=gap, bubble=wait, end=free, actions=len(mine))


GAP_KINDS = ("local input", "remote input, sent >1 ms before", "remote input, late")


def _input_of(stage: int, kind: str, microbatch: int, last_stage: int) -> tuple[int, str, int] | None:
    """The action whose output this one needs: the previous stage's forward, the next stage's backward;
    None for the first stage's forward and the last stage's backward (their input is the rank's own)."""
    if kind == "F":
        return (stage - 1, "F", microbatch) if stage > 0 else None
    return (stage + 1, "B", microbatch) if stage < last_stage else None


def gap_split(events: list[dict[str, Any]], pp: int, last_stage: int) -> dict[str, list[float]]:
    """The gaps between consecutive actions of each rank in one step, by where the second one's input came
    from (GAP_KINDS): the rank itself (the gap is the runtime's own work between actions); another rank,
    whose action ended over 1 ms before the gap began (the gap adds the receive of an input already sent);
    another rank later (the gap is counted from the later of the two ends: the input's delivery)."""
    ends = {(e["stage"], e["kind"], e["microbatch"]): e["end_s"] for e in events}
    out: dict[str, list[float]] = {k: [] for k in GAP_KINDS}
    for r in range(pp):
        mine = sorted((e for e in events if e["rank"] == r), key=lambda e: e["start_s"])
        for prev, e in zip(mine, mine[1:]):
            dep = _input_of(e["stage"], e["kind"], e["microbatch"], last_stage)
            if dep is None or dep[0] % pp == r:
                out[GAP_KINDS[0]].append(e["start_s"] - prev["end_s"])
            elif ends[dep] < prev["end_s"] - 1e-3:
                out[GAP_KINDS[1]].append(e["start_s"] - prev["end_s"])
            else:
                out[GAP_KINDS[2]].append(e["start_s"] - max(ends[dep], prev["end_s"]))
    return out


def _predicted(plan: dict[str, Any]) -> Any:
    from partitioner.simulate import StageCost, simulate

    costs = [StageCost(forward_s=s["predicted"]["forward_s"], backward_s=s["predicted"]["backward_s"],
                       send_s=s["predicted"]["send_s"]) for s in plan["stages"]]
    sch = plan["schedule"]
    return simulate(costs, sch["name"], sch["microbatches"], sch.get("virtual_stages", 1))


def replay(orders: list[list[tuple[int, str, int]]], dur: Any, before_s: float, send_s: list[float], pp: int,
           last_stage: int, receive_s: float = 0.0) -> float:
    """The simulator's timing model ([Note: timing model] in simulate.py) over given per-action durations,
    for the ``loop`` layout (stage ``s`` on rank ``s % pp``: GPipe, 1F1B, interleaved): rank ``r`` runs
    ``orders[r]`` (``(stage, "F" or "B", micro-batch)``) in turn, each action taking ``before_s`` (the
    runtime's per-action work) plus ``dur(action)``; an activation of stage ``s`` reaches the next rank
    ``send_s[s]`` after its forward ends, and the gradient back to stage ``s`` ``send_s[s]`` after the
    backward of ``s + 1`` ends. Returns the end of the last action.

    ``receive_s > 0`` is the rendezvous rule of the proposal in results/2026-12-05-interleave.md: of each
    ``send_s``, ``receive_s`` (the calibrated ``a_p2p``) is paid by the receiver after it posts its
    receive, whether or not the input was sent long before: ``start = max(free, end + send_s -
    receive_s) + receive_s`` for an input from another rank."""
    end: dict[tuple[int, str, int], float] = {}
    free = [0.0] * len(orders)
    pos = [0] * len(orders)
    while any(pos[r] < len(orders[r]) for r in range(len(orders))):
        moved = False
        for r, order in enumerate(orders):
            while pos[r] < len(order):
                s, k, m = order[pos[r]]
                dep = _input_of(s, k, m, last_stage) or ((s, "F", m) if k == "B" else None)
                if dep is not None and dep not in end:
                    break
                remote = dep is not None and dep[0] % pp != r
                link = send_s[dep[0] if k == "F" else s] - receive_s if remote else 0.0
                ready = 0.0 if dep is None else end[dep] + link
                start = max(free[r], ready) + (receive_s if remote else 0.0)
                end[(s, k, m)] = free[r] = start + before_s + dur((s, k, m))
                pos[r] += 1
                moved = True
        if not moved:
            stuck = [order[pos[r]] for r, order in enumerate(orders) if pos[r] < len(order)]
            raise ValueError(f"orders deadlock in the replay at {stuck}: each action's input must come first")
    return max(free)


def _on_one_clock(data: dict[str, Any]) -> None:
    """Move each rank's events (timed from its own start of the step) onto rank 0's start of the step."""
    for r, steps in enumerate(data["ranks"]):
        for i, st in enumerate(steps):
            if "t0_s" not in st:
                return  # a record of autopart run: one clock per rank, offsets unknown
            shift = st["t0_s"] - data["ranks"][0][i]["t0_s"]
            st["wall_s"] += shift  # the end of the step on rank 0's clock
            for e in st["events"]:
                e["start_s"] += shift
                e["end_s"] += shift


def _from_run_record(run: dict[str, Any], path: str) -> dict[str, Any]:
    """An ``autopart run --json`` record as one recorded step (its extra step with events and components;
    each rank on its own clock, and no thread CPU time: 0)."""
    times = run["times"]
    ranks = [[dict(wall_s=t["step_s"], thread_cpu_s=0.0, events=[e for e in run["events"] if e["rank"] == r], times=t)]
             for r, t in enumerate(times)]
    return dict(plan=f"{path} (the recorded step)", plan_data=run["plan_data"], ranks=ranks)


def _analyze(path: str) -> None:
    data = json.loads(Path(path).read_text())
    if "ranks" not in data:
        if "times" not in data or "plan_data" not in data:
            raise SystemExit(f"{path}: neither a file of this script nor an autopart run --json record with "
                             "components (run it with --json)")
        data = _from_run_record(data, path)
    _check_replayable(data["plan_data"], path)
    _on_one_clock(data)
    plan = data["plan_data"]
    pp = plan["mesh"]["pp"]
    last_stage = len(plan["stages"]) - 1
    over = plan["cluster"]["overheads"]
    sim = _predicted(plan)
    print(f"{data['plan']}: {plan['schedule']['name']}, {plan['schedule']['microbatches']} micro-batches, "
          f"predicted step {plan['predicted']['step_time_s'] * 1e3:.2f} ms, pipeline part {sim.pipeline_time_s * 1e3:.2f} ms "
          f"(action_us {over.get('action_us')}, p2p_transfer_us {over.get('p2p_transfer_us')}, "
          f"compute_slowdown {over.get('compute_slowdown')})")
    sim_events = [dict(rank=e.rank, stage=e.action.stage, kind=e.action.kind, microbatch=e.action.microbatch,
                       start_s=e.start_s, end_s=e.end_s, cpu_s=e.end_s - e.start_s) for e in sim.events]
    action_s = (over.get("action_us") or 0.0) * 1e-6
    for r in range(pp):
        p = _split(sim_events, r, last_stage)
        n = p["actions"]
        # the simulator puts action_us inside each action; the runtime's events time the stage's compute alone
        print(f"  predicted rank {r}: compute {(p['compute'] - n * action_s) * 1e3:.2f} + per-action "
              f"{n * action_s * 1e3:.2f} ms, bubble/transfer waits {(p['bubble'] + p['gaps']) * 1e3:.2f}, "
              f"last action ends {p['end'] * 1e3:.2f}")
    steps = data["ranks"][0]
    walls = [s["wall_s"] for s in steps]
    print(f"measured: {len(walls)} steps, rank 0 wall median {statistics.median(walls) * 1e3:.2f} ms, "
          f"min {min(walls) * 1e3:.2f}, max {max(walls) * 1e3:.2f}")
    rows: list[dict[str, float]] = []
    for r in range(len(data["ranks"])):
        for i, st in enumerate(data["ranks"][r]):
            if r >= pp:
                break
            events = [e for rr in range(pp) for e in data["ranks"][rr][i]["events"]]
            sp = _split(events, r, last_stage)
            t = st["times"]
            tail = st["wall_s"] - sp["end"]
            rows.append(dict(rank=r, step=i, wall=st["wall_s"], cpu=st["thread_cpu_s"], tail=tail,
                             finish=t["finish_s"], optimizer=t["optimizer_s"], other=t["other_s"], **sp))
    # Replays (the simulator's timing model) of each measured step: predicted durations; the mean
    # measured duration of each (stage, kind); each step's own measured durations. Their differences
    # split the residual into the cost model's mean error, the coupling of the durations' variation
    # (a delay on one rank propagates), and what the timing model misses in the gaps and transfers.
    nsteps = len(data["ranks"][0])
    orders = [[(e["stage"], e["kind"], e["microbatch"]) for e in sorted(data["ranks"][r][0]["events"],
                                                                   key=lambda e: e["start_s"])] for r in range(pp)]
    sim_orders = [[(e.action.stage, e.action.kind, e.action.microbatch) for e in sim.events if e.rank == r]
                  for r in range(pp)]
    print(f"  measured per-rank order equals the simulator's: {orders == sim_orders}")
    send = [st["predicted"]["send_s"] for st in plan["stages"]]
    pred = {(s, k): plan["stages"][s]["predicted"]["forward_s" if k == "F" else "backward_s"] - action_s
            for s in range(last_stage + 1) for k in "FB"}
    per_step = []
    for i in range(nsteps):
        events = {(e["stage"], e["kind"], e["microbatch"]): e for r in range(pp) for e in data["ranks"][r][i]["events"]}
        per_step.append(events)
    mean_d = {sk: statistics.fmean(ev[k]["end_s"] - ev[k]["start_s"] for ev in per_step for k in ev if (k[0], k[1]) == sk)
              for sk in pred}
    a = replay(orders, lambda k: pred[(k[0], k[1])], action_s, send, pp, last_stage)
    b = replay(orders, lambda k: mean_d[(k[0], k[1])], action_s, send, pp, last_stage)
    cs, actual = [], []
    for ev in per_step:
        cs.append(replay(orders, lambda k, ev=ev: ev[k]["end_s"] - ev[k]["start_s"], action_s, send, pp, last_stage))
        actual.append(max(e["end_s"] for e in ev.values()))
    c = statistics.fmean(cs)
    print(f"  pipeline part (end of the last action), ms: predicted durations {a * 1e3:.2f}; mean measured durations "
          f"{b * 1e3:.2f}; each step's own durations {c * 1e3:.2f} (median {statistics.median(cs) * 1e3:.2f}); "
          f"measured {statistics.fmean(actual) * 1e3:.2f} (median {statistics.median(actual) * 1e3:.2f})")
    print(f"    cost model's mean error {(b - a) * 1e3:+.2f} ms; variation's coupling {(c - b) * 1e3:+.2f} ms; "
          f"gaps and transfers beyond the model {(statistics.fmean(actual) - c) * 1e3:+.2f} ms")
    receives = sum(1 for order in orders for s_, k_, m_ in order
                   if (dep := _input_of(s_, k_, m_, last_stage)) is not None and dep[0] % pp != orders.index(order))
    print(f"    {receives} inputs from another rank a step: {(statistics.fmean(actual) - c) / receives * 1e3:+.3f} ms "
          f"beyond the model per input received")
    ratio = [x / y for x, y in zip(actual, cs)]
    if len(ratio) > 1:
            print(f"    measured / own-duration replay per step: median {statistics.median(ratio):.3f}, "
              f"quartiles {statistics.quantiles(ratio, n=4)[0]:.3f}-{statistics.quantiles(ratio, n=4)[2]:.3f}")
    # The gaps between two actions of a rank, by where the second one's input came from: the rank
    # itself (the runtime's own per-action work, priced as a_action); another rank over 1 ms before
    # (the same, plus the receive of an input already sent: gloo's send is a rendezvous, its payload
    # moves once the receiver posts its receive, which needs the sender's communication thread on a
    # core); another rank later (from the end of its action there to the start here, priced as the
    # link's send_s). Median against mean: a heavy tail of stalls.
    gaps: dict[str, list[float]] = {k: [] for k in GAP_KINDS}
    for ev in per_step:
        for k, xs in gap_split(list(ev.values()), pp, last_stage).items():
            gaps[k] += xs
    for name, xs in gaps.items():
        if len(xs) < 2:
            continue
        priced = statistics.fmean(send[:-1]) if name.endswith("late") else action_s
        print(f"  gap, {name}: {len(xs)}, median {statistics.median(xs) * 1e3:.3f} ms, mean {statistics.fmean(xs) * 1e3:.3f}, "
              f"90th percentile {statistics.quantiles(xs, n=10)[8] * 1e3:.3f}, priced {priced * 1e3:.3f}; "
              f"over 1 ms {sum(x > 1e-3 for x in xs) / len(xs):.0%}")
    tails = [st["wall_s"] - max(e["end_s"] for e in per_step[i].values()) for i, st in enumerate(steps)]
    print(f"  after the last action (gradients, tied sums, optimizer, the loss's all-reduce): predicted "
          f"{(plan['predicted']['step_time_s'] - sim.pipeline_time_s) * 1e3:.2f} ms, measured on rank 0 median "
          f"{statistics.median(tails) * 1e3:.2f}, mean {statistics.fmean(tails) * 1e3:.2f}")
    print(f"  rank 0 step wall: mean {statistics.fmean(walls) * 1e3:.2f} ms, median {statistics.median(walls) * 1e3:.2f}; "
          f"predicted {plan['predicted']['step_time_s'] * 1e3:.2f}")
    keys = ("wall", "cpu", "compute", "compute_cpu", "gaps", "bubble", "end", "tail", "optimizer", "other")
    for r in range(pp):
        mine = [x for x in rows if x["rank"] == r]
        med = {k: statistics.median(x[k] for x in mine) * 1e3 for k in keys}
        print(f"  rank {r} medians (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
              + f"; per gap {med['gaps'] / mine[0]['actions']:.3f}")
    # Which part grows in slow steps: each part's correlation with the step's wall time.
    for r in range(pp if nsteps > 2 else 0):
        mine = [x for x in rows if x["rank"] == r]
        w = [x["wall"] for x in mine]
        parts = {k: [x[k] for x in mine] for k in ("compute", "gaps", "bubble", "tail")}
        spread = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) * 1e3 for k, v in parts.items()}
        corr = {k: statistics.correlation(v, w) for k, v in parts.items()}
        print(f"  rank {r}: interquartile range (ms) " + ", ".join(f"{k} {v:.2f}" for k, v in spread.items())
              + "; correlation with wall " + ", ".join(f"{k} {v:+.2f}" for k, v in corr.items()))
        wall_minus_cpu = [x["wall"] - x["cpu"] for x in mine]
        print(f"  rank {r}: wall - thread CPU over the step median {statistics.median(wall_minus_cpu) * 1e3:.2f} ms; "
              f"action wall - action CPU median {statistics.median(x['compute'] - x['compute_cpu'] for x in mine) * 1e3:.2f} ms")


def what_if_rendezvous(paths: list[str]) -> None:
    """For ``autopart run --json`` records: each plan's predicted step with every receive paying its
    ``a_p2p`` after it is posted (``replay(receive_s=...)``), against the measured mean step. An offline
    estimate with the calibration's ``a_p2p`` as it was fitted (under today's rule), not a refit."""
    print("| record | a_p2p | predicted step | with the rendezvous rule | measured mean | error | error with the rule |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        run = json.loads(Path(path).read_text())
        if "plan_data" not in run or "step_times_s" not in run:
            raise SystemExit(f"{path}: not an autopart run --json record with its plan (run it with --json)")
        plan = run["plan_data"]
        _check_replayable(plan, path)
        pp, stages, sch = plan["mesh"]["pp"], plan["stages"], plan["schedule"]
        sim = _predicted(plan)
        orders = [[(e.action.stage, e.action.kind, e.action.microbatch) for e in sim.events if e.rank == r]
                  for r in range(pp)]

        def dur(a: tuple[int, str, int]) -> float:
            return stages[a[0]]["predicted"]["forward_s" if a[1] == "F" else "backward_s"]

        send = [st["predicted"]["send_s"] for st in stages]
        h = (plan["cluster"]["overheads"].get("p2p_transfer_us") or 0.0) * 1e-6
        with_rule = plan["predicted"]["step_time_s"] + replay(orders, dur, 0.0, send, pp, len(stages) - 1, h) \
            - sim.pipeline_time_s
        pred, mean = plan["predicted"]["step_time_s"], statistics.fmean(run["step_times_s"])
        print(f"| {path} ({sch['name']}) | {h * 1e6:.0f} us | {pred * 1e3:.1f} ms | {with_rule * 1e3:.1f} ms | "
              f"{mean * 1e3:.1f} ms | {pred / mean - 1:+.1%} | {with_rule / mean - 1:+.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", nargs="?")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="pipeline_steps.json")
    ap.add_argument("--analyze", help="a file this script wrote: print the split")
    ap.add_argument("--what-if-rendezvous", nargs="+", metavar="RUN_JSON",
                    help="autopart run --json records: each plan's step with every receive paying a_p2p")
    args = ap.parse_args()
    if args.what_if_rendezvous:
        missing = [p for p in args.what_if_rendezvous if not Path(p).is_file()]
        if missing:
            ap.error(f"--what-if-rendezvous {missing[0]}: no such file")
        what_if_rendezvous(args.what_if_rendezvous)
    elif args.analyze:
        if not Path(args.analyze).is_file():
            ap.error(f"--analyze {args.analyze}: no such file; give a file this script wrote with --out")
        _analyze(args.analyze)
    elif args.plan:
        if not Path(args.plan).is_file():
            ap.error(f"plan {args.plan}: no such file; give a plan JSON (autopart plan --out)")
        if "RANK" not in os.environ:
            ap.error("run it under torchrun: python -m torch.distributed.run --standalone --nproc-per-node PP "
                     "-m benchmarks.pipeline_steps PLAN.json")
        _run(args.plan, args.steps, args.warmup, args.out)
    else:
        ap.error("give a plan to run, or --analyze FILE")


if __name__ == "__main__":
    main()
