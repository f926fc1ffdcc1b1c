"""The ``autopart`` command line: ``plan``, ``explain``, ``show``, ``diff``, ``inspect``, ``compare``, ``profile``, ``calibrate`` and ``run``.

A thin layer over the Python API: it parses options, calls
``plan_parallelism`` / ``capture``, and prints with ``rich``. Every option
has the same meaning in every subcommand and is also a keyword of the Python
API. Errors in the user's input (``AutopartError``) are printed on one line
with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .cluster import default_dtype, tp_degrees
from .dp_sharding import DP_SHARDINGS
from .errors import AutopartError, CaptureError, PlanError, one_line
from .fmt import fmt_bytes, fmt_time
from .progress import Progress
from .schedules import SCHEDULES

if TYPE_CHECKING:
    from .plan import Plan

GIB = 1 << 30
DEFAULT_MODEL = "gpt2"
DEFAULT_CLUSTER = "dgx-a100-80g"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"autopart: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _chunk_count(text: str) -> int | str:
    """``--vocab-chunks``: a count >= 1, or ``auto`` (``autopart plan`` tries several)."""
    return "auto" if text == "auto" else _positive_int(text)


AUTO_CHUNKS = (1, 2, 4, 8)  # what --vocab-chunks auto tries ([Note: vocabulary chunks] in vocab_split.py)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds > 0")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"zoo name, hf:ClassName or py:module:function (default {DEFAULT_MODEL}; with --plan, the plan's)")
    g.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE", help="model config overrides, e.g. n_layer=4")
    g.add_argument("--seq-len", type=_positive_int, default=None, help="sequence length (default: the model's)")
    g.add_argument("--vocab-chunks", type=_chunk_count, default=1, metavar="K",
                   help="split the output head's vocabulary, and the loss, into K blocks the planner may put on "
                        "different stages (default 1: the head is one block; with --plan, the plan's); plan takes "
                        "auto: it tries 1, 2, 4 and 8 and keeps the fastest plan")
    g.add_argument("--dtype", default=None, choices=("fp32", "tf32", "bf16", "fp16", "fp8"), help="compute dtype (default bf16; fp32 on a device without bf16, such as local-cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (it is shown only on a terminal anyway)")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", default=DEFAULT_CLUSTER,
                   help=f"preset name, local-cpu:N (N processes on this machine, gloo) or TOML file (default {DEFAULT_CLUSTER})")
    g.add_argument("--nodes", type=_positive_int, default=None, help="number of nodes (overrides the cluster's)")
    g.add_argument("--gpus-per-node", type=_positive_int, default=None, help="devices per node (overrides the cluster's)")


def _profile_args(p: argparse.ArgumentParser, *, flag: bool) -> None:
    from .profile import PROFILED_SIZES

    g = p.add_argument_group("profile")
    if flag:
        g.add_argument("--profile", action="store_true", help="measure the model on this machine and plan with measured costs")
        g.add_argument("--profile-sizes", type=_positive_int, default=None, metavar="N",
                       help=f"measure at up to N micro-batch sizes the plan may use, the capture batch's among them "
                            f"(default {PROFILED_SIZES}; 1: the capture batch only, others scaled from it)")
    g.add_argument("--device", default=None, help="where to measure: cpu (default) or cuda")
    g.add_argument("--cache", default=None, metavar="PATH", help="profile cache file (default $AUTOPART_CACHE or ~/.cache/autopart/profile.sqlite)")
    g.add_argument("--profile-budget", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="stop measuring after this long; the calibrated model prices the rest")


def _nproc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc-per-node", type=_positive_int, default=None, metavar="N",
                   help="start N ranks on this machine yourself (instead of torchrun); a failure is one line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autopart", description="Automatic pipeline/tensor/data-parallel planning for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("plan", help="plan a model on a cluster and print the plan")
    _common(p)
    _cluster_args(p)
    g = p.add_argument_group("plan")
    g.add_argument(
        "--method", default=None,
        help="ilp | uniform | params | pipedream | megatron | manual (default ilp; manual with --split-at)",
    )
    g.add_argument("--time-limit", type=_positive_seconds, default=None, help="seconds the ILP planner may search (default 30)")
    g.add_argument("--explain", action="store_true", help="explain the plan: step-time breakdown, bottleneck, memory, runner-up")
    g.add_argument("--global-batch", type=_positive_int, default=None, help="samples per step (default 8 per device)")
    g.add_argument("--mesh", default=None, metavar="pp=..,tp=..,dp=..", help="pin mesh axes, any subset")
    g.add_argument("--microbatches", type=_positive_int, default=None, help="micro-batches per step per replica")
    g.add_argument("--schedule", default=None, choices=SCHEDULES, help=" | ".join(SCHEDULES))
    g.add_argument("--virtual-stages", type=_positive_int, default=None,
                   help="stages per rank (interleaved, zb: any; zbv, dualpipev: 2)")
    g.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None, help="activation recomputation")
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="sequence parallelism with tp: on gives the baselines Megatron's layout with it, off keeps it "
                        "out of the ILP and the baselines (default: the ILP chooses per node, the baselines try both)")
    g.add_argument("--split-at", default=None, metavar="MODULE[,MODULE..]", help="hand-written plan: stages begin at these modules")
    g.add_argument("--plan", dest="plan_file", default=None, metavar="PATH", help="check and simulate a plan JSON file")
    g.add_argument("--optimizer", default=None, choices=("adam-mixed", "adam", "sgd"), help="adam-mixed | adam | sgd (default adam-mixed)")
    g.add_argument("--zero1", action="store_true", help="shard optimizer state over data-parallel ranks")
    g.add_argument("--dp-sharding", choices=DP_SHARDINGS, default=None,
                   help="the least that is sharded over dp: none (DDP), zero1, zero2, zero3, hsdp; the search may shard more")
    g.add_argument("--memory-reserve", type=_fraction, default=None, help="fraction of device memory kept free, in [0, 1) (default 0.1)")
    g.add_argument("--json", default=None, metavar="PATH", help="write the plan artifact to PATH")
    g.add_argument("--force", action="store_true", help="let --json overwrite an existing file")
    g.add_argument("--timeline", action="store_true", help="print the simulated schedule as a text grid")
    _profile_args(p, flag=True)

    p = sub.add_parser("profile", help="measure a model's blocks and ops on this machine; --report compares with predictions")
    _common(p)
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", default=None, help="cluster whose predictions --report shows (default local-cpu, or the GPU's preset)")
    g.add_argument("--nodes", type=_positive_int, default=None, help="number of nodes (overrides the cluster's)")
    g.add_argument("--gpus-per-node", type=_positive_int, default=None, help="devices per node (overrides the cluster's)")
    _profile_args(p, flag=False)
    g = p.add_argument_group("output")
    g.add_argument("--tp", default=None, metavar="N[,N..]", help="also measure the tensor-parallel shards of these degrees")
    g.add_argument("--report", action="store_true", help="per block: analytic and calibrated predictions vs measured, and the error")
    g.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="wall time (default), or process CPU time on a shared machine (one thread)")
    g.add_argument("--json", default=None, metavar="PATH", help="write the measurements and the report to PATH")
    g.add_argument("--force", action="store_true", help="let --json overwrite an existing file")

    p = sub.add_parser("calibrate", help="with --nproc-per-node N (or under torchrun): measure links and device rates, write a cluster TOML")
    p.add_argument("--cluster", default=None, help="the cluster to start from (default local-cpu:<ranks per node>)")
    p.add_argument("--out", required=True, metavar="PATH", help="the cluster TOML to write")
    p.add_argument("--force", action="store_true", help="let --out overwrite an existing file")
    p.add_argument("--dtype", default=None, choices=("fp32", "tf32", "bf16", "fp16"), help="dtype of the GEMM timed (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--max-bytes", type=_positive_int, default=16 << 20, help="largest message, bytes per rank (default 16 MiB)")
    p.add_argument("--reps", type=_positive_int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("--passes", type=_positive_int, default=None, metavar="N",
                   help="whole measurement passes, each figure their median (default 3; about 10 s a pass on a "
                        "2-core CPU): a pass that caught a slow moment of the machine is outvoted")
    _nproc_arg(p)

    p = sub.add_parser("explain", help="explain a saved plan: step-time breakdown, bottleneck, memory; "
                       "or a run's measurements against its plan (--measured)")
    p.add_argument("plan_file", metavar="PLAN.json", nargs="?", default=None)
    p.add_argument("--measured", default=None, metavar="RUN.json",
                   help="the --json of `autopart run`: its plan's predicted components against the measured ones")
    _common(p)
    _profile_args(p, flag=True)  # --profile: price the plan on measured costs, as `plan --profile` made it
    p = sub.add_parser("show", help="print a saved plan in full: mesh, schedule, every stage's modules, the model it needs")
    p.add_argument("plan_file", metavar="PLAN.json")

    p = sub.add_parser("diff", help="compare two plan JSON files")
    p.add_argument("a", metavar="A.json")
    p.add_argument("b", metavar="B.json")

    p = sub.add_parser("compare", help="plan with every method side by side; tables, pictures, report")
    _common(p)
    _cluster_args(p)
    g = p.add_argument_group("compare")
    g.add_argument("--methods", default=None, metavar="M[,M..]",
                   help="methods to compare, e.g. ilp,uniform,megatron (default: ilp and every baseline)")
    g.add_argument("--time-limit", type=_positive_seconds, default=None, help="seconds the ILP planner may search (default 30)")
    g.add_argument("--global-batch", type=_positive_int, default=None, help="samples per step (default 8 per device)")
    g.add_argument("--mesh", default=None, metavar="pp=..,tp=..,dp=..", help="pin mesh axes for every method, any subset")
    g.add_argument("--microbatches", type=_positive_int, default=None, help="micro-batches per step per replica")
    g.add_argument("--schedule", default=None, choices=SCHEDULES, help=" | ".join(SCHEDULES))
    g.add_argument("--virtual-stages", type=_positive_int, default=None,
                   help="stages per rank (interleaved, zb: any; zbv, dualpipev: 2)")
    g.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None, help="activation recomputation")
    g.add_argument("--optimizer", default=None, choices=("adam-mixed", "adam", "sgd"), help="adam-mixed | adam | sgd (default adam-mixed)")
    g.add_argument("--zero1", action="store_true", help="shard optimizer state over data-parallel ranks")
    g.add_argument("--memory-reserve", type=_fraction, default=None, help="fraction of device memory kept free, in [0, 1) (default 0.1)")
    g.add_argument("--measure", action="store_true", help="also run each plan here under torchrun (needs --cluster local-cpu:N)")
    g.add_argument("--steps", type=_positive_int, default=5, help="measured steps per plan with --measure (default 5)")
    g.add_argument("--warmup", type=int, default=2, help="unmeasured warm-up steps before them (default 2)")
    g.add_argument("--out", default=None, metavar="DIR", help="write report.md, results.json, plans and pictures to DIR")
    g.add_argument("--force", action="store_true", help="let --out write into a non-empty directory")
    _profile_args(p, flag=True)

    p = sub.add_parser("run", help="train a plan for N steps (--nproc-per-node N, or under torchrun); print step times and losses")
    _common(p)
    g = p.add_argument_group("run")
    g.add_argument("--plan", dest="plan_file", required=True, metavar="PATH", help="the plan JSON to run")
    g.add_argument("--steps", type=_positive_int, default=10, help="measured training steps (default 10)")
    g.add_argument("--warmup", type=int, default=1, help="steps run before measuring (default 1)")
    g.add_argument("--json", default=None, metavar="PATH", help="rank 0 writes step times, losses and events to PATH")
    g.add_argument("--force", action="store_true", help="let --json overwrite an existing file")
    g.add_argument("--seed", type=int, default=0, help="seed for the weights and the synthetic corpus")
    g.add_argument("--data", default=None, metavar="PATH", help="train on these token ids (.bin of uint16, or .pt 1-D tensor) "
                   "instead of the fixed synthetic corpus")
    _nproc_arg(p)

    p = sub.add_parser("inspect", help="print the blocks of a model: params, FLOPs, activations")
    _common(p)
    p.add_argument("--list", action="store_true", help="list the built-in models and cluster presets")
    p.add_argument("--nodes-table", action="store_true", help="also print every graph node (long)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed on one line
        return exc.code if isinstance(exc.code, int) else 0
    if getattr(args, "model", "") is None and args.command not in ("plan", "run", "explain"):  # they take the plan's
        args.model = DEFAULT_MODEL
    try:
        if getattr(args, "nproc_per_node", None) is not None:
            launched = _launch(args, argv)
            if launched is not None:
                return launched
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "compare":
            return cmd_compare(args, argv)
        if args.command == "profile":
            return cmd_profile(args)
        if args.command == "calibrate":
            return cmd_calibrate(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "show":
            return cmd_show(args)
        if args.command == "diff":
            from .explain import print_diff
            from .plan import Plan

            print_diff(Plan.load(args.a), Plan.load(args.b), args.a, args.b)
            return 0
    except AutopartError as exc:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: once per job, named in torchrun's summary
            from .watchdog import report

            report(exc)
        else:
            print(f"autopart: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .watchdog import under_autopart_launcher

        if not under_autopart_launcher():  # else the launcher says it, once
            print("autopart: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in autopart, not the user's input: one line, the details on request
        if os.environ.get("AUTOPART_DEBUG"):
            raise
        from .watchdog import record_error, under_autopart_launcher

        line = (f"autopart: internal error: {one_line(exc)} "
                "(set AUTOPART_DEBUG=1 for the traceback and please report it)")
        if under_autopart_launcher():  # the launcher prints it ([Note: one line per failed job] in launch.py)
            record_error(line, primary=True)
        else:
            print(line, file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """The command line's entry point (the ``autopart`` script, ``python -m partitioner``, ``python -m
    partitioner.cli``): exit with ``main``'s status.

    [Note: leaving a rank without teardown]
    A rank under torchrun (``autopart run`` and ``calibrate``, or any command torchrun starts) leaves by
    ``os._exit`` once its output is flushed: its work is done (results written, the process group
    destroyed), and CPython's teardown is where gloo's threads could still free Python objects after the
    interpreter began to finalize; such a thread cannot take the GIL and the rank aborts ("terminate
    called without an active exception"), failing a job that had succeeded. [Note: the last barrier] in
    devices.py closed one such path; the docs test met another once (the guide's ``autopart run``
    on two ranks, rank 0 aborted after its steps, in a fresh-clone CI run on 2026-12-06; 0 of 27 runs of
    the same command here reproduced it, with or without a busy core beside). Skipping teardown skips the
    race. ``main`` itself returns, for callers in-process."""
    from .watchdog import under_launcher

    code = main()
    if under_launcher():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def _launch(args: argparse.Namespace, argv: Sequence[str] | None) -> int | None:
    """``--nproc-per-node N`` outside torchrun: start N ranks of this same command here (launch.py) and
    return the job's exit status. Under torchrun (a rank already) return None: the rank runs the command."""
    from .launch import launch_local, strip_nproc
    from .watchdog import DistributedError

    n = args.nproc_per_node
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
        if local != n:
            raise DistributedError(f"--nproc-per-node {n}, but this job's launcher started {local} ranks on this "
                                   "node; leave --nproc-per-node out under torchrun")
        return None
    stages_of = None
    if args.command == "run":
        from .plan import Plan

        plan = Plan.load(args.plan_file)  # a bad plan is refused here, before any rank starts
        if plan.mesh.world_size != n:
            raise DistributedError(
                f"plan mesh {plan.mesh} needs {plan.mesh.world_size} ranks but --nproc-per-node {n} starts {n}; "
                f"pass --nproc-per-node {plan.mesh.world_size}, or re-plan for {n} ranks (--cluster local-cpu:{n})"
            )
        stages_of = plan.stages_label
    return launch_local(n, strip_nproc(sys.argv[1:] if argv is None else argv), stages_of)


# --------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from .cluster import load_cluster
    from .plan import Mesh, ModelSource, Plan
    from .zoo import load_model

    from .planner import ALL_METHODS as METHODS

    args.method_given = args.method
    if args.method is None:
        args.method = "manual" if args.split_at else "ilp"
    if args.method not in METHODS and not args.plan_file:  # before the slow capture
        import difflib

        near = difflib.get_close_matches(args.method, METHODS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PlanError(f"--method {args.method!r} is not one of {', '.join(METHODS)}{hint}")
    json_path = _check_out(args.json, args.force, "--json", "plan.json")  # before the (possibly long) planning
    plan_in = None
    if args.plan_file:
        plan_in = Plan.load(args.plan_file)
        clash = [flag for flag, value in (
            ("--mesh", args.mesh), ("--split-at", args.split_at), ("--microbatches", args.microbatches),
            ("--schedule", args.schedule), ("--virtual-stages", args.virtual_stages), ("--recompute", args.recompute),
            ("--sequence-parallel", args.sequence_parallel),
            ("--global-batch", args.global_batch), ("--zero1", args.zero1 or None), ("--dp-sharding", args.dp_sharding),
            ("--optimizer", args.optimizer),
            ("--memory-reserve", args.memory_reserve), ("--dtype", args.dtype), ("--method", args.method_given),
            ("--time-limit", args.time_limit),
        ) if value is not None]
        if clash:
            raise PlanError(f"--plan takes every choice from the plan file; drop {', '.join(clash)} or edit the file")
    _check_profile_flags(args)
    cluster = load_cluster(args.cluster, nodes=args.nodes, devices_per_node=args.gpus_per_node)
    if args.profile:  # before the slow capture: measured costs must describe the cluster's devices
        from .profile import check_device

        check_device(cluster, args.device or "cpu")
    dtype = plan_in.training.dtype if plan_in else (args.dtype or default_dtype(cluster))
    if dtype not in cluster.device.peak_flops:
        raise PlanError(
            f"--dtype {dtype}: {cluster.device.name} has no {dtype} peak; it has {', '.join(cluster.device.peak_flops)}"
        )
    pins = Mesh.parse(args.mesh) if args.mesh else {}
    source = _model_source(args, plan_in)
    loaded = load_model(source.spec, seq_len=source.seq_len, dtype=dtype, config=source.config)
    source = ModelSource(source.spec, source.config, loaded.seq_len)  # the sequence length it was built with
    if plan_in is not None:  # before the slow capture, naming the flags that differ from the plan's
        from .capture import model_fingerprint

        plan_in.check_matches(model_fingerprint(loaded.model), given=source)
    global_batch = args.global_batch or 8 * cluster.world_size
    training = dict(
        dtype=dtype,
        optimizer=args.optimizer or "adam-mixed",
        zero1=args.zero1,
        dp_sharding=args.dp_sharding,
        memory_reserve=0.1 if args.memory_reserve is None else args.memory_reserve,
        name=loaded.name,
        example_kwargs=loaded.example_kwargs,
    )
    show = False if args.quiet else None  # progress on stderr when it is a terminal
    sizes = _sizes_to_profile(args, plan_in, loaded, cluster, pins, global_batch) if args.profile else ()
    result, tried = None, []
    for chunks in _chunk_counts(args, plan_in, loaded):
        try:
            model = _captured(loaded, show, chunks)
        except CaptureError as exc:
            if not tried:  # the head whole failed: nothing to compare with
                raise
            tried.append(f"{chunks}: not possible ({str(exc).splitlines()[0]})")
            break  # a model that cannot be chunked cannot be chunked more
        priced = dict(training)
        if args.profile:
            priced["cost_model"] = _profiled(args, model, cluster, dtype, pins.get("tp"), show, loaded, sizes)
        with Progress(show) as progress:
            progress.phase("search" if args.method == "ilp" and plan_in is None else "plan", detail=args.method)
            got = _plan_or_score(args, plan_in, model, loaded, cluster, pins, global_batch, priced, progress)
        tried.append(f"{chunks}: {got.plan.predicted.step_time_s * 1e3:.1f} ms")
        if result is None or got.plan.predicted.step_time_s < result.plan.predicted.step_time_s:  # ties: fewer
            result = got
    plan_out = result.plan.with_source(source)
    if args.vocab_chunks == "auto":
        print(f"vocabulary chunks tried (predicted step): {'; '.join(tried)}; kept {plan_out.model.vocab_chunks}")
    print_plan(result, cluster)
    if args.explain:
        from .explain import print_explanation

        print_explanation(result)
    if args.timeline:
        print(result.sim.grid())
    note = repriced_note(plan_in, result.plan, args.plan_file, profiled=args.profile) if plan_in is not None else ""
    if note:
        print(note)
    if json_path is not None:
        plan_out.save(json_path)
        print(f"wrote {json_path}")
    return 0


def _captured(loaded, show: bool | None, vocab_chunks: int = 1):
    """Capture and coarsen ``loaded`` (the ``capture`` phase, with progress): its ``PartitionGraph``, the
    head's vocabulary in ``vocab_chunks`` blocks."""
    from .capture import capture
    from .graph import build_partition_graph

    with Progress(show) as progress:
        progress.phase("capture", detail=loaded.name)
        cap = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs, name=loaded.name,
                      batch_size=loaded.batch_size, vocab_chunks=vocab_chunks)
        return build_partition_graph(cap, loaded.model)


def _plan_or_score(args, plan_in, model, loaded, cluster, pins, global_batch, training, progress):
    """``plan``'s search (or, with ``--plan``, the re-scoring of the given plan)."""
    from .planner import plan_parallelism, score_plan

    if plan_in is not None:
        return score_plan(
            plan_in, model, loaded.example_inputs, cluster, name=loaded.name, batch_size=loaded.batch_size,
            example_kwargs=loaded.example_kwargs, cost_model=training.get("cost_model"),
        )
    return plan_parallelism(
        model,
        loaded.example_inputs,
        cluster,
        global_batch=global_batch,
        method=args.method,
        pp=pins.get("pp"),
        tp=pins.get("tp"),
        dp=pins.get("dp"),
        microbatches=args.microbatches,
        schedule=args.schedule,
        virtual_stages=args.virtual_stages,
        recompute=args.recompute,
        split_at=[s for s in args.split_at.split(",") if s] if args.split_at else None,
        sequence_parallel=args.sequence_parallel,
        time_limit_s=args.time_limit or 30.0,
        batch_size=loaded.batch_size,
        progress=progress.search,
        **training,
    )


def _chunk_counts(args: argparse.Namespace, plan_in, loaded) -> tuple[int, ...]:
    """The vocabulary chunk counts ``autopart plan`` plans with: ``AUTO_CHUNKS`` up to the head's outputs for
    ``--vocab-chunks auto`` (1 alone for a model without a linear head), else the one ``_vocab_chunks`` gives."""
    if args.vocab_chunks != "auto" or plan_in is not None:
        return (_vocab_chunks(args, plan_in),)
    from .vocab_split import output_head

    try:
        rows = output_head(loaded.model)[1].out_features
    except CaptureError:
        return (1,)
    return tuple(k for k in AUTO_CHUNKS if k <= rows)


def _vocab_chunks(args: argparse.Namespace, plan_in=None) -> int:
    """The head's vocabulary chunks: ``--vocab-chunks``, or a given plan's (a different flag is refused)."""
    if plan_in is None:
        if args.vocab_chunks == "auto":
            raise PlanError(f"--vocab-chunks auto: only `autopart plan` tries chunk counts; give {args.command} a number")
        return args.vocab_chunks
    if args.vocab_chunks not in (1, plan_in.model.vocab_chunks):
        raise PlanError(f"--vocab-chunks {args.vocab_chunks}: the plan splits the head's vocabulary into "
                        f"{plan_in.model.vocab_chunks}; drop the flag or re-plan")
    return plan_in.model.vocab_chunks


def _model_source(args: argparse.Namespace, plan_in=None):
    """The model the flags name (``--model``, ``--config``, ``--seq-len``); with a plan file, the plan's own
    model with any flag given in place of its part (see ``Plan.model_source``)."""
    from .plan import ModelSource
    from .zoo import parse_config_overrides

    config = parse_config_overrides(args.config)
    if plan_in is not None and (plan_in.model.source is not None or args.model is not None):
        return plan_in.model_source(args.model, config, args.seq_len)
    return ModelSource(args.model or DEFAULT_MODEL, config, args.seq_len)


def _check_profile_flags(args: argparse.Namespace) -> None:
    """The profile group's options (``_profile_args``) mean nothing without ``--profile``: refused."""
    if not args.profile and (args.profile_budget is not None or args.device is not None or args.cache is not None
                             or args.profile_sizes is not None):
        raise PlanError("--device, --cache, --profile-budget and --profile-sizes go with --profile")


def _profile_options(args: argparse.Namespace, dtype: str, tp_degrees: tuple[int, ...], clock: str = "wall",
                     show: bool | None = None):
    from .profile import ProfileOptions

    return ProfileOptions(device=args.device or "cpu", dtype=dtype, tp_degrees=tp_degrees,
                          budget_s=args.profile_budget, clock=clock, progress=show)


def _print_profile_stats(prof, cache, capture_batch: int) -> None:
    print(prof.summary(capture_batch, cache.path, cache.moved_aside))


def _sizes_to_profile(args: argparse.Namespace, plan_in, loaded, cluster, pins: Mapping[str, int],
                      global_batch: int) -> tuple[int, ...]:
    """The micro-batch sizes besides the capture batch that ``plan --profile`` measures the model at
    ([Note: measured at several micro-batch sizes] in cost_models/profiled.py): a given plan's own size,
    else those the search may choose (``--profile-sizes`` of them at most, the capture batch counted)."""
    from .profile import PROFILED_SIZES, micro_batches_to_profile

    most = args.profile_sizes or PROFILED_SIZES
    if most == 1:
        return ()
    if plan_in is not None:
        b = plan_in.schedule.micro_batch_size
        return () if b == loaded.batch_size else (b,)
    return micro_batches_to_profile(loaded.batch_size, cluster.world_size, global_batch, pp=pins.get("pp"),
                                    tp=pins.get("tp"), dp=pins.get("dp"), microbatches=args.microbatches, most=most)


def _profiled(args: argparse.Namespace, pg, cluster, dtype: str, tp_pin: int | None, show: bool | None,
              loaded=None, sizes: Sequence[int] = ()):
    """Profile the captured model for ``plan --profile`` (its own progress bar), and, re-captured, at the
    micro-batch ``sizes``: the measured cost model."""
    from .profile import ProfileCache, profile_clock, profile_for_planning, recaptured

    others, failed = {}, {}
    if sizes:
        with Progress(show) as progress:
            progress.phase("capture", detail=f"{loaded.name} at micro-batch sizes {', '.join(map(str, sizes))}")
            others, failed = recaptured(loaded.model, loaded.example_inputs, loaded.example_kwargs, loaded.name, sizes,
                                        pg.captured.vocab_chunks)
    clock = profile_clock(cluster, args.device or "cpu")
    with ProfileCache(args.cache) as cache:
        prof = profile_for_planning(pg, cluster, cache,
                                    _profile_options(args, dtype, tp_degrees(cluster, tp_pin), clock, show=show),
                                    others, failed)
        _print_profile_stats(prof, cache, pg.captured.batch_size)
    return prof.cost_model


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _modules_summary(modules: Sequence[str]) -> str:
    if len(modules) <= 2:
        return ", ".join(modules)
    return f"{modules[0]} .. {modules[-1]} ({len(modules)} blocks)"


def _recompute_summary(st) -> str:
    """`` [recompute]`` (every block), `` [recompute 3/8]``, with `` selective`` when the other blocks
    replay their attention core; empty when the stage recomputes nothing."""
    if not st.recomputes:
        return ""
    whole = len(st.recompute) == len(st.modules)
    parts = ["recompute" if whole else f"recompute {len(st.recompute)}/{len(st.modules)}" if st.recompute else ""]
    if st.selective and not whole:
        parts.append("selective")
    return " [" + " ".join(p for p in parts if p) + "]"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("batch") else f"{n} {word}s"


def _print_header(console, plan, cluster) -> None:
    """The plan's first two lines: model on cluster; method, mesh, schedule and training set-up."""
    sched = plan.schedule
    console.print(
        f"[bold]{plan.model.name}[/bold] ({_fmt_count(plan.model.params)} params) on {cluster.describe()}"
    )
    console.print(
        f"method [bold]{plan.solver.method}[/bold] · mesh [bold]{plan.mesh}[/bold] · schedule {sched.name}"
        + (f" (v={sched.virtual_stages})" if sched.virtual_stages > 1 else "")
        + f", {_plural(sched.microbatches, 'micro-batch')} of {sched.micro_batch_size} · global batch {plan.training.global_batch}"
        + f" · {plan.training.dtype}, {plan.training.optimizer}{', ' + plan.training.dp_sharding if plan.training.dp_sharding != 'none' else ''}"
    )


def print_plan(result, cluster) -> None:
    from rich.console import Console
    from rich.table import Table

    plan = result.plan
    pred = plan.predicted
    console = Console(width=max(100, Console().width))
    _print_header(console, plan, cluster)
    bottleneck = max((s.predicted.forward_s + s.predicted.backward_s for s in plan.stages), default=0.0) or 1.0
    table = Table(show_lines=False)
    for col, just in (
        ("stage", "right"), ("modules", "left"), ("params", "right"), ("fwd", "right"), ("bwd", "right"),
        ("send", "right"), ("memory", "right"), ("load", "right"), ("ranks", "left"),
    ):
        table.add_column(col, justify=just)
    for st in plan.stages:
        sp = st.predicted
        load = (sp.forward_s + sp.backward_s) / bottleneck
        ranks = f"{st.ranks[0]}..{st.ranks[-1]}" if len(st.ranks) > 1 else str(st.ranks[0])
        table.add_row(
            str(st.index),
            _modules_summary(st.modules) + _recompute_summary(st),
            _fmt_count(st.params),
            fmt_time(sp.forward_s),
            fmt_time(sp.backward_s),
            fmt_time(sp.send_s),
            fmt_bytes(sp.memory_bytes),
            f"{load:.0%}",
            ranks,
        )
    console.print(table)
    fits = "[green]fits[/green]" if pred.fits else "[red]DOES NOT FIT[/red]"
    # local-cpu's peak FLOP/s is a guess from the CPU's name, not a measurement: say so beside the figure.
    estimate = " (of an estimated peak)" if cluster.name == "local-cpu" else ""
    console.print(
        f"step time [bold]{fmt_time(pred.step_time_s)}[/bold] · {pred.samples_per_s:.1f} samples/s · "
        f"{pred.tflops_per_device:.1f} TFLOP/s per device · MFU {pred.mfu:.1%}{estimate} · bubble {pred.bubble_fraction:.1%} · "
        f"peak memory {fmt_bytes(pred.peak_memory_bytes)}"
        + (f" + {pred.memory_margin:.0%} margin" if pred.memory_margin else "")
        + f" of {fmt_bytes(pred.memory_limit_bytes)} ({fits})"
    )
    if pred.mfu > 1:
        console.print(
            f"[yellow]note:[/yellow] MFU above 100%: the costs run faster than {cluster.name}'s peak FLOP/s "
            "(an estimate for local-cpu); `autopart calibrate` measures the peak"
        )
    solver = plan.solver
    proof = ""
    if solver.bound is not None and solver.objective:
        gap = max(0.0, (pred.step_time_s - solver.bound) / pred.step_time_s)
        proof = f", objective {fmt_time(solver.objective)}, bound {fmt_time(solver.bound)}, gap {gap:.1%}"
    console.print(f"[dim]planned in {solver.wall_s:.2f} s ({solver.status}{proof})[/dim]")


# --------------------------------------------------------------------------------------
# explain, show: a saved plan
# --------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    """Re-score a saved plan for the model it records (or the flags given) and explain it."""
    from .capture import model_fingerprint
    from .cluster import Cluster
    from .explain import print_explanation
    from .plan import ModelSource, Plan
    from .planner import score_plan
    from .zoo import load_model

    _check_profile_flags(args)
    if args.measured is not None:
        from .explain import MeasuredRun, print_measured

        if args.plan_file is not None:
            raise PlanError(f"explain: give PLAN.json or --measured RUN.json, not both ({args.measured} carries its plan)")
        if args.profile:
            raise PlanError("explain --measured shows the prices the run's plan recorded; drop --profile")
        print_measured(MeasuredRun.load(args.measured))
        return 0
    if args.plan_file is None:
        raise PlanError("explain: give a plan (autopart explain PLAN.json) or a run (autopart explain --measured RUN.json)")
    if args.dtype is not None:
        raise PlanError("--dtype: a saved plan keeps its own (training.dtype); drop --dtype")
    plan = Plan.load(args.plan_file)
    cluster = Cluster.from_dict(plan.cluster)
    if args.profile:  # before the slow capture: measured costs must describe the plan's devices
        from .profile import ProfileError, check_device

        try:
            check_device(cluster, args.device or "cpu")
        except ProfileError as exc:
            raise ProfileError(f"explain --profile: {args.plan_file} was planned for {cluster.name} "
                               f"({cluster.device.name}), which this machine's {args.device or 'cpu'} cannot "
                               "measure; run it there with --device cuda, or explain it without --profile") from exc
    source = _model_source(args, plan)
    loaded = load_model(source.spec, seq_len=source.seq_len, dtype=plan.training.dtype, config=source.config)
    plan.check_matches(model_fingerprint(loaded.model), given=ModelSource(source.spec, source.config, loaded.seq_len))
    show = False if args.quiet else None
    pg = _captured(loaded, show, _vocab_chunks(args, plan))
    cost_model = None
    if args.profile:
        sizes = _sizes_to_profile(args, plan, loaded, cluster, {}, plan.training.global_batch)
        cost_model = _profiled(args, pg, cluster, plan.training.dtype, plan.mesh.tp, show, loaded, sizes)
    result = score_plan(plan, pg, loaded.example_inputs, cluster, name=loaded.name,
                        batch_size=loaded.batch_size, example_kwargs=loaded.example_kwargs, cost_model=cost_model)
    print_plan(result, cluster)
    print_explanation(result)
    note = repriced_note(plan, result.plan, args.plan_file, profiled=args.profile)
    if note:
        print(note)
    return 0


REPRICED_TOLERANCE = 0.005  # a re-priced step within this share of the recorded one is the same prediction


def repriced_note(recorded: Plan, repriced: Plan, path: str, *, profiled: bool) -> str:
    """A line for ``explain`` and ``plan --plan`` when their price of a saved plan differs from the step time
    the plan recorded when it was made (``plan --profile`` priced it on measured costs, or another version of autopart's
    models did): both figures, and how to price it as it was planned. "" when they agree."""
    if recorded.predicted is None or repriced.predicted is None or recorded.predicted.step_time_s <= 0:
        return ""
    old, new = recorded.predicted.step_time_s, repriced.predicted.step_time_s
    if abs(new / old - 1) <= REPRICED_TOLERANCE:
        return ""
    change = f"{fmt_time(new)} ({new / old - 1:+.1%}), the figures above"
    if profiled:
        return (f"note: {path} recorded a {fmt_time(old)} step when it was made; priced here on the profile's "
                f"measured costs it is {change}: the costs, the cluster or autopart's models differ from its own")
    return (f"note: {path} recorded a {fmt_time(old)} step when it was made; priced here on the analytic cost "
            f"model it is {change}; a plan made with --profile is priced as made with --profile and its --cache")


def cmd_show(args: argparse.Namespace) -> int:
    """Print a saved plan in full, from the file alone (no model is built)."""
    from rich.console import Console
    from rich.table import Table

    from .cluster import Cluster
    from .plan import Plan

    plan = Plan.load(args.plan_file)
    cluster = Cluster.from_dict(plan.cluster)
    console = Console(width=max(100, Console().width))
    _print_header(console, plan, cluster)
    src = plan.model.source
    console.print(f"model: {' '.join(src.flags()) if src else 'not recorded (a version-2 plan or a model from Python)'}"
                  f" · fingerprint {plan.model.fingerprint} · made by {plan.solver.method} ({plan.solver.status})")
    table = Table()
    for col in ("stage", "ranks", "modules", "nodes", "recompute"):
        table.add_column(col, justify="left" if col == "modules" else "right", overflow="fold")
    for st in plan.stages:
        ranks = f"{st.ranks[0]}..{st.ranks[-1]}" if len(st.ranks) > 1 else ", ".join(map(str, st.ranks))
        table.add_row(str(st.index), ranks, ", ".join(st.modules), str(len(st.nodes)), _recompute_summary(st).strip(" []"))
    console.print(table)
    counts: dict[str, int] = {}
    for strat in plan.sharding.values():
        counts[strat] = counts.get(strat, 0) + 1
    console.print("tensor sharding: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " nodes; the rest "
                                         "replicated" if counts else "every node replicated"))
    if plan.predicted is not None:
        p = plan.predicted
        console.print(f"predicted: step time {fmt_time(p.step_time_s)} · MFU {p.mfu:.1%} · bubble "
                      f"{p.bubble_fraction:.1%} · peak memory {fmt_bytes(p.peak_memory_bytes)} of "
                      f"{fmt_bytes(p.memory_limit_bytes)}")
    console.print(f"run it: autopart run --nproc-per-node {plan.mesh.world_size} --plan {args.plan_file} "
                  "(on several nodes: torchrun ... -m partitioner run --plan ...)")
    return 0


