"""``autopart run``: train a plan file on a synthetic (or given) corpus and record what it measured.

The training loop of the CLI: it loads the plan's model on ``meta``, builds
the ``ParallelModel`` (model.py), runs the warm-up and timed steps, and with
``--json`` writes every rank's events, memory by category and time by
component (measure.py) for ``autopart explain --measured``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_unflatten

from ..devices import leave_distributed
from ..errors import AutopartError
from ..measure import RankTime
from ..plan import Plan
from ..vocab_split import output_head
from ..watchdog import DistributedError
from .entry import join_process_group
from .model import ParallelModel
from .state import OptimizerFactory

__all__ = ["run_plan"]


# Steps whose time components `--json` records, after the timed ones: their mean goes to the record, since
# one step's components move by tens of percent on a shared machine (a dp=2 step's exposed reduction read
# 11.3 ms in one recorded step of fidelity-session17-b and 1.3 ms in the next round's).
RECORDED_STEPS = 5


def run_plan(
    plan_path: str | os.PathLike[str],
    model_spec: str | None = None,
    *,
    config: Sequence[str] = (),
    seq_len: int | None = None,
    steps: int = 10,
    warmup: int = 1,
    json_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    data: str | os.PathLike[str] | None = None,
    force: bool = False,
    timeout_s: float = 20.0,
    measure: bool | None = None,
) -> int:
    """``autopart run``: train ``plan_path`` under torchrun on a fixed synthetic corpus (or the token
    file ``data``); print and record step times and losses.

    The model is the one the plan records (``model.source``); ``model_spec``, ``config`` and
    ``seq_len`` replace its parts when given (a plan without a source needs ``model_spec``).
    ``json_path`` must not exist unless ``force`` (checked before any work, as every output path).
    The ``--json`` file (rank 0) is ``{"plan", "world_size", "data", "step_times_s", "losses", "events",
    "peak_memory_bytes"}``; ``events`` are every rank's ``StepEvent`` records of the last measured step
    (docs/runtime.md). The plan is checked against the model before the process group starts
    (``planner.check_plan``). With ``measure`` (the default when ``json_path`` is given), the first step's memory is tracked by
    category and untimed steps follow the timed ones: one tracking steady-state memory, then
    ``RECORDED_STEPS`` recording the time components (measure.py); the ``--json`` file adds ``plan_data``
    (the plan), ``memory`` (each rank's ``RankMemory``, the step of the higher peak), ``times`` (each
    rank's ``RankTime``, the mean of the recorded steps) and ``recorded_steps``.
    """
    from ..capture import model_fingerprint
    from ..corpus import TokenCorpus
    from ..outputs import check_output_file
    from ..planner import check_plan
    from ..zoo import DTYPES_TORCH, load_model, parse_config_overrides

    plan = Plan.load(plan_path)
    # Before any step: a run must never train for minutes and then lose its record (or overwrite one).
    check_output_file(json_path, force, "--json", "run.json")
    measure = json_path is not None if measure is None else measure
    plan.check_consistent()
    source = plan.model_source(model_spec, parse_config_overrides(config), seq_len)
    if source.seq_len is None and plan.model.source is None:  # a version-2 plan: its inputs' shape says
        shapes = plan.model.input_shapes
        if shapes and len(shapes[0]) > 1:
            source = replace(source, seq_len=shapes[0][1])
    dtype = next((k for k, v in DTYPES_TORCH.items() if k == plan.training.dtype), "fp32")
    # Built on meta: each rank materializes only its own stages' weights (seeded), see auto_parallelize.
    loaded = load_model(source.spec, seq_len=source.seq_len, dtype=dtype if dtype != "tf32" else "fp32",
                        config=source.config, device="meta")
    plan.check_matches(model_fingerprint(loaded.model), given=source)  # before the process group: one clear line
    model_spec = source.spec
    model = loaded.model.train()
    plan = check_plan(plan, model, loaded.example_inputs)
    # A language model: token ids in, logits out (a ModelOutput's .logits, or the tensor itself).
    token_ids = all(not x.dtype.is_floating_point for x in loaded.example_inputs if isinstance(x, torch.Tensor))
    if data is not None and not token_ids:
        raise DistributedError(f"--data {data}: model {model_spec} does not take token ids; --data is for language models")
    if not dist.is_initialized() and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
        n = plan.mesh.world_size
        raise DistributedError(f"autopart run trains on {n} ranks: pass --nproc-per-node {n}, or run it under "
                               f"torchrun --nproc-per-node {n} -m partitioner run ...")
    rank, world = join_process_group(None, timeout_s)

    def loss_fn(out: Any, y: torch.Tensor) -> torch.Tensor:
        out = getattr(out, "logits", out)
        if token_ids:
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return torch.nn.functional.mse_loss(out, y)

    # The optimizer the plan priced (its memory): SGD for "sgd", AdamW for the Adam variants.
    opt: OptimizerFactory | None = (lambda ps: torch.optim.SGD(ps, lr=1e-3)) if plan.training.optimizer == "sgd" else None
    pm = ParallelModel(model, plan, loaded.example_inputs, loss_fn, opt, timeout_s=timeout_s, init_seed=seed)
    # The output's shape per micro-batch, from the split (a meta model cannot run a forward).
    last = pm.split.stages[-1].output_specs
    probe = tree_unflatten([torch.empty(shape, dtype=dt, device="meta") for shape, dt in last], pm.split.out_spec)
    out = getattr(probe, "logits", probe)
    chunked = plan.model.vocab_chunks > 1  # the last stage returns the loss ([Note: vocabulary chunks] in vocab_split.py)
    if not chunked and not isinstance(out, torch.Tensor):
        pm.close()
        raise DistributedError(f"model {model_spec}: its output is neither a tensor nor has .logits; autopart run cannot make a loss for it")
    vocab = output_head(model)[1].out_features if chunked else out.shape[-1]  # what a token-id model's logits span
    gb = plan.training.global_batch
    gen = torch.Generator().manual_seed(seed + 1)
    corpus: TokenCorpus | None = None
    if token_ids:  # a fixed corpus the model can learn from (see partitioner/corpus.py)
        ids_shape = loaded.example_inputs[0].shape
        window = int(ids_shape[1]) if len(ids_shape) > 1 else 1
        try:
            corpus = TokenCorpus.make(vocab, window, data, seed=seed)
        except AutopartError:
            pm.close()
            raise
        data_source = corpus.source
    else:  # a fixed set of regression batches, cycled
        fixed = [
            (tuple(torch.randn((gb, *x.shape[1:]), generator=gen, dtype=x.dtype) for x in loaded.example_inputs),
             torch.randn((gb, *out.shape[1:]), generator=gen, dtype=out.dtype))
            for _ in range(4)
        ]
        data_source = "synthetic regression (4 fixed batches, cycled)"

    def batch(step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if corpus is None:
            return fixed[step % len(fixed)]
        ids, target = corpus.batch(step, gb, window)
        # Further inputs (rare for a language model) keep random values of their shape.
        rest = [torch.randint(0, vocab, (gb, *x.shape[1:]), generator=gen) for x in loaded.example_inputs[1:]]
        return (ids, *rest), target

    times: list[float] = []
    losses: list[float] = []
    total = warmup + steps
    memory: list[Any] = []  # this rank's RankMemory of the first step and of a steady one
    try:
        for i in range(total):
            inputs, target = batch(i)
            dist.barrier()
            t0 = time.perf_counter()
            first = measure and i == 0 and warmup > 0  # the optimizer's state is made in it: a peak of its own
            loss = pm.step(*inputs, target=target, record=i == total - 1 and not measure, track_memory=first)
            dt = time.perf_counter() - t0
            memory += [pm.memory] if first else []
            if i >= warmup:
                times.append(dt)
                losses.append(loss)
            if rank == 0:
                label = "warmup" if i < warmup else f"step {i - warmup + 1}/{steps}"
                print(f"{label:>12}  {dt * 1e3:9.1f} ms  loss {loss:.4f}", flush=True)
        recorded: list[RankTime] = []
        if measure:  # more steps, untimed: steady-state memory, then the components (profiled under tp)
            for kind in ("track_memory",) + ("record",) * RECORDED_STEPS:
                inputs, target = batch(total)
                dist.barrier()
                pm.step(*inputs, target=target, **{kind: True})
                memory += [pm.memory] if kind == "track_memory" else []
                recorded += [pm.times] if kind == "record" and pm.times is not None else []
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [asdict(e) for e in pm.events])
        measured: list[Any] = [None] * world  # [Note: measured time components] in measure.py
        if measure:
            mine = dict(memory=asdict(max(memory, key=lambda m: m.peak_bytes)), time=asdict(RankTime.mean(recorded)))
            dist.all_gather_object(measured, mine)
        # Each rank's peak allocated device memory (CUDA only; the CPU allocator keeps no such count).
        peak = int(torch.cuda.max_memory_allocated(pm.device)) if pm.device.type == "cuda" else None
        peaks: list[Any] = [None] * world
        dist.all_gather_object(peaks, peak)
    finally:
        pm.close()
    if rank == 0:
        mean = sum(times) / len(times)
        print(f"{plan.model.name} · mesh {plan.mesh} · {plan.schedule.name}: mean step {mean * 1e3:.1f} ms "
              f"over {steps} steps ({gb / mean:.1f} samples/s)")
        if json_path is not None:
            record = dict(plan=str(plan_path), world_size=world, data=data_source, step_times_s=times, losses=losses,
                          events=[e for rank_events in gathered for e in rank_events], peak_memory_bytes=peaks)
            if measure:  # what `autopart explain --measured` reads: the plan itself and each rank's measurements
                record.update(plan_data=plan.to_dict(), memory=[m["memory"] for m in measured],
                              times=[m["time"] for m in measured], recorded_steps=RECORDED_STEPS)
            tmp = Path(str(json_path) + ".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(json_path)
            print(f"wrote {json_path}")
    leave_distributed()  # after a last barrier: [Note: the last barrier] in devices.py
    return 0
