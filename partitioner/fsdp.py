"""ZeRO-2 and ZeRO-3 in the runtime: a stage's blocks as FSDP2 units over the ``dp`` mesh axis.

Part of the run phase (... -> Plan -> rewrite -> **run**). ``runtime/model.py``
calls :func:`shard_stage` on each stage module when the plan's
``training.dp_sharding`` is ``zero2`` or ``zero3`` ([Note: sharding levels]
in dp_sharding.py); everything else (pipelining, the optimizer, checkpoints)
then sees ordinary parameters that happen to be DTensors sharded over ``dp``.

[Note: FSDP units]
``fully_shard`` gathers a module's parameters in that module's forward
pre-hook, so a unit must be a module the stage's graph *calls*. The stage
graphs rewrite.py cuts from ``torch.export`` are flat: every weight is a
``get_attr`` of the stage root. :func:`nest_blocks` therefore folds each
block (a plan module such as ``transformer.h.3``) back into a child
``GraphModule`` at the block's own path, holding the block's parameters
under their own names, so that parameter names, checkpoints and tied-weight
handling are unchanged. A block is folded only where its nodes are one
contiguous run of the graph and its parameters are read by no other node;
everything else (embeddings tied to the LM head, final norms, anything
under tensor parallelism, whose stage runs through ``TensorParallelModule``)
stays with the stage root, which is a unit of its own. The memory model
(``Evaluator.fsdp_units``) prices the same units.

[Note: FSDP under the pipeline schedules]
``torch.distributed.pipelining`` recognizes an ``FSDPModule`` stage and then
defers every reduce-scatter and reshard to the end of the step, holding the
stage's gathered weights and whole gradients through all micro-batches. That
is neither ZeRO-2 nor ZeRO-3 as priced. :class:`ShardedStage` hides the FSDP
root behind a plain module, so FSDP's own hooks run per micro-batch: each
backward reduce-scatters its gradients into the sharded ones (accumulating
over micro-batches) and frees the gathered weights, as the memory model
assumes. FSDP averages over ``dp`` itself, so the runtime only divides by the
number of micro-batches.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from .dp_sharding import DPShardingSpec
from .errors import PlanError

__all__ = ["ShardedStage", "block_of", "nest_blocks", "nest_region", "shard_stage"]

_COMPUTE = ("call_function", "call_method", "call_module")


class ShardedStage(torch.nn.Module):
    """A stage whose FSDP root torch's pipelining does not see ([Note: FSDP under the pipeline schedules])."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return self.inner(*args)


def block_of(node: fx.Node, blocks: Sequence[str]) -> str | None:
    """The block (plan module) whose code made ``node``: the longest block name that prefixes the
    module path torch.export recorded in ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    best = None
    for b in blocks:
        if (path == b or path.startswith(b + ".")) and (best is None or len(b) > len(best)):
            best = b
    return best


def _runs(gm: fx.GraphModule, blocks: Sequence[str]) -> tuple[list[tuple[str | None, list[fx.Node]]], dict[str, int]]:
    """The graph's compute nodes as runs of one block each (None: no block), and how many runs each block has."""
    nodes = list(gm.graph.nodes)
    runs: list[tuple[str | None, list[fx.Node]]] = []
    for n in nodes:
        if n.op not in _COMPUTE:
            continue
        b = block_of(n, blocks)
        if runs and runs[-1][0] == b:
            runs[-1][1].append(n)
        else:
            runs.append((b, [n]))
    count: dict[str, int] = {}
    for b, _ in runs:
        if b is not None:
            count[b] = count.get(b, 0) + 1
    return runs, count


def nest_blocks(gm: fx.GraphModule, blocks: Sequence[str]) -> list[str]:
    """Fold each foldable block of ``gm`` into a child GraphModule at the block's path ([Note: FSDP
    units]); returns the folded block names, in graph order. ``gm`` keeps its parameter names."""
    runs, count = _runs(gm, blocks)
    folded = []
    for b, run in runs:
        if b is None or count[b] != 1:
            continue
        if _fold(gm, b, run):
            folded.append(b)
    gm.graph.lint()
    gm.recompile()
    return folded


