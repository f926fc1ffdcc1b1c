"""Real multi-process runs for the runtime tests: one process group per layout, many checks inside it.

``launch(n, job, args)`` starts ``n`` ranks of this file as plain processes
(gloo over loopback, one thread each) and returns what every rank reported;
process start-up dominates on a small machine, so one launch checks every
model. Each job runs on every rank and returns a JSON-able dict.

Jobs:
  equivalence  auto_parallelize vs a single-process deepcopy of the same model:
               the step's loss, every parameter's gradient gathered to full shape,
               and the parameters after one optimizer step; every layout of one world
               size in one launch.
  checkpoint   save / load under given layouts, continue, report the parameters.
  fail         rank ``fail_rank`` raises, exits, is killed or hangs mid-step, in its loss or
               its stage's forward ([Note: failing ranks] in partitioner/watchdog.py).
  measure      each rank's memory by category and time by component (partitioner/measure.py).
  held         the bytes a one-stage rank holds at the end of its forward (the loss's call), measured.
  hf_stock     a stock ``GPT2LMHeadModel(GPT2Config(...))``, KV cache on as it comes, through
               ``auto_parallelize`` vs a single-process deepcopy.

``launch(..., torchrun=True)`` starts the same job under ``torchrun`` instead (one
launcher process; the report's ``stderr`` is every rank's, as a user sees it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Models of every architecture the runtime must handle, with at least 8 blocks so that 8 stages fit.
MODELS = {
    "mlp": dict(width=32, depth=8),
    "gpt2-tiny": dict(n_layer=4, n_embd=32, n_head=4, n_positions=32, vocab_size=96,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama-tiny": dict(num_hidden_layers=5, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=32),
    "bert-tiny": dict(num_hidden_layers=6, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      vocab_size=96, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0),
}
SEQ = 8

# More decoder families for tensor parallelism (tests/test_runtime_families.py): tiny configs with
# random weights, each exercising a different block shape. Kept apart from MODELS so that the
# layouts of test_runtime.py do not pay for them.
_DECODER = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96, max_position_embeddings=32)
FAMILIES = {
    "hf:Qwen2ForCausalLM": _DECODER,  # grouped-query attention, q/k/v biases
    "hf:MistralForCausalLM": dict(_DECODER, sliding_window=4),  # sliding-window mask (window < SEQ)
    "hf:MixtralForCausalLM": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2,
                                  router_jitter_noise=0.0),  # MoE routing: top-2 of 4 experts
    "hf:GPTNeoXForCausalLM": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, vocab_size=96, max_position_embeddings=32,
                                  use_parallel_residual=True, hidden_dropout=0.0,
                                  attention_dropout=0.0),  # attention and MLP in parallel
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, job: str, args: dict[str, Any], tmp: Path, timeout_s: float = 240.0,
           torchrun: bool = False) -> list[dict[str, Any]]:
    """Run ``job`` on ``n`` ranks; return each rank's report (``{"rc", "stderr", "elapsed_s", ...}``).

    With ``torchrun=True`` every report has the launcher's ``rc``, ``elapsed_s`` and whole ``stderr``."""
    port = free_port()
    spec = tmp / f"{job}-{port}.json"
    spec.write_text(json.dumps(args))
    if torchrun:
        return _launch_torchrun(n, job, spec, tmp, port, timeout_s)
    procs = []
    started = time.monotonic()
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = tmp / f"{job}-{port}-rank{rank}.json"
        err = open(tmp / f"{job}-{port}-rank{rank}.err", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, job, str(spec), str(out)], env=env,
                                       stdout=err, stderr=subprocess.STDOUT), out, err))
    reports = []
    ended: dict[int, float] = {}
    while len(ended) < n and time.monotonic() - started < timeout_s:  # note when each rank ends
        for i, (proc, _, _) in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.time()
        time.sleep(0.05)
    for i, (proc, out, err) in enumerate(procs):
        if proc.poll() is None:
            proc.kill()  # only the processes this launch started
        rc = proc.wait()
        err.close()
        report = json.loads(out.read_text()) if out.exists() else {}
        report.update(rc=rc, stderr=Path(err.name).read_text(), elapsed_s=time.monotonic() - started,
                      ended_at=ended.get(i, time.time()))
        reports.append(report)
    return reports


