"""The registry of data-parallel sharding levels: what each shards over ``dp``, and how it runs.

One table that the plan (which names ``training.dp_sharding`` accepts), the
memory model (``cost_models.memory.static_bytes``, through evaluate.py), the
cost model (which collectives a step runs), the search and the baselines
(which levels they try) and the runtime (DDP, ``ZeroRedundancyOptimizer`` or
FSDP2's ``fully_shard``) all read, so that a level is added in one place.

Glossary as in plan.py; a **unit** is what ``fully_shard`` gathers at once:
one block (a transformer layer) where the stage's graph can call it as a
module, and the stage's root for the rest ([Note: FSDP units] in fsdp.py).

[Note: sharding levels]
- ``none``: DDP. Every replica holds whole weights, gradients and optimizer
  state; one all-reduce of the gradients per step, after the last backward.
- ``zero1``: ``ZeroRedundancyOptimizer``. The optimizer state (Adam's m and
  v, not the fp32 masters: see precision.py) is sharded; gradients are
  all-reduced as with DDP, and each rank broadcasts its updated share.
- ``zero2``: FSDP2 with ``reshard_after_forward=False``. At rest, weights,
  gradients, fp32 masters and optimizer state are all sharded (dim-0 chunks,
  ``torch.chunk``'s sizes). Each micro-batch all-gathers each unit's weights
  in its forward and keeps them until the unit's backward has reduce-scattered
  the gradients: with several micro-batches in flight the stage's whole
  weights are held for most of the step. Per micro-batch: one all-gather and
  one reduce-scatter of the stage's weights.
- ``zero3``: FSDP2 with ``reshard_after_forward=True``. As ``zero2``, but a
  unit's gathered weights are freed after its forward and gathered again in
  its backward: two units' weights at a time (the one computing and the next,
  prefetched), plus the stage root's. Per micro-batch: two all-gathers and
  one reduce-scatter.
- ``hsdp``: FSDP2 on a 2-D ``(dp_rep, dp_shard)`` mesh: ZeRO-3 within a node
  (the dp ranks of one node shard), replicated across nodes. Memory as
  ``zero3`` with ``dp_shard`` for ``dp``; per micro-batch the gathers and the
  reduce-scatter stay on the fast intra-node link, and each node's gradient
  shard is all-reduced across nodes (``hsdp_shard`` says how the dp group
  splits). Where the dp group lies in one node it is ``zero3``; with one dp
  rank per node, DDP with sharded weights.

Levels that use FSDP run the full backward only: the split-backward
schedules compute weight gradients with ``autograd.grad``, which FSDP's
hooks never see; they are refused in one line. A recomputed stage's
checkpoint wraps its FSDP units, so ZeRO-3 gathers each unit's weights a
third time for the replayed forward (ZeRO-2 still holds them). HSDP
(shard within a node, replicate across nodes) is not here yet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import PlanError

__all__ = ["DPShardingSpec", "REGISTRY", "DP_SHARDINGS", "spec", "check_dp_sharding", "hsdp_shard"]


@dataclass(frozen=True, slots=True)
class DPShardingSpec:
    """One data-parallel sharding level ([Note: sharding levels])."""

    name: str
    shards_optimizer: bool  # Adam's m and v (and, with FSDP, the fp32 masters) are divided over dp
    shards_grads: bool  # gradients are reduce-scattered into shards, not all-reduced
    shards_params: bool  # weights are held sharded at rest and all-gathered per micro-batch
    reshard_after_forward: bool | None  # fully_shard's argument; None where FSDP is not used
    gathers_per_microbatch: int  # all-gathers of the stage's weights per micro-batch (forward, backward)
    description: str
    within_node: bool = False  # shards over the dp ranks of one node only, replicated across nodes (HSDP)

    @property
    def uses_fsdp(self) -> bool:
        return self.reshard_after_forward is not None


REGISTRY: dict[str, DPShardingSpec] = {
    s.name: s
    for s in (
        DPShardingSpec("none", False, False, False, None, 0, "DDP: whole replicas, gradients all-reduced"),
        DPShardingSpec("zero1", True, False, False, None, 0, "optimizer state sharded (ZeroRedundancyOptimizer)"),
        DPShardingSpec("zero2", True, True, True, False, 1,
                       "FSDP2, weights kept gathered from forward to backward (ZeRO-2)"),
        DPShardingSpec("zero3", True, True, True, True, 2,
                       "FSDP2, weights regathered in backward (ZeRO-3)"),
        DPShardingSpec("hsdp", True, True, True, True, 2,
                       "FSDP2 sharded within a node, replicated across nodes (HSDP)", within_node=True),
    )
}
DP_SHARDINGS = tuple(REGISTRY)


def spec(name: str) -> DPShardingSpec:
    """The registry entry of ``name``; a one-line error naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise PlanError(f"training.dp_sharding {name!r} is not one of {', '.join(DP_SHARDINGS)}") from None


def check_dp_sharding(name: str, schedule: str, splits_backward: bool, recompute: bool) -> None:
    """Refuse a level the runtime cannot run with this schedule ([Note: sharding levels]); every level
    runs with recomputation (``recompute`` is kept for the callers' symmetry with check_recompute)."""
    entry = spec(name)
    if not entry.uses_fsdp:
        return
    if splits_backward:
        raise PlanError(f"training.dp_sharding {name!r} runs FSDP, whose hooks do not see the weight gradients of "
                        f"schedule {schedule!r} (a split backward); use gpipe, 1f1b or interleaved, or dp_sharding zero1")


def hsdp_shard(dp_ranks: Sequence[int], node_of: Callable[[int], int]) -> int:
    """How many of the dp group ``dp_ranks`` share each node: HSDP's shard degree (``hsdp``).

    The mesh puts a stage's dp ranks on consecutive devices, so every node holds the same
    number of them; a group that does not split evenly is refused in one line."""
    per_node: dict[int, int] = {}
    for r in dp_ranks:
        per_node[node_of(r)] = per_node.get(node_of(r), 0) + 1
    counts = set(per_node.values())
    if len(counts) != 1:
        raise PlanError(f"training.dp_sharding 'hsdp': the dp group {list(dp_ranks)} spreads unevenly over nodes "
                        f"({dict(sorted(per_node.items()))}); use dp_sharding zero3")
    return counts.pop()
