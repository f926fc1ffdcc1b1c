"""What a stage recomputes in its backward: whole blocks, or only their attention core.

The evaluator prices it, the planner's search chooses it (solver/recompute.py) and the
runtime realizes it with ``torch.utils.checkpoint`` (runtime stage building). This module
is the one place that says which nodes of a block are its *attention core*, so that the
three agree.

[Note: recompute per block]
A plan stage lists the blocks it recomputes (``Stage.recompute``, module names, a
subset of its ``modules``) and whether its other blocks recompute their attention
core (``Stage.selective``). Per micro-batch in flight a block then holds:

* kept (neither): its saved activations ``sv_b``; no extra time;
* recomputed (in ``recompute``): only its inputs ``in_b`` (the checkpoint's), and
  its backward first replays its forward ``f_b`` (compute and tp collectives);
  during that backward its ``sv_b`` is live again once;
* selective (``selective`` and not in ``recompute``): ``sv_b - core_b``, where
  ``core_b`` is what only the attention core saves (its intermediates, and the
  tensors it makes that nothing else in the block saves; its inputs q, k, v and
  the mask stay, as the checkpoint's inputs), and its backward first replays the
  core's forward ``fc_b``; during that backward ``core_b`` is live again once.

So a stage with recomputed set ``R`` and selective flag ``σ`` has, per micro-batch,

    act_s  = sum_{b in R} in_b(s) + sum_{b not in R} (sv_b - σ core_b)
    rec_s  = sum_{b in R} f_b  + σ sum_{b not in R} fc_b          (added to its backward)
    work_s = max_b (nd_b + [b in R] sv_b + σ [b not in R] core_b)  (one block's backward at a time)

where ``in_b(s)`` is as in [Note: a recomputed block's inputs] (under sequence parallelism
a ``Q`` input made in the stage counts 1/tp), ``nd_b`` is the most one node of ``b`` needs for its gradients: a block's replay runs
in its own backward, beside its own nodes' gradients only, never another block's.
``work_s`` is held once, during a backward (``backward_workspace_bytes``), not per
micro-batch (evaluate.py's ``backward_work``). With ``R`` all
blocks and ``σ`` off this is full recomputation, as Megatron-LM's checkpointing of each
layer; a plan of version 4 or older with ``recompute: true`` loads as exactly that. The
runtime checkpoints every block of ``R`` on its own in that case too, so the saved set per
micro-batch is every block's inputs (not only the stage's), and the replay holds one
block's ``sv_b`` at a time, never the whole stage's. Megatron-LM's "selective" mode
recomputes the same core (``core_attention``): softmax(QK^T/sqrt(d))V, whose saved
tensors grow with seq^2 in an eager attention. With a fused attention kernel
(``scaled_dot_product_attention``: flash or memory-efficient) the core saves only its
output and the log-sum-exp, so selective recomputation frees little there, and the
planner takes it only where that little is what makes a stage fit.

Attention cores are recognized as the attention kernels of the cost models' ``op_class``
(fused ``scaled_dot_product_attention`` and its flash/efficient/cudnn variants). An
eager attention written as separate matmul, softmax and matmul ops is not recognized: a
block of that kind has no core, selective recomputation frees nothing there, and the
search does not choose it.

[Note: a recomputed block's inputs]
A recomputed block keeps what its checkpoint is called with: every tensor entering the
block (``in_b`` above). Under sequence parallelism ([Note: sequence parallelism] in
tp_strategies.py) the runtime passes a ``Q`` tensor from block to block inside a stage as
the DTensor its producer made, ``Shard`` on the token dim (the interpreter gathers it only
for the nodes that read it whole, inside the region that reads it), and
``torch.utils.checkpoint`` keeps that DTensor, whose storage is the rank's local shard. A
stage's received inputs are whole (stage boundaries carry whole tensors). So for block
``b`` of stage ``S``

    in_b(S) = sum_{t enters b} bytes_t / (tp if layout(src t) = Q and block(src t) in S else 1)

Measured (tests/test_sequence_parallel.py; gpt2-tiny, tp=2, every block recomputed): at
the loss's call, the end of the forward, the storage meter finds each of the 4 layers',
the final norm's and the head's inputs held as a half, 6144 bytes less than without
sequence parallelism, exactly the model's difference; llama-tiny alike for its layers.
A storage that several recomputed blocks of ``S`` keep (the causal mask, rotary ``cos`` and
``sin``: every layer reads them) is one storage, counted once per stage per micro-batch
([Note: tensors several blocks read] in graph.py), so a stage's recomputed set ``R`` keeps

    in(R, S) = sum_{u kept by a block of R} bytes_u / (tp if layout(src u) = Q and block(src u) in S else 1)

(``evaluate.kept_inputs_bytes``; ``BlockCost.kept_input_bytes`` is one block's ``in_b(S)``
alone). ``BlockCost.input_bytes``, the figure the pipeline ILP and the search read per
block, is what ``b`` adds to ``in(R, S)`` when the block before it is in ``S`` and
recomputed: its ``Q`` inputs from that block count 1/tp, and a storage that block keeps
too counts 0. Summed over a stage that recomputes every block it is exact but for the
stage's first block, where it is optimistic by ``(1 - 1/tp)`` of the ``Q`` tensors the
previous block makes and by the storages the previous block keeps too (on Llama-2 70B,
the mask and ``cos``/``sin``, 18 MiB per micro-batch at 4096 tokens), per micro-batch in
flight. ``BlockCost.whole_input_bytes`` is what a block keeps when it begins its stage; the
search keeps the most of that excess over any block free in the ILP's memory limit, once per
micro-batch in flight on a rank (``BlockTable.first_input_bytes`` in solver/search.py), so the
ILP's memory constraint is conservative there rather than optimistic (an ILP plan that the
evaluator finds too big is dropped). The evaluator prices every plan with ``in(R, S)`` and
decides whether it fits.
Not priced yet: ``cos``/``sin`` and the mask are counted per sample, though they have no
batch dim (exact at one sample per micro-batch, the capture's batch).

[Note: recompute in the runtime]
Each choice runs as ``torch.utils.checkpoint`` (non-reentrant) around exactly what the
plan names, each block on its own, whether the stage recomputes some blocks or all of them
(a stage once ran as one checkpoint around its whole forward when it recomputed every block;
its backward then replayed, and held, all its blocks at once). Without tensor parallelism
(``checkpoint_in_graph``), each recomputed block is folded into a child GraphModule at its
own path (``fsdp.nest_blocks``, the folding FSDP's units use, so parameter names stay)
and its call becomes ``checkpoint(block, *inputs)``. A block that cannot own its weights
(another block reads them: GPT-2's tied embedding and head) or has none is folded instead
into a weightless child at ``region_path(block)`` (``fsdp.nest_region``) that takes every
weight it reads as an input, read by the stage's own ``get_attr``. This runs before FSDP
shards the stage, so a folded block becomes the FSDP unit the checkpoint calls; under
ZeRO-3 the unit's replay runs inside its backward, after FSDP's pre-backward hook has
regathered it (FSDP2 skips its forward hooks then), so the replay gathers nothing more
and holds the unit gathered, as ZeRO-3's backward does anyway. A weightless child's
weights belong to the stage root's unit, which FSDP keeps gathered through the backward.
Each attention core of the other
blocks becomes ``checkpoint(op, *inputs)`` in the graph that holds it (the stage, or a
block FSDP folded). With tensor parallelism the stage runs node by node under DTensor
(rewrite.py), so there the same choices are *regions* of nodes (``recompute_regions``): a
recomputed block's nodes, or one core node; the interpreter runs each region as one
checkpointed function (``run_region``); a tied block's weights are read there as the
region's inputs. A block whose nodes cannot be folded into one module (they interleave
with another block's) cannot be recomputed on its own, and the plan is refused naming it.
Every one of these calls is ``checkpointed`` ([Note: a replay that stops early]).

[Note: a replay that stops early]
A non-reentrant checkpoint stops its replay, by default, as soon as the backward has every
tensor it saved: it raises an exception inside the replayed function and catches it. When
that function is a GraphModule (a folded block), the exception passes fx's ``_WrappedCall``,
which extracts the traceback of every exception it sees (a ``linecache`` ``stat`` per frame)
before re-raising it. On the CPU of development that cost 0.1 ms per recomputed block and
micro-batch in the backward, more than the block's own replay (mlp, pp2 interleaved, 2
blocks a stage: each checkpoint's backward took 0.32 ms with the early stop, 0.22 ms
without, alone; the tiny linear blocks of ``autopart calibrate``'s experiment, nn.Linear,
never showed it: calibration priced 0.18 ms). ``checkpointed`` passes ``early_stop=False``:
the replay runs the block to its end, the last ops after its last saved tensor (a GELU, a
residual add: elementwise), which costs less than the traceback. Calibration times the same
call on GraphModule blocks ([Note: measuring overheads] in calibrate.py). The tensor-parallel
interpreter's regions (``run_region``) keep the early stop: their replay is a plain closure,
which no fx wrapper sees, and there the ops after the last saved tensor include the
row-parallel all-reduce (a reduce-scatter with sequence parallelism), a collective per block
and micro-batch the early stop spares. The evaluator prices the whole replay either way, so
under tp it is a little above the runtime's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch.fx as fx

from cost_models import op_class

from .errors import PlanError
from .fsdp import block_of, nest_blocks, nest_region

if TYPE_CHECKING:
    from .capture import CapturedModel
    from .plan import Stage

__all__ = ["is_attention_core", "attention_core", "checkpointed", "checkpoint_in_graph", "recompute_regions", "region_path", "run_region"]


def is_attention_core(target: str) -> bool:
    """Whether an op (its target, ``aten.scaled_dot_product_attention.default``) is an attention core."""
    return op_class(str(target)) == "attention"


def attention_core(nodes: Iterable[str], captured: "CapturedModel") -> tuple[str, ...]:
    """The attention-core nodes among ``nodes`` (names in ``captured``), in their order."""
    return tuple(n for n in nodes if is_attention_core(captured.nodes[n].target))


def checkpointed(function: Callable[..., Any], *args: Any, early_stop: bool = False, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` under ``torch.utils.checkpoint`` as the runtime runs every
    recomputation: non-reentrant, its replay not stopped early unless ``early_stop`` ([Note: a replay
    that stops early]). ``autopart calibrate`` times this same call (partitioner/calibrate.py)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False, early_stop=early_stop, **kwargs)


def _compute(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method", "call_module")


def checkpoint_in_graph(gm: fx.GraphModule, stage: "Stage") -> None:
    """``gm`` (a stage without tensor parallelism, possibly with FSDP's folded blocks) calling the
    stage's recomputed blocks and, with ``selective``, the other blocks' attention cores through
    ``torch.utils.checkpoint``, in place ([Note: recompute in the runtime])."""
    wanted = [b for b in stage.modules if b in set(stage.recompute)]
    regions: dict[str, str] = {}  # block -> the path of the weightless module it was folded into
    if wanted:
        folded = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        if any(b not in folded for b in wanted):
            nest_blocks(gm, [b for b in wanted if b not in folded])
        calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in set(wanted)}
        for b in [b for b in wanted if b not in calls]:  # its weights are read elsewhere, or it has none
            at = region_path(b)
            if nest_region(gm, b, stage.modules, at):
                regions[b] = at
        calls.update({b: n for n in gm.graph.nodes for b, at in regions.items()
                      if n.op == "call_module" and n.target == at})
        lost = [b for b in wanted if b not in calls]
        if lost:
            raise PlanError(f"stages[{stage.index}].recompute names {lost[0]!r}, whose nodes the runtime cannot fold "
                            "into one module (they interleave with another block's); leave that block out of the "
                            "stage's recompute list")
        for b in wanted:
            node = calls[b]
            with gm.graph.inserting_before(node):
                block = gm.graph.get_attr(regions.get(b, b))
                new = gm.graph.call_function(checkpointed, (block, *node.args), dict(node.kwargs))
            _swap(gm.graph, node, new)
        gm.graph.lint()
        gm.recompile()
    if stage.selective:
        for name, sub in gm.named_modules():
            if not isinstance(sub, fx.GraphModule) or name in set(wanted) or name in set(regions.values()):
                continue
            cores = [n for n in sub.graph.nodes if n.op == "call_function" and is_attention_core(str(n.target))
                     and (name or block_of(n, stage.modules)) not in set(wanted)]
            for node in cores:
                with sub.graph.inserting_before(node):
                    new = sub.graph.call_function(checkpointed, (node.target, *node.args), dict(node.kwargs))
                _swap(sub.graph, node, new)
            if cores:
                sub.graph.lint()
                sub.recompile()


def region_path(block: str) -> str:
    """Where ``checkpoint_in_graph`` puts the weightless module of a recomputed ``block`` that cannot
    own its weights (``fsdp.nest_region``): a child of the stage that no model attribute uses."""
    return "recompute_" + block.replace(".", "_")


def _swap(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)


def recompute_regions(gm: fx.GraphModule, stage: "Stage") -> tuple[tuple[str, ...], ...]:
    """The node regions (names, in graph order) of a tensor-parallel stage graph that run
    checkpointed ([Note: recompute in the runtime]): each recomputed block's nodes, and with
    ``selective`` each attention core of the other blocks, alone."""
    wanted = set(stage.recompute)
    nodes = [n for n in gm.graph.nodes if _compute(n)]
    out: list[tuple[str, ...]] = []
    for b in [m for m in stage.modules if m in wanted]:
        mine = [n for n in nodes if block_of(n, stage.modules) == b]
        if not mine:
            raise PlanError(f"stages[{stage.index}].recompute names {b!r}, whose nodes the runtime does not find in "
                            "the stage; leave that block out of the stage's recompute list")
        out.append(tuple(n.name for n in mine))
    if stage.selective:
        out += [(n.name,) for n in nodes if n.op == "call_function" and is_attention_core(str(n.target))
                and block_of(n, stage.modules) not in wanted]
    return tuple(out)


def run_region(nodes: Sequence[fx.Node], env: dict[fx.Node, Any], run: Callable[[fx.Node, tuple, dict], Any]) -> dict[fx.Node, Any]:
    """Run ``nodes`` (a region of one graph, in order) as one checkpointed function of the values
    they read from ``env``; ``run(node, args, kwargs)`` runs one node. Returns the values of the
    region's nodes that nodes outside it read ([Note: recompute in the runtime]). A weight
    (``get_attr``) the region reads before the graph's own turn to read it is read here."""
    inside = set(nodes)
    external: list[fx.Node] = []
    for n in nodes:
        for i in n.all_input_nodes:
            if i not in inside and i not in external:
                external.append(i)
    values = {i: env[i] if i in env else run(i, (), {}) for i in external if i in env or i.op == "get_attr"}
    absent = [i for i in external if i not in values]  # a weight the graph reads later is read here
    if absent:
        raise PlanError(f"node {nodes[0].name} begins a recomputed region that reads {absent[0].name}, which the stage "
                        "computes only later; leave its block out of the stage's recompute list")
    leaving = [n for n in nodes if any(u not in inside for u in n.users)]

    def replay(*values: Any) -> tuple:
        local = dict(zip(external, values))
        for n in nodes:
            args = fx.node.map_arg(n.args, lambda x: local[x])
            kwargs = fx.node.map_arg(n.kwargs, lambda x: local[x])
            local[n] = run(n, args, kwargs)
        return tuple(local[n] for n in leaving)

    # a plain closure, not a GraphModule: the early stop costs nothing here, and it spares the replay the
    # region's trailing collective (a row-parallel all-reduce) ([Note: a replay that stops early])
    outs = checkpointed(replay, *(values[i] for i in external), early_stop=True)
    return dict(zip(leaving, outs))