def _launch_torchrun(n: int, job: str, spec: Path, tmp: Path, port: int, timeout_s: float) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = tmp / f"{job}-{port}-rank{{rank}}.json"
    err_path = tmp / f"{job}-{port}-torchrun.err"
    started, started_wall = time.monotonic(), time.time()
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                                 "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, job, str(spec),
                                 str(out)], env=env, stdout=err, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()  # only the launcher this call started; its children follow it
            rc = proc.wait()
    elapsed, stderr = time.monotonic() - started, err_path.read_text()
    reports = []
    for rank in range(n):
        path = Path(str(out).replace("{rank}", str(rank)))
        report = json.loads(path.read_text()) if path.exists() else {}
        report.update(rc=rc, stderr=stderr, elapsed_s=elapsed, ended_at=started_wall + elapsed)
        reports.append(report)
    return reports


# --------------------------------------------------------------------------------------
# Inside a rank
# --------------------------------------------------------------------------------------


def build(name: str, seed: int = 0, device: str = "cpu"):
    """(model, example batch-1 inputs, loss_fn, make_batch(global_batch, seed) -> (inputs, target)).

    ``device="meta"``: the model and its example inputs on ``meta`` (no weights)."""
    import torch

    from partitioner.zoo import load_model

    torch.manual_seed(seed)
    config = MODELS[name] if name in MODELS else FAMILIES[name]
    lm = load_model(name, config=config, seq_len=None if name == "mlp" else SEQ, device=device)
    model = lm.model.train()
    if name == "mlp":
        def loss_fn(out, y):
            return torch.nn.functional.mse_loss(out, y)

        def batch(b, s):
            g = torch.Generator().manual_seed(s)
            return (torch.randn(b, 32, generator=g),), torch.randn(b, 32, generator=g)
    else:
        vocab = config["vocab_size"]

        def loss_fn(out, y):
            logits = out.logits
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        def batch(b, s):
            g = torch.Generator().manual_seed(s)
            return (torch.randint(0, vocab, (b, SEQ), generator=g),), torch.randint(0, vocab, (b, SEQ), generator=g)
    return model, lm.example_inputs, loss_fn, batch


def _rel(a, b, floor: float) -> float:
    return float((a - b).abs().max() / max(float(b.abs().max()), floor))


def job_equivalence(args: dict[str, Any]) -> dict[str, Any]:
    """``{"layouts": {name: pins}, "models": [...], "layout_models": {layout: [...]}, "meta_models":
    {layout: [...]}}``: every layout of this world size in one process group, one after the other, each
    on ``layout_models[layout]`` if given, else ``models``; ``{layout: {model: report}}``. A layout's
    pins may name the planner (``method``, default ``params``)."""
    return {
        name: _equivalence(pins, args.get("layout_models", {}).get(name, args["models"]),
                           args.get("meta_models", {}).get(name, ()))
        for name, pins in args["layouts"].items()
    }


