"""Running each plan for real under torchrun and reading back its times; see [Note: the runtime contract]."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .values import Case, CompareError, GIB, MeasureSettings, MeasuredEvent, Measurement, Row, load_case_cluster


# --------------------------------------------------------------------------------------
# Measuring (see [Note: the runtime contract])
# --------------------------------------------------------------------------------------


def check_measurable(cluster_spec: str, nodes: int | None = None, gpus_per_node: int | None = None) -> None:
    """Fail early (one line) if nothing in a case could be measured: no runtime, or a remote cluster."""
    cluster = load_case_cluster(Case(cluster=cluster_spec, nodes=nodes, gpus_per_node=gpus_per_node))
    if not runs_here(cluster):
        raise CompareError(
            f"--measure runs the plans on this machine, but --cluster {cluster_spec} is {cluster.name!r}; "
            "use --cluster local-cpu:N (N processes here), or drop --measure"
        )


def runs_here(cluster) -> bool:
    """Whether ``cluster`` is this machine's CPU processes: ``local-cpu:N``, or a file ``autopart
    calibrate`` measured from it (named ``local-cpu-calibrated``), as ``Evaluator.cpu_kernels`` reads it."""
    from ..cluster import LOCAL_CPU

    return cluster.name.startswith(LOCAL_CPU)


def measure_rows(case, cluster, captured, rows, settings, workdir, say) -> list[Row]:
    from ..cluster import Cluster

    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="autopart-compare-") if owned else workdir)
    out: list[Row] = []
    try:
        paths = save_plans(case, rows, workdir)
        logs = workdir / "measure"
        logs.mkdir(parents=True, exist_ok=True)
        machine = Cluster.local(1)  # this machine: all its CPUs and memory as one device
        done: dict[str, Measurement] = {}
        for r in rows:
            if not r.ok:
                out.append(r)
                continue
            if r.same_as is not None:  # the same plan was measured already
                out.append(replace(r, measured=done[r.same_as]))
                continue
            if not runs_here(cluster):
                m = Measurement("skipped", f"{cluster.name} is not this machine; plan for local-cpu:N to measure")
            else:
                m = _too_large(r.plan, captured, settings, machine) or run_plan(
                    case, r.method, paths[r.method], settings, logs, say
                )
            done[r.method] = m
            out.append(replace(r, measured=m))
        return out
    finally:
        # A temporary folder goes, unless a failed run's log in it is named in the table.
        if owned and not any(r.measured is not None and r.measured.status == "failed" for r in out):
            shutil.rmtree(workdir, ignore_errors=True)


def _too_large(plan, captured, settings: MeasureSettings, machine) -> Measurement | None:
    """A skip saying plainly why this plan cannot run here, or None if it can."""
    world = plan.mesh.world_size
    cpus = os.cpu_count() or 1
    if world > settings.max_world_size:
        return Measurement(
            "skipped", f"too large to measure here: {world} processes, this machine runs at most "
            f"{settings.max_world_size} ({cpus} CPUs)"
        )
    pred = plan.predicted
    if not pred.fits:
        return Measurement(
            "skipped", f"too large to measure here: needs {pred.peak_memory_bytes / GIB:.2f} GiB per process, "
            f"{pred.memory_limit_bytes / GIB:.2f} GiB allowed"
        )
    # Each rank may build the whole model before keeping its stage, so count the full weights per rank.
    weights = sum(p.bytes for p in captured.params.values())
    need = world * (weights + pred.peak_memory_bytes)
    have = machine.device.memory_bytes * settings.memory_fraction
    if need > have:
        return Measurement(
            "skipped", f"too large to measure here: about {need / GIB:.1f} GiB for {world} processes, "
            f"this machine has {machine.device.memory_bytes / GIB:.1f} GiB"
        )
    expected = pred.step_time_s * (settings.steps + settings.warmup)
    if expected > settings.timeout_s / 2:
        return Measurement(
            "skipped", f"too slow to measure here: predicted {pred.step_time_s:.1f} s per step, "
            f"{expected:.0f} s for {settings.steps + settings.warmup} steps (limit {settings.timeout_s:.0f} s)"
        )
    return None


def runtime_command(case: Case, plan_path: Path, world_size: int, settings: MeasureSettings, json_out: Path) -> list[str]:
    """The torchrun command line of [Note: the runtime contract] (``python -m torch.distributed.run`` is torchrun)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
        "-m", "partitioner.cli", "run", "--plan", str(plan_path), "--model", case.model,
    ]
    if case.config:
        cmd += ["--config", *case.config]
    if case.seq_len:  # a shared model option; only passed when the case sets it
        cmd += ["--seq-len", str(case.seq_len)]
    cmd += ["--steps", str(settings.steps), "--warmup", str(settings.warmup), "--json", str(json_out)]
    return cmd