# --------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    import shlex

    from .compare import compare, print_tables

    words = list(sys.argv[1:] if argv is None else argv)
    _vocab_chunks(args)  # a count: auto is plan's alone
    # Progress only for a person watching: in scripts and CI, stderr stays the one-line error.
    with Progress(False if args.quiet else None) as progress:
        progress.phase("compare")
        comparison = compare(
            **{k: v for k, v in vars(args).items() if k != "command"},
            command="autopart " + shlex.join(words),
            progress=progress.note if progress.enabled else None,
        )
    print_tables(comparison)
    if args.out:
        print(f"wrote {Path(args.out) / 'report.md'} with its pictures, results.json and plans/")
    return 0


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Train ``--plan`` for ``--steps`` steps on a fixed synthetic corpus (or ``--data``); see docs/runtime.md."""
    from .runtime import run_plan

    if args.warmup < 0:
        raise PlanError(f"--warmup {args.warmup} must be >= 0")
    if args.vocab_chunks != 1:
        raise PlanError("--vocab-chunks: run splits the head as its plan says (model.vocab_chunks); drop the flag")
    return run_plan(
        args.plan_file, args.model, config=args.config, seq_len=args.seq_len, steps=args.steps,
        warmup=args.warmup, json_path=args.json, seed=args.seed, data=args.data, force=args.force,
    )


# --------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .cluster import PRESETS
    from .zoo import ZOO, load_model, parse_config_overrides, zoo_names

    console = Console(width=max(100, Console().width))
    if args.list:
        table = Table(title="models")
        table.add_column("name")
        table.add_column("about")
        for name in zoo_names():
            table.add_row(name, ZOO[name].about if name in ZOO else "plain nn.Module stack")
        console.print(table)
        console.print("cluster presets: " + ", ".join(PRESETS))
        console.print("local-cpu:N is N processes on this machine over gloo (what `autopart run` under torchrun uses "
                      "here); a TOML file describes any other cluster (docs/cluster.md)")
        return 0
    loaded = load_model(args.model, seq_len=args.seq_len, dtype=args.dtype or "bf16", config=parse_config_overrides(args.config))
    pg = _captured(loaded, False if args.quiet else None, _vocab_chunks(args))
    cap = pg.captured
    console.print(
        f"[bold]{cap.name}[/bold]: {_fmt_count(cap.param_count)} params, {len(cap.nodes)} graph nodes "
        f"(traced with {cap.tracer}), {len(pg.blocks)} blocks of {len(pg.block_types())} types; "
        f"inputs {', '.join(str(tuple(s)) for s in cap.input_shapes)}; per sample of the example batch"
    )
    table = Table()
    # Block names are what a user copies into --split-at: never cut them. The eight number columns
    # need about 90 characters beside them, so the table is as wide as that takes.
    longest = max((len(b.name) + len(" (layer)") for b in pg.blocks), default=5)
    console = Console(width=max(console.width, longest + 95))
    for col in ("#", "block", "type", "params", "fwd FLOPs", "bwd FLOPs", "activations", "output", "nodes"):
        table.add_column(col, justify="left" if col == "block" else "right",
                         **(dict(min_width=longest, no_wrap=True) if col == "block" else {}))
    for b in pg.blocks:
        table.add_row(
            str(b.index), b.name + (" (layer)" if b.is_layer else ""), str(b.type_id), _fmt_count(b.param_count),
            _fmt_count(b.forward_flops), _fmt_count(b.backward_flops), fmt_bytes(b.activation_bytes),
            fmt_bytes(b.output_bytes), str(len(b.nodes)),
        )
    table.add_row(
        "", "total", "", _fmt_count(cap.param_count), _fmt_count(cap.forward_flops), _fmt_count(cap.backward_flops),
        fmt_bytes(sum(b.activation_bytes for b in pg.blocks)), "", str(len(cap.compute_nodes())),
    )
    console.print(table)
    shared = pg.shared_params()
    if shared:
        for p, bs in shared.items():
            console.print(f"tied: {p} is read by blocks {', '.join(pg.blocks[b].name for b in bs)}")
    for w in cap.warnings:
        console.print(f"[yellow]note:[/yellow] {w}")
    if args.nodes_table:
        nt = Table()
        for col in ("node", "key (in plans)", "shape", "fwd FLOPs", "params"):
            nt.add_column(col)
        for n in cap.compute_nodes():
            nt.add_row(n.name, n.key, str(n.outputs[0].shape) if n.outputs else "", _fmt_count(n.forward_flops), ", ".join(n.params))
        console.print(nt)
    return 0


# --------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------


def _check_out(path_text: str | None, force: bool, flag: str, example: str) -> Path | None:
    """Refuse an output path that would overwrite a file (without --force) or cannot be written."""
    from .outputs import check_output_file

    return check_output_file(path_text, force, flag, example)


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    import torch
    from rich.console import Console
    from rich.table import Table

    from .cluster import load_cluster
    from .profile import BlockFidelity, ProfileCache, device_name, fidelity, gpu_preset, profile_for_planning
    from .zoo import load_model, parse_config_overrides

    json_path = _check_out(args.json, args.force, "--json", "profile.json")
    device = args.device or "cpu"
    name = device_name(device)  # fails early, with the fix, on a machine without that device
    is_cpu = torch.device(device).type == "cpu"
    cluster = load_cluster(args.cluster or ("local-cpu" if is_cpu else gpu_preset(name)), nodes=args.nodes,
                           devices_per_node=args.gpus_per_node)
    dtype = args.dtype or default_dtype(cluster)
    tps = tuple(_parse_tp(args.tp)) if args.tp else ()
    loaded = load_model(args.model, seq_len=args.seq_len, dtype=dtype, config=parse_config_overrides(args.config))
    show = False if args.quiet else None
    pg = _captured(loaded, show, _vocab_chunks(args))
    cap = pg.captured
    with ProfileCache(args.cache) as cache:
        prof = profile_for_planning(pg, cluster, cache, _profile_options(args, dtype, tps, args.clock, show=show))
        _print_profile_stats(prof, cache, cap.batch_size)
    rows = fidelity(pg, prof.result, cluster, prof.calibration, dtype) if args.report or json_path else []
    if args.report:
        console = Console(width=max(110, Console().width))
        table = Table(title=f"{cap.name} on {prof.result.device}: one micro-batch of {cap.batch_size}, {dtype}")
        for col in ("block", "measured fwd", "bwd", "analytic fwd", "bwd", "calibrated fwd", "bwd"):
            table.add_column(col, justify="left" if col == "block" else "right")
        err = BlockFidelity.error

        def cell(pred: float, meas: float) -> str:
            return f"{fmt_time(pred)} ({err(pred, meas):+.0%})" if meas > 0 else fmt_time(pred)

        for r in rows:
            (mf, mb), (af, ab), (cf, cb) = r.measured, r.analytic, r.calibrated
            table.add_row(
                r.block + (f" (x{r.count})" if r.count > 1 else ""), f"{fmt_time(mf)} ±{r.spread / 2:.0%}",
                fmt_time(mb), cell(af, mf), cell(ab, mb), cell(cf, mf), cell(cb, mb),
            )
        console.print(table)
        for label, pick in (("analytic", lambda r: r.analytic), ("calibrated", lambda r: r.calibrated)):
            fw = [abs(err(pick(r)[0], r.measured[0])) for r in rows]
            bw = [abs(err(pick(r)[1], r.measured[1])) for r in rows if r.measured[1] > 0]
            if fw:
                console.print(
                    f"{label:10s} MAPE over {len(fw)} block types: forward {sum(fw) / len(fw):.1%}"
                    + (f", backward {sum(bw) / len(bw):.1%}" if bw else "")
                )
        console.print(
            "[dim]calibrated: fitted to every model profiled on this device (cache), so it includes this one; "
            "benchmarks/profile_fidelity.py measures it on sizes it was not fitted on[/dim]"
        )
    if json_path is not None:
        st = prof.result.stats
        json_path.write_text(json.dumps(dict(
            model=cap.name, device=prof.result.device, torch=prof.result.torch_version, dtype=dtype,
            batch_size=cap.batch_size, stats=dict(measured=st.measured, cached=st.cached, corrupt=st.corrupt,
                                                  unmeasured=st.unmeasured, profiling_s=st.profiling_s),
            blocks=[dict(block=r.block, count=r.count, measured=r.measured, analytic=r.analytic,
                         calibrated=r.calibrated, spread=r.spread) for r in rows],
            calibration=prof.calibration.to_dict(),
        ), indent=1))
        print(f"wrote {json_path}")
    return 0


def _parse_tp(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        try:
            tp = int(part)
        except ValueError:
            raise PlanError(f"--tp {text!r}: expected degrees like 2,4") from None
        if tp < 2:
            raise PlanError(f"--tp {text!r}: degrees must be >= 2")
        out.append(tp)
    return out


# --------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    import time

    import torch
    import torch.distributed as dist

    from .calibrate import (CALIBRATION_PASSES, DEFAULT_SIZES, CalibrateError, calibrated_cluster, median_report,
                            pass_spread, run_calibration)
    from .devices import init_distributed, leave_distributed
    from .hostload import OTHER_LOAD_WARN, LoadMeter, own_cpu_seconds
    from .cluster import load_cluster

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise CalibrateError(
            "autopart calibrate measures the live process group: give it ranks, e.g. "
            "autopart calibrate --nproc-per-node 2 --out cluster.toml (or run it under torchrun)"
        )
    out = _check_out(args.out, args.force, "--out", "cluster.toml")
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    base = load_cluster(args.cluster or f"local-cpu:{local}")
    if base.world_size != world:
        raise CalibrateError(
            f"--cluster {base.name} has {base.nodes} x {base.devices_per_node} = {base.world_size} devices but torchrun "
            f"started {world} ranks; pass --cluster with nodes={world // local}, devices_per_node={local}"
        )
    if args.max_bytes < (1 << 20):
        raise CalibrateError(f"--max-bytes {args.max_bytes}: use at least 1048576 (1 MiB), or latency hides the bandwidth")
    sizes = tuple(s for s in DEFAULT_SIZES if s <= args.max_bytes)
    gpu = init_distributed().is_cuda  # one rank per local GPU over NCCL, else gloo on CPU (devices.py)
    measured = False
    try:
        meter, cpu0 = LoadMeter(), own_cpu_seconds()  # [Note: other load] in hostload.py
        passes = args.passes or CALIBRATION_PASSES
        reports = []
        for i in range(passes):  # [Note: calibration passes] in calibrate.py
            t0 = time.perf_counter()
            reports.append(run_calibration(sizes, args.reps, args.dtype or ("bf16" if gpu else "fp32"), local))
            if dist.get_rank() == 0 and passes > 1:
                print(f"pass {i + 1}/{passes} ({time.perf_counter() - t0:.0f} s): {pass_spread(reports[-1:])}",
                      flush=True)
        report = median_report(reports)
        used: list[Any] = [None] * world
        dist.all_gather_object(used, own_cpu_seconds() - cpu0)
        load = meter.stop(sum(used[:local]))  # rank 0's node: ranks 0 .. local-1 under torchrun
        if dist.get_rank() == 0:
            cluster = calibrated_cluster(base, report)
            spread = f"each figure their median; the passes read: {pass_spread(reports)}"
            header = (
                f"# measured by `autopart calibrate` on {time.strftime('%Y-%m-%d')}: {world} ranks over "
                f"{report.backend}, torch {torch.__version__}\n"
                + (f"# while measuring, {load.describe()} (rank 0's node)\n" if load is not None else "")
                + (f"# {passes} passes, {spread}\n" if passes > 1 else "")
            )
            out.write_text(header + cluster.to_toml())
            _print_calibration(report, base, cluster)
            if passes > 1:
                print(f"passes: {passes}, {spread}")
            if load is not None:
                print(f"machine: while measuring, {load.describe()}")
                if not load.quiet:
                    print(f"warning: the machine was not quiet ({load.fraction:.0%} other load, above "
                          f"{OTHER_LOAD_WARN:.0%}): its figures include that load; calibrate again when it is quiet")
            print(f"wrote {out}; plan with --cluster {out}")
        measured = True
    finally:
        leave_distributed(synchronize=measured)  # [Note: the last barrier] in devices.py
    return 0


def _print_calibration(report, base, cluster) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    table = Table(title=f"links ({report.world_size} ranks, {report.backend})")
    for col in ("link", "latency", "bandwidth", "was", "points", "fit MAPE"):
        table.add_column(col, justify="left" if col == "link" else "right")
    for link, fit in report.links.items():
        was = base.intra_node if link == "intra" else base.inter_node
        table.add_row(link, f"{fit.latency * 1e6:.1f} us", f"{fit.bandwidth / 1e9:.2f} GB/s",
                      f"{was.latency * 1e6:.1f} us, {was.bandwidth * base.efficiency.comm / 1e9:.2f} GB/s effective",
                      str(fit.points), f"{fit.mape:.1%}")
    if "inter" not in report.links and base.nodes > 1:
        table.add_row("inter", "-", "-", "not measured: this job runs on one node", "", "")
    console.print(table)
    c = report.compute
    console.print(
        f"device ({c.dtype}, one rank alone): GEMM {c.matmul_flops / 1e9:.1f} GFLOP/s -> efficiency.matmul "
        f"{cluster.efficiency.matmul} of {cluster.device.peak_flops[c.dtype] / 1e9:.1f} GFLOP/s; "
        f"streaming {c.memory_bandwidth / 1e9:.1f} GB/s -> efficiency.elementwise {cluster.efficiency.elementwise}"
    )
    o = report.overheads
    if o.measured:
        console.print(
            f"overheads (slowest rank): {o.action_s * 1e6:.0f} us per pipeline action ({o.multi_action_s * 1e6:.0f} us "
            f"with several stages a rank in a loop, {o.v_action_s * 1e6:.0f} us in a V), {o.step_s * 1e6:.0f} us per step, "
            f"{o.p2p_transfer_s * 1e6:.0f} us per pipeline transfer while the ranks compute "
            f"(+{o.p2p_tensor_s * 1e6:.0f} us per further tensor); "
            f"tensor-parallel node {o.tp_node_s * 1e6:.0f}/{o.tp_node_backward_s * 1e6:.0f} us (forward/backward), "
            f"DTensor op +{o.dtensor_op_s * 1e6:.0f}/{o.dtensor_op_backward_s * 1e6:.0f} us; optimizer "
            f"{o.optimizer_tensor_s * 1e6:.0f} us per tensor + {o.optimizer_bandwidth / 1e9:.2f} GB/s, ZeRO-1 "
            f"+{o.zero1_tensor_s * 1e6:.0f} us per tensor; checkpoint "
            f"{o.checkpoint_s * 1e6:.0f} us + {o.checkpoint_node_s * 1e6:.0f} us per saving node forward, "
            f"{o.checkpoint_backward_s * 1e6:.0f} us backward, per call; split backward (zero-bubble) "
            f"+{o.split_backward_node_s * 1e6:.0f} us per node (I) + {o.split_backward_param_s * 1e6:.0f} us per "
            f"parameter tensor (W); gradients accumulate at {o.accumulate_bandwidth / 1e9:.1f} GB/s; "
            f"all-reduce {o.all_reduce_factor:.2f}x, all-gather {o.all_gather_factor:.2f}x, reduce-scatter "
            f"{o.reduce_scatter_factor:.2f}x, broadcast {o.broadcast_factor:.2f}x the ring model on the link; "
            f"collectives overlap {o.comm_overlap:.0%} of compute; all ranks at once compute {o.compute_slowdown:.2f}x "
            f"slower than one alone (contention {c.contention:.2f}x, ranks over cores {c.oversubscribed:.2f}x), "
            f"a waiting rank still uses {o.idle_core_use:.0%} of a core -> \\[overheads]"
        )


if __name__ == "__main__":
    entry()