def _equivalence(layout: dict[str, Any], models: list[str], meta_models: list[str]) -> dict[str, Any]:
    import torch

    from partitioner import auto_parallelize
    from partitioner.materialize import materialize

    out: dict[str, Any] = {}
    # A model built on meta: each rank materializes its own stages' tensors; the reference, all of them.
    runs = [(name, False) for name in models] + [(name, True) for name in meta_models]
    for name, on_meta in runs:
        model, example, loss_fn, batch = build(name, device="meta" if on_meta else "cpu")
        if on_meta:
            ref, _, _, _ = build(name, device="meta")
            materialize(ref, "cpu")
        else:
            ref = copy.deepcopy(model)
        opt = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
        if layout.get("adamw"):  # the optimizer the plan prices (adam-mixed in fp32: AdamW's m and v)
            opt = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731
        # the planner: "params" unless the layout says
        pins = {k: v for k, v in layout.items() if k not in ("method", "adamw", "nodes", "recompute_layers", "as_v4")}
        if layout.get("nodes"):  # this machine as a cluster of several (virtual) nodes, for HSDP
            from partitioner.cluster import Cluster

            world = int(os.environ["WORLD_SIZE"])
            pins["cluster"] = Cluster.local(world).with_nodes(layout["nodes"], world // layout["nodes"])
        if "recompute_layers" in layout or layout.get("as_v4") or "split_at" in layout:  # a plan made first, given as plan=
            pins = dict(plan=_edited_plan(model, example, layout, pins))
        pm = auto_parallelize(model, example_inputs=example, loss_fn=loss_fn, method=layout.get("method", "params"),
                              optimizer=opt, **pins)
        gb = pm.plan.training.global_batch
        inputs, target = batch(gb, 1)
        loss = pm.step(*inputs, target=target)
        grads = pm.full_tensors("grad")
        params = pm.full_tensors("param")
        priced = _priced_at_rest(ref, example, pm) if layout.get("adamw") else None
        ref_opt = opt(ref.parameters())
        ref_loss = loss_fn(ref(*inputs), target)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_opt.step()
        ref_params = dict(ref.named_parameters())
        scale_g = max(float(g.abs().max()) for g in ref_grads.values())
        report = out.setdefault(f"meta:{name}" if on_meta else name, {})
        if on_meta:  # what this rank holds: only its stages' tensors (its tp shards of them)
            report.update(
                resident_bytes=sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta),
                stage_bytes=sum(p.numel() * p.element_size() for p in pm.params.values()),
                model_bytes=sum(p.numel() * p.element_size() for p in ref.parameters()),
                foreign=sorted(n for n, p in model.named_parameters() if not p.is_meta and n not in pm.params),
            )
        report.update(
            loss=loss, ref_loss=float(ref_loss),
            grad=max(_rel(grads[n], ref_grads[n], 1e-4 * scale_g) for n in grads),
            param=max(_rel(params[n].detach(), ref_params[n].detach(), 1e-6) for n in params),
            worst_grad=max(grads, key=lambda n: _rel(grads[n], ref_grads[n], 1e-4 * scale_g)),
            names=sorted(grads), all_names=sorted(ref_grads), matched_by=pm.split.matched_by,
            schedule=pm.plan.schedule.name, stages=list(pm.stage_indices),
            plan_modules=[list(st.modules) for st in pm.plan.stages],
            strategies=sorted(set(pm.plan.sharding.values())),
            plan_recompute=[st.recompute for st in pm.plan.stages],
            plan_selective=[st.selective for st in pm.plan.stages],
            # checkpoint calls in this rank's stage graphs (recomputed blocks and attention cores; recompute.py)
            checkpoints=sum(1 for st in pm.stages for m in st.submod.modules() if hasattr(m, "graph")
                            for n in m.graph.nodes if "checkpoint" in str(n.target)),
            # per stage of this rank, the blocks called through their own checkpoint (a module's, not a core op's)
            checkpointed=[sum(1 for m in st.submod.modules() if hasattr(m, "graph") for n in m.graph.nodes
                              if "checkpoint" in str(n.target) and getattr(n.args[0], "op", None) == "get_attr")
                          for st in pm.stages],
            optimizer=type(pm.optimizer).__name__, dp_sharding=pm.plan.training.dp_sharding,
            # FSDP2 units on this rank (ZeRO-2/3: its stages' folded blocks and roots; fsdp.py)
            fsdp_units=sum(type(m).__name__.startswith("FSDP") for st in pm.stages for m in st.submod.modules()),
            # bytes this rank holds for its parameters after the step, and what the memory model priced
            held_bytes=_held(pm), priced_bytes=priced,
            # parameters whose optimizer state this rank holds (under ZeRO-1, its dp share)
            state_params=len(getattr(pm.optimizer, "optim", pm.optimizer).state), n_params=len(pm.params),
        )
        pm.close()
    return out