def run_plan(case: Case, method: str, plan_path: Path, settings: MeasureSettings, logs: Path, say) -> Measurement:
    """Run the plan at ``plan_path`` once under torchrun ([Note: the runtime contract]) and read back its times.

    ``method`` names the run's files in ``logs`` (``SLUG-METHOD.json``, ``.log``): give each run of
    the same plan its own, e.g. ``ilp-2`` for a second round. A failed run is a ``failed``
    Measurement whose reason names its log; it does not raise.
    """
    from ..plan import Plan

    plan = Plan.load(plan_path)
    world = plan.mesh.world_size
    json_out = logs / f"{case.slug}-{method}.json"
    log_path = logs / f"{case.slug}-{method}.log"
    cmd = runtime_command(case, plan_path, world, settings, json_out)
    env = dict(os.environ)
    # The workers must run this autopart, whatever is installed: put its root first on the path.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    say(f"{case.title}: running the {method} plan on {world} process{'es' if world > 1 else ''}")
    json_out.unlink(missing_ok=True)  # a stale result must not pass for this run's
    started = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # Its own session, so that on a timeout the whole group (torchrun and its workers) is ended by id.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return Measurement("failed", f"the run took longer than {settings.timeout_s:.0f} s; see {log_path}", log=str(log_path))
        except BaseException:
            _end_group(proc)
            raise
    if rc != 0:
        # Rank 0 writes the JSON whole (write, then rename) after the last step; a run that exits
        # badly after that (while shutting down) was still measured, and the row says how it ended.
        if json_out.exists() and json_out.stat().st_mtime >= started:
            try:
                m = _read_run_json(json_out, settings, log_path)
                return replace(m, reason=f"the run exited {rc} after writing its results; see {log_path}")
            except CompareError:
                pass
        last = _last_line(log_path)
        return Measurement("failed", f"the run exited {rc}: {last} (log {log_path})", log=str(log_path))
    try:
        return _read_run_json(json_out, settings, log_path)
    except CompareError as exc:
        return Measurement("failed", str(exc), log=str(log_path))


def _end_group(proc: subprocess.Popen) -> None:
    """End the process group this module started (torchrun and its workers), by its id."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    """The line that says why a run failed: a rank's ``autopart: ...`` error, else the last line.

    torchrun ends a failed job with its own banner of ``=`` lines, which says nothing."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("autopart: ")]
    if ours:
        return ours[0][:300]
    plain = [ln for ln in lines if ln.strip("=-") and not ln.startswith(("[", "W1", "E1", "I1"))]
    return (plain or lines or ["(no output)"])[-1][:300]


def _read_run_json(path: Path, settings: MeasureSettings, log_path: Path) -> Measurement:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"the run wrote no {path.name}; see {log_path}") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path} is not valid JSON ({exc.msg}); see {log_path}") from None
    times = data.get("step_times_s") if isinstance(data, dict) else None
    if not isinstance(times, list) or not times or not all(isinstance(t, (int, float)) for t in times):
        raise CompareError(f"{path}: step_times_s must be a non-empty list of seconds; see {log_path}")
    if len(times) == settings.steps + settings.warmup and settings.warmup:
        times = times[settings.warmup:]
    events = []
    for e in data.get("events") or []:
        try:
            events.append(MeasuredEvent(
                int(e["rank"]), int(e["stage"]), str(e["kind"]), int(e["microbatch"]), float(e["start_s"]), float(e["end_s"])
            ))
        except (KeyError, TypeError, ValueError):
            raise CompareError(f"{path}: an event lacks rank, stage, kind, microbatch, start_s or end_s: {e!r}") from None
    return Measurement("measured", step_times_s=tuple(float(t) for t in times), events=_last_step(events), log=str(log_path))


def _last_step(events: Sequence[MeasuredEvent]) -> tuple[MeasuredEvent, ...]:
    """The last occurrence of each (rank, stage, kind, micro-batch), timed from the earliest start."""
    last: dict[tuple, MeasuredEvent] = {}
    for e in events:
        key = (e.rank, e.stage, e.kind, e.microbatch)
        if key not in last or e.start_s >= last[key].start_s:
            last[key] = e
    if not last:
        return ()
    t0 = min(e.start_s for e in last.values())
    return tuple(
        sorted((replace(e, start_s=e.start_s - t0, end_s=e.end_s - t0) for e in last.values()), key=lambda e: (e.rank, e.start_s))
    )


def save_plans(case: Case, rows: Sequence[Row], workdir: Path) -> dict[str, Path]:
    plans = workdir / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    paths = {}
    for r in rows:
        if r.ok:
            path = plans / f"{case.slug}-{r.method}.json"
            r.plan.save(path)
            paths[r.method] = path
    return paths
