"""``auto_parallelize``: plan (or take a plan) and build this rank's ``ParallelModel``, under torchrun.

The last phase of autopart (capture -> blocks -> solve -> Plan -> rewrite ->
**run**) starts here for a Python user; ``autopart run`` (loop.py) starts it
from a plan file. Rank 0 plans and broadcasts the plan, so every rank builds
the same one.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from ..cluster import Cluster
from ..devices import init_distributed
from ..errors import AutopartError, PlanError
from ..plan import Plan
from ..rewrite import microbatch_inputs
from ..watchdog import DistributedError, backend_timeout_s
from .model import ParallelModel
from .state import OptimizerFactory

__all__ = ["auto_parallelize", "join_process_group"]


def auto_parallelize(
    model: torch.nn.Module,
    cluster: Cluster | None = None,
    *,
    example_inputs: Sequence[Any],
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    plan: Plan | None = None,
    optimizer: OptimizerFactory | None = None,
    pp: int | None = None,
    tp: int | None = None,
    dp: int | None = None,
    microbatches: int | None = None,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    global_batch: int | None = None,
    method: str = "ilp",
    time_limit_s: float = 30.0,
    timeout_s: float = 20.0,
    init_seed: int = 0,
    zero1: bool = False,
    recompute: bool | None = None,
    dp_sharding: str | None = None,
    sequence_parallel: bool | None = None,
    vocab_chunks: int = 1,
) -> "ParallelModel":
    """Plan (unless ``plan`` is given) and build the distributed model on this rank. Run under torchrun.

    ``example_inputs`` are the model's positional inputs (any batch size);
    ``loss_fn(output, target)`` takes the model's own output and returns a
    mean loss. ``optimizer`` builds the optimizer from an iterable of
    parameters (default AdamW, lr 1e-3). With ``plan=None``, rank 0 plans with
    ``method`` and the pins (``pp``, ``tp``, ...) for ``cluster`` (default
    ``Cluster.local(world_size)``) and broadcasts the plan. ``timeout_s``
    bounds how long a dead peer goes unnoticed (see [Note: failing ranks]).

    ``zero1=True`` plans with the optimizer state sharded over ``dp`` and runs
    it so (``ZeroRedundancyOptimizer``); a given ``plan`` says so in
    ``training.dp_sharding``; ``dp_sharding`` names the least the planner
    must shard (``zero2``, ``zero3``: FSDP2, see fsdp.py). ``recompute=True`` (``False``) pins every stage to
    (not to) replay its forward in backward; ``None`` lets the planner choose
    per stage ([Note: recompute in the runtime] in recompute.py). ``sequence_parallel`` as for
    ``plan_parallelism`` (True: Megatron's sequence-parallel layout under tp; [Note: sequence
    parallelism] in tp_strategies.py). ``vocab_chunks`` > 1 splits the output head's vocabulary, and the loss, into
    that many blocks the planner may put on different stages ([Note: vocabulary chunks] in
    vocab_split.py): the graph then computes the loss itself, the mean cross-entropy of the logits
    against ``target`` (targets of -100 left out), and ``loss_fn`` is not called.

    A model built on ``meta`` (e.g. ``load_model(..., device="meta")``) is
    materialized stage by stage: each rank allocates and initializes only the
    tensors its own stages read (its tp shards of them), deterministically
    from ``init_seed`` (see [Note: deterministic initialization] in
    materialize.py); ``materialize(model, device)`` builds the same weights in
    one process.
    """
    if plan is not None:  # before the process group: a bad plan is refused the same way everywhere
        from ..planner import check_plan

        plan = check_plan(plan, model, example_inputs)
    rank, world = join_process_group(cluster, timeout_s)
    if plan is None:
        cluster = cluster or Cluster.local(world)
        plan = _plan_on_rank0(
            model, example_inputs, cluster, rank,
            dict(method=method, pp=pp, tp=tp, dp=dp, microbatches=microbatches, schedule=schedule, zero1=zero1,
                 dp_sharding=dp_sharding, sequence_parallel=sequence_parallel, vocab_chunks=vocab_chunks,
                 virtual_stages=virtual_stages, recompute=recompute, time_limit_s=time_limit_s,
                 global_batch=global_batch or _batch_of(example_inputs)),
        )
    return ParallelModel(model, plan, example_inputs, loss_fn, optimizer, timeout_s, init_seed)


def join_process_group(cluster: Cluster | None, timeout_s: float = 20.0) -> tuple[int, int]:
    """Start (or join) the job's process group on this rank's own device (see devices.py)."""
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise DistributedError(
                f"no process group and {', '.join(missing)} not set: launch with "
                "`torchrun --nproc-per-node N your_script.py` (or call torch.distributed.init_process_group first)"
            )
        # The watchdog names a failed or hung rank after timeout_s; the backend's own timeout is
        # the backstop behind it ([Note: failing ranks]).
        init_distributed(prefer="cpu" if cluster is not None and cluster.name.startswith("local-cpu") else None,
                         timeout_s=backend_timeout_s(timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _batch_of(inputs: Sequence[Any]) -> int:
    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    if first is None:
        raise PlanError("example_inputs hold no tensor with a batch dimension; pass global_batch=")
    return int(first.shape[0])


def _dtype_key(model: torch.nn.Module) -> str:
    dt = next((p.dtype for p in model.parameters()), torch.float32)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, "fp32")


def _plan_on_rank0(
    model: torch.nn.Module, inputs: Sequence[Any], cluster: Cluster, rank: int, pins: Mapping[str, Any]
) -> Plan:
    """Rank 0 plans and broadcasts the JSON (a time-limited search need not agree across ranks)."""
    payload: list[Any] = [None]
    if rank == 0:
        from ..planner import plan_parallelism

        try:
            batch1 = microbatch_inputs(inputs, 1)
            result = plan_parallelism(model, batch1, cluster, dtype=_dtype_key(model), **pins)
            payload[0] = ("plan", result.plan.to_json(indent=None))
        except AutopartError as exc:
            payload[0] = ("error", str(exc))
    dist.broadcast_object_list(payload, src=0)
    kind, text = payload[0]
    if kind == "error":
        raise PlanError(f"planning on rank 0 failed: {text}")
    return Plan.from_json(text)