def _edited_plan(model, example, layout: dict[str, Any], pins: dict[str, Any]):
    """The layout's plan (``method``, default ``params``, and its pins) with each stage recomputing its first
    ``recompute_layers["blocks"]`` layers and, with ``recompute_layers["selective"]``, the attention cores of
    its other blocks; with ``as_v4``, written as a version-4 file (``recompute: true|false``) and loaded back."""
    import json

    from dataclasses import replace

    from partitioner.cluster import Cluster
    from partitioner.plan import Plan
    from partitioner.planner import plan_parallelism

    world = int(os.environ["WORLD_SIZE"])
    cluster = pins.get("cluster") or Cluster.local(world)
    pins = {k: v for k, v in pins.items() if k != "cluster"}
    plan = plan_parallelism(model, example, cluster, dtype="fp32", method=layout.get("method", "params"), **pins).plan
    edit = layout.get("recompute_layers")
    if edit is not None:
        stages = []
        for st in plan.stages:
            layers = [m for m in st.modules if m.rsplit(".", 1)[-1].isdigit()]
            stages.append(replace(st, recompute=tuple(layers[:edit["blocks"]]), selective=edit.get("selective", False)))
        plan = replace(plan, stages=tuple(stages))
    if layout.get("as_v4"):
        data = json.loads(plan.to_json())
        data["version"] = 4
        for st in data["stages"]:
            st["recompute"] = len(st["recompute"]) == len(st["modules"])
            del st["selective"]
        plan = Plan.from_dict(data)
    return plan


def _held(pm) -> int:
    """Weights, gradients and optimizer state this rank holds (its shards), counted as the memory model does."""
    from partitioner.precision import resident_bytes

    return resident_bytes(pm.params.values(), pm.optimizer).total


def _priced_at_rest(model, example, pm) -> int:
    """What the memory model prices for this rank's parameters at rest (between steps)."""
    from partitioner.cluster import Cluster
    from partitioner.planner import prepare

    plan = pm.plan
    ev = prepare(model, example, Cluster.from_dict(dict(plan.cluster)), training=plan.training)
    names = [n for n in pm.params if n in ev.captured.params]
    return int(ev.resident_bytes(names, plan.mesh.tp, plan.mesh.dp, set())[0])