def nest_region(gm: fx.GraphModule, block: str, blocks: Sequence[str], at: str) -> bool:
    """Fold ``block`` (one of the stage's ``blocks``) of ``gm`` into a child GraphModule at the new path
    ``at`` that owns no tensor: every weight it reads comes in as an input, read by ``gm``'s own
    ``get_attr``, so that a block whose weights another block reads (a tied embedding or head), or
    that has none, can be called as one module (recompute.py checkpoints it: [Note: recompute in the
    runtime]). False where its nodes are not one contiguous run of the graph."""
    runs, count = _runs(gm, blocks)
    run = next((r for b, r in runs if b == block), None)
    if run is None or count[block] != 1:
        return False
    ok = _fold(gm, block, run, at=at)
    gm.graph.lint()
    gm.recompile()
    return ok


def _fold(gm: fx.GraphModule, block: str, run: list[fx.Node], at: str | None = None) -> bool:
    """Fold ``run`` (the nodes of ``block``) into a child GraphModule: at the block's path owning the
    block's own tensors (``at`` None), or at ``at`` owning none."""
    inside = set(run)
    prefix = block + "."
    owned = []  # get_attr nodes of the block's own tensors, read only inside the run
    external: list[fx.Node] = []
    for n in run:
        for i in n.all_input_nodes:
            if i in inside or i in external or i in owned:
                continue
            if at is None and i.op == "get_attr" and str(i.target).startswith(prefix):
                if any(u not in inside for u in i.users):
                    return False  # the block's tensor is read elsewhere: it stays with the root
                owned.append(i)
            else:
                external.append(i)
    if at is None and not any(isinstance(gm.get_parameter(str(a.target)) if _is_param(gm, str(a.target)) else None,
                                         torch.nn.Parameter) for a in owned):
        return False  # no parameters: nothing to shard
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i in external:
        env[i] = g.placeholder(i.name)
    for a in owned:
        env[a] = g.get_attr(str(a.target)[len(prefix):])
    for n in run:
        env[n] = g.node_copy(n, lambda x: env[x])
    leaving = [n for n in run if any(u not in inside for u in n.users)]
    g.output(tuple(env[n] for n in leaving))
    child = fx.GraphModule(gm.get_submodule(block) if at is None else torch.nn.Module(), g, class_name="Block")
    if at is not None:
        gm.add_submodule(at, child)
    with gm.graph.inserting_before(run[0]):
        # A weightless child's weights, read by the stage right before the call (the graph's own
        # get_attr may come later, or be shared with another block's call).
        args = [gm.graph.get_attr(str(i.target)) if at is not None and i.op == "get_attr" else i for i in external]
        call = gm.graph.call_module(block if at is None else at, tuple(args))
        outs = [gm.graph.call_function(operator.getitem, (call, k)) for k in range(len(leaving))]
    for n, out in zip(leaving, outs):
        out.meta = dict(n.meta)
        n.replace_all_uses_with(out, delete_user_cb=lambda u: u not in inside)
    for n in reversed(run):
        gm.graph.erase_node(n)
    for a in owned:
        gm.graph.erase_node(a)
    if at is not None:
        return True
    parent_name, _, leaf = block.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, child)
    return True


def _submodule(gm: fx.GraphModule, name: str) -> torch.nn.Module | None:
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


def _is_param(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
    except AttributeError:
        return False
    return True


def shard_stage(module: torch.nn.Module, blocks: Sequence[str], dp_mesh: Any, level: DPShardingSpec) -> ShardedStage:
    """``module`` (a stage, already on its device) with its blocks and then its root as FSDP2 units over
    ``dp_mesh``, wrapped for the pipeline schedules ([Note: FSDP under the pipeline schedules])."""
    from torch.distributed.fsdp import fully_shard

    if not level.uses_fsdp:
        raise PlanError(f"shard_stage: dp_sharding {level.name!r} does not use FSDP")
    folded = nest_blocks(module, blocks) if isinstance(module, fx.GraphModule) else []
    # Blocks folded before (a recomputed block, called through a checkpoint: recompute.py) are units too.
    folded += [b for b in blocks if b not in folded and isinstance(module, fx.GraphModule)
               and isinstance(_submodule(module, b), fx.GraphModule)]
    folded.sort(key=list(blocks).index)
    for name in folded:
        fully_shard(module.get_submodule(name), mesh=dp_mesh, reshard_after_forward=level.reshard_after_forward)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=level.reshard_after_forward)
    return ShardedStage(module)