def job_checkpoint(args: dict[str, Any]) -> dict[str, Any]:
    """Several runs in one process group, each ``{"key", "model", "global_batch", "layout", "phases"}``.

    Phases, in order: ``{"steps": [first, n]}`` trains n steps on the batches of steps first..;
    ``{"save": path}``; ``{"load": path}`` (an error is reported, with whether the weights stayed
    unchanged, and the run goes on); ``{"corrupt": [src, dst]}``: rank 0 copies checkpoint src to dst
    and truncates its data file; ``{"lr": x}`` sets the optimizer's learning rate; ``{"state": name}``
    records this rank's ``state_dict()`` (plain tensors only: a small model without tp or FSDP) and its
    optimizer's learning rate under ``name``. A run's ``dtype`` (bf16, fp16) casts the model, so the plan
    keeps fp32 master weights. Each run reports its losses, load outcomes and final parameters.
    """
    import shutil

    import torch
    import torch.distributed as dist

    from partitioner import auto_parallelize
    from partitioner.precision import DTYPES

    out: dict[str, Any] = {}
    for run in args["runs"]:
        model, example, loss_fn, batch = build(run["model"])
        dtype = DTYPES[run.get("dtype", "fp32")]
        if dtype != torch.float32:  # module casting: the plan's fingerprint then says bf16/fp16
            model = model.to(dtype)
            example = tuple(x.to(dtype) if x.is_floating_point() else x for x in example)
        opt = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
        world = int(os.environ["WORLD_SIZE"])
        cluster = low_precision_cluster(world) if dtype != torch.float32 else None
        layout = dict(run["layout"])
        if layout.get("nodes"):  # this machine as a cluster of several (virtual) nodes, for HSDP
            from partitioner.cluster import Cluster

            cluster = Cluster.local(world).with_nodes(layout["nodes"], world // layout.pop("nodes"))
        pm = auto_parallelize(model, cluster, example_inputs=example, loss_fn=loss_fn, method="params", optimizer=opt,
                              global_batch=run["global_batch"], **layout)
        result: dict[str, Any] = {"losses": [], "loads": []}
        try:
            for phase in run["phases"]:
                if "steps" in phase:
                    first, n = phase["steps"]
                    for step in range(first, first + n):
                        inputs, target = batch(run["global_batch"], 100 + step)
                        inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
                        target = target.to(dtype) if target.is_floating_point() else target
                        result["losses"].append(pm.step(*inputs, target=target))
                elif "lr" in phase:
                    for group in pm.optimizer.param_groups:
                        group["lr"] = phase["lr"]
                elif "state" in phase:
                    state = {k: v.float().flatten().tolist() if isinstance(v, torch.Tensor) else repr(v)
                             for k, v in pm.state_dict().items()}
                    result.setdefault("state", {})[phase["state"]] = dict(
                        entries=state, lr=[g["lr"] for g in pm.optimizer.param_groups],
                        optimizer=type(pm.optimizer).__name__)
                elif "save" in phase:
                    pm.save(phase["save"])
                elif "load" in phase:
                    before = {n: t.clone() for n, t in pm.full_tensors("param").items()}
                    try:
                        pm.load(phase["load"])
                        result["loads"].append(None)
                    except Exception as exc:
                        after = pm.full_tensors("param")
                        result["loads"].append(dict(error=f"{type(exc).__name__}: {exc}",
                                                    unchanged=all(torch.equal(before[n], after[n]) for n in before)))
                elif "corrupt" in phase:
                    if dist.get_rank() == 0:
                        src, dst = (Path(p) for p in phase["corrupt"])
                        shutil.copytree(src, dst)
                        # Random bytes inside the shard, its size kept (torch's own checks miss this).
                        data = next(f for f in sorted(dst.iterdir()) if f.suffix == ".distcp")
                        raw = bytearray(data.read_bytes())
                        raw[len(raw) // 2 : len(raw) // 2 + 256] = os.urandom(256)
                        data.write_bytes(bytes(raw))
                    dist.barrier()
            result["params"] = {n: t.flatten().tolist() for n, t in pm.full_tensors("param").items()}
        finally:
            pm.close()
        out[run["key"]] = result
    return out


def job_fail(args: dict[str, Any]) -> dict[str, Any]:
    """Rank ``fail_rank`` fails in the second step: ``how`` is raise, exit, kill (SIGKILL) or hang,
    ``where`` is its ``loss`` (last stage) or its stage's ``forward``."""
    import signal

    import torch
    import torch.distributed as dist

    from partitioner import auto_parallelize

    model, example, loss_fn, batch = build("mlp")
    fail_rank, how, where = args["fail_rank"], args["how"], args.get("where", "loss")
    armed = [False]

    def fail() -> None:
        if not armed[0] or dist.get_rank() != fail_rank:
            return
        Path(args["fault_file"]).write_text(str(time.time()))  # the test measures exits from here
        if how == "exit":
            os._exit(3)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "hang":
            time.sleep(3600)
        raise ValueError("injected failure")

    def failing_loss(out, y):
        if where == "loss":
            fail()
        return loss_fn(out, y)

    pm = auto_parallelize(model, example_inputs=example, loss_fn=failing_loss, method="params",
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), timeout_s=args.get("timeout_s", 5.0),
                          **args["layout"])
    if where == "forward":
        for st in pm.stages:
            st.submod.register_forward_pre_hook(lambda mod, inputs: fail())
    inputs, target = batch(pm.plan.training.global_batch, 1)
    pm.step(*inputs, target=target)  # a good step first: the failure comes mid-run
    armed[0] = True
    pm.step(*inputs, target=target)
    return {"finished": True}


def job_hf_stock(args: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face model exactly as a user builds it (``use_cache`` left on): loss, gradients and
    parameters after one step against a single-process deepcopy."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from partitioner import auto_parallelize

    torch.manual_seed(0)
    # Dropout off so that the reference computes the same function; everything else is GPT2Config's default.
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=SEQ, vocab_size=96,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ref = copy.deepcopy(model)
    use_cache_before = bool(model.config.use_cache)

    def loss_fn(out, y):
        return torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))

    g = torch.Generator().manual_seed(1)
    ids, target = torch.randint(0, 96, (4, SEQ), generator=g), torch.randint(0, 96, (4, SEQ), generator=g)
    opt = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    pm = auto_parallelize(model, example_inputs=(ids[:1],), loss_fn=loss_fn, optimizer=opt, **args["layout"])
    loss = pm.step(ids, target=target)
    grads, params = pm.full_tensors("grad"), pm.full_tensors("param")
    ref_opt = opt(ref.parameters())
    ref_loss = loss_fn(ref(ids), target)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_opt.step()
    ref_params = dict(ref.named_parameters())
    scale_g = max(float(g.abs().max()) for g in ref_grads.values())
    report = dict(
        use_cache_before=use_cache_before, loss=loss, ref_loss=float(ref_loss), names=sorted(grads),
        grad=max(_rel(grads[n], ref_grads[n], 1e-4 * scale_g) for n in grads),
        param=max(_rel(params[n].detach(), ref_params[n].detach(), 1e-6) for n in params),
        stages=list(pm.stage_indices), mesh=str(pm.plan.mesh),
    )
    pm.close()
    return report


def job_wrong_world(args: dict[str, Any]) -> dict[str, Any]:
    """A plan for 4 ranks run on 2, and a plan for the MLP run on GPT-2: both refused before any step."""
    from partitioner import Cluster, plan_parallelism
    from partitioner.runtime import ParallelModel

    model, example, loss_fn, _ = build("mlp")
    plan = plan_parallelism(model, example, Cluster.local(4), global_batch=4, method="params", pp=2, dp=2,
                            dtype="fp32").plan
    out: dict[str, Any] = {"plan_mesh": json.dumps(dict(pp=plan.mesh.pp, tp=plan.mesh.tp, dp=plan.mesh.dp))}
    small = plan_parallelism(model, example, Cluster.local(2), global_batch=2, method="params", pp=2, dtype="fp32").plan
    gpt, gex, gloss, _ = build("gpt2-tiny")
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        ParallelModel(gpt, small, gex, gloss, None)
    except Exception as exc:
        out["wrong_model"] = f"{type(exc).__name__}: {exc}"
    try:
        ParallelModel(model, plan, example, loss_fn, None)
    except Exception as exc:
        out["job_failed"] = f"{type(exc).__name__}: {exc}"
    # Rank 0 holds the job's store: leaving before the other rank's checks are done reset its connection
    # ("DistNetworkError: Connection reset by peer" as rank 1's error, once in a CI run).
    dist.barrier()
    return out


def low_precision_cluster(world: int) -> Any:
    """This machine (``Cluster.local(world)``) with bf16 and fp16 priced as fp32: local-cpu prices fp32 only;
    CPUs compute bf16 and fp16 too (slowly), which is all the tests in low precision need."""
    from partitioner import Cluster

    base = Cluster.local(world)
    peak = base.device.peak_flops["fp32"]
    return dataclasses.replace(base, device=dataclasses.replace(
        base.device, peak_flops={"fp32": peak, "bf16": peak, "fp16": peak}))


def job_precision(args: dict[str, Any]) -> dict[str, Any]:
    """``{"runs": [{"key", "model", "dtype", "layout", "bytes"}]}``: the model cast to ``dtype`` (bf16/fp16)
    and planned with adam-mixed, one step with SGD on fp32 masters against a single-process run of the
    same precision; then, where ``bytes``, a step with the default AdamW and the bytes this rank holds
    against the plan's prediction."""
    import torch

    from partitioner import auto_parallelize
    from partitioner.precision import DTYPES, resident_bytes

    cluster = low_precision_cluster(2)
    out: dict[str, Any] = {}
    for run in args["runs"]:
        dtype = DTYPES[run["dtype"]]
        model, example, loss_fn, batch = build(run["model"])
        model = model.to(dtype)  # module casting: the plan's fingerprint then says bf16/fp16
        example = tuple(x.to(dtype) if x.is_floating_point() else x for x in example)
        ref = copy.deepcopy(model)
        lr = 0.1
        sgd = lambda ps: torch.optim.SGD(ps, lr=lr)  # noqa: E731
        pm = auto_parallelize(model, cluster, example_inputs=example, loss_fn=loss_fn, method="params",
                              optimizer=sgd, **run["layout"])
        gb = pm.plan.training.global_batch
        inputs, target = batch(gb, 1)
        inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
        target = target.to(dtype) if target.is_floating_point() else target
        loss = pm.step(*inputs, target=target)
        scale_after = None if pm.scaler is None else pm.scaler.get_scale()
        scale = 2.0**16 if dtype == torch.float16 else 1.0  # GradScaler's initial scale
        grads = {n: g.float() / scale for n, g in pm.full_tensors("grad").items()}  # fp16: the scaled gradients
        params = {n: t.float() for n, t in pm.full_tensors("param").items()}
        masters = {n: pm.optimizer.masters[i].detach().clone() for i, n in enumerate(pm.params)}
        # The reference: the same precision in one process, fp32 masters and (fp16) a loss scale by hand.
        ref_out = ref(*inputs)  # fp16: the loss in fp32, as the runtime computes it under loss scaling
        ref_loss = loss_fn(ref_out.float() if dtype == torch.float16 else ref_out, target)
        (ref_loss * scale).backward()
        ref_grads = {n: p.grad.float() / scale for n, p in ref.named_parameters()}
        found_inf = any(not torch.isfinite(g).all() for g in ref_grads.values())
        ref_masters = {n: p.detach().float() - (0.0 if found_inf else lr) * ref_grads[n]
                       for n, p in ref.named_parameters()}
        scale_g = max(float(g.abs().max()) for g in ref_grads.values())
        report = dict(
            loss=loss, ref_loss=float(ref_loss.detach()), scale_after=scale_after, ref_skipped=found_inf,
            grad=max(_rel(grads[n], ref_grads[n], 1e-3 * scale_g) for n in grads),
            # the masters' error in units of the step's largest update (lr x the largest gradient)
            master=max(float((masters[n] - ref_masters[n]).abs().max()) for n in masters) / (lr * scale_g),
            # the weights (masters rounded to dtype): beyond one rounding step, in units of the largest update
            param=max(float(((params[n] - ref_masters[n].to(dtype).float()).abs()
                             - torch.finfo(dtype).eps * ref_masters[n].abs()).clamp(min=0).max()) for n in params)
            / (lr * scale_g),
            param_dtypes=sorted({str(p.dtype) for p in pm.params.values()}),
            master_dtypes=sorted({str(m.dtype) for m in pm.optimizer.masters}),
            optimizer=type(pm.optimizer).__name__, names=sorted(grads), all_names=sorted(ref_grads),
            plan_dtype=pm.plan.training.dtype, plan_optimizer=pm.plan.training.optimizer,
        )
        pm.close()
        out[run["key"]] = report
        if not run.get("bytes"):
            continue
        # Bytes with the plan's own optimizer (AdamW on fp32 masters) against its prediction.
        model, example, loss_fn, batch = build(run["model"])
        model = model.to(dtype)
        example = tuple(x.to(dtype) if x.is_floating_point() else x for x in example)
        pm = auto_parallelize(model, cluster, example_inputs=example, loss_fn=loss_fn, method="params",
                              **run["layout"])
        inputs, target = batch(gb, 2)
        inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
        target = target.to(dtype) if target.is_floating_point() else target
        pm.step(*inputs, target=target)
        held = resident_bytes(pm.params.values(), pm.optimizer, [b for m in pm.modules.values() for b in m.buffers()])
        report.update(
            held=dataclasses.asdict(held), held_total=held.total,
            predicted=sum(pm.plan.stages[s].predicted.static_bytes for s in pm.stage_indices),
            recompute=any(pm.plan.stages[s].recompute for s in pm.stage_indices),
            n_params=sum(p.numel() for p in pm.params.values()),
        )
        pm.close()
    return out


def job_measure(args: dict[str, Any]) -> dict[str, Any]:
    """``{"runs": {key: {"model", "layout"}}}``: per layout, a first step and a steady step with memory
    tracked and a recorded step (partitioner/measure.py); each rank reports what it measured, its
    optimizer's scalar state bytes (Adam's step: the memory model leaves them out) and its time components."""
    import torch

    from partitioner import Cluster, auto_parallelize

    out: dict[str, Any] = {}
    for key, run in args["runs"].items():
        model, example, loss_fn, batch = build(run["model"])
        pm = auto_parallelize(model, Cluster.local(int(os.environ["WORLD_SIZE"])), example_inputs=example,
                              loss_fn=loss_fn, method="params", **run["layout"])
        inputs, target = batch(pm.plan.training.global_batch, 1)
        pm.step(*inputs, target=target, track_memory=True)
        first = dataclasses.asdict(pm.memory)
        pm.step(*inputs, target=target, track_memory=True)
        steady = dataclasses.asdict(pm.memory)
        pm.step(*inputs, target=target, record=True)
        inner = getattr(pm.optimizer, "inner", pm.optimizer)
        inner = getattr(inner, "optim", inner)
        scalars = sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
                      if isinstance(v, torch.Tensor) and v.dim() == 0)
        out[key] = dict(first=first, steady=steady, time=dataclasses.asdict(pm.times),
                        components=pm.times.components(), scalar_state_bytes=scalars,
                        recompute=any(pm.plan.stages[s].recompute for s in pm.stage_indices))
        pm.close()
    return out


def job_held(args: dict[str, Any]) -> dict[str, Any]:
    """``{"runs": {key: {"model", "layout"}}}``: per layout (one stage per rank, one micro-batch), the bytes
    made in the step and alive when the loss is called (every saved tensor of the forward and its output;
    partitioner/measure.py's ``StorageMeter.live_bytes``), in each of the steps 2-4. A collective's buffer
    can outlive its wait by a moment, until gloo's thread drops its work (seen once in six runs: an
    all-gather's output alive at the loss's call), so a test takes the least of the three."""
    import gc

    import torch

    from partitioner import auto_parallelize
    from partitioner.measure import StorageMeter

    out: dict[str, Any] = {}
    for key, run in args["runs"].items():
        model, example, loss_fn, batch = build(run["model"])
        meter: list[StorageMeter] = []
        at_loss: list[int] = []

        def held_loss(o, y):
            gc.collect()  # garbage in reference cycles (a collective's wrappers) is not held for the backward
            at_loss.extend(m.live_bytes for m in meter)
            return loss_fn(o, y)

        pm = auto_parallelize(model, example_inputs=example, loss_fn=held_loss, method="params",
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), **run["layout"])
        inputs, target = batch(pm.plan.training.global_batch, 1)
        pm.step(*inputs, target=target)
        for _ in range(3):
            meter.clear()
            with StorageMeter(list(pm.modules.values()), pm.optimizer) as m:
                meter.append(m)
                pm.step(*inputs, target=target)
        out[key] = dict(held_bytes=at_loss,
                        recompute=[list(st.recompute) for st in pm.plan.stages],
                        strategies=sorted(set(pm.plan.sharding.values())))
        pm.close()
    return out


def main(job: str, spec: str, out: str) -> None:
    from partitioner.errors import AutopartError
    from partitioner.watchdog import report

    out = out.replace("{rank}", os.environ.get("RANK", "0"))  # one path per rank under torchrun
    args = json.loads(Path(spec).read_text())
    result = {"job_failed": None}
    try:
        result.update(globals()[f"job_{job}"](args))
    except AutopartError as exc:  # as the CLI does: one line, once per job under torchrun
        report(exc)
        result["job_failed"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # reported to the test, which decides
        import traceback

        traceback.print_exc()
        result["job_failed"] = f"{type(exc).__name__}: {exc}"
    Path(out).write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized() and result["job_failed"] is None:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if result["job_failed"] is None else 1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
