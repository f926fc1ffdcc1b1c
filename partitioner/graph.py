"""The partition graph: annotated nodes as a networkx DiGraph, coarsened into blocks.

Second phase of autopart: ``capture()`` gives annotated FX nodes; this module
groups them into **blocks** aligned to module boundaries (for a transformer:
embedding, each layer, final norm, head), totals each block's costs, sizes the
tensors that flow between blocks, and finds repeated identical blocks so that
later phases can solve one block type once. Planners assign blocks to stages.

[Note: how nodes become blocks]
1. Layer containers are the ``nn.ModuleList``/``nn.Sequential`` modules with
   the most children that own parameters (``transformer.h``, ``model.layers``,
   ``encoder.block`` and ``decoder.block`` of an encoder-decoder), chosen
   greedily so that none contains another.
2. A node's *key* is the first module on its module stack that is not an
   ancestor of a container: a container element (``transformer.h.3``) or a
   sibling of the containers (``transformer.wte``, ``lm_head``).
3. A key that owns parameters makes a block (a *strong* node). Other nodes
   (root-level glue, dropout, rotary tables, mask building) join the block of
   their latest producer; if they read only graph inputs, the block open at
   that point of the graph, or the first block that consumes them.
4. A node may join a block only if every producer is in that block or an
   earlier one; otherwise the module was re-entered after later blocks ran and
   the node opens a new block segment (``name@2``). Block edges therefore
   always point forward: the block order is a topological order.

[Note: tensors several blocks read]
Some tensors are read by many blocks: every layer of a Llama reads the causal mask and the
rotary ``cos`` and ``sin`` (made once, in the embedding's block), every layer of a GPT-2
the mask. Each is one storage. ``Block.input_bytes`` counts it at every block that reads
it, since a block alone cannot know which others share its stage; ``Block.inputs`` names
the tensors, and ``PartitionGraph.storage_of`` the storage behind each (a view's is the
tensor it views, as ``to_4`` of Llama's ``cos`` is ``mul_1``'s; a view of a buffer is
resident memory, not an activation). The evaluator counts each storage once per stage per
micro-batch (``evaluate.kept_inputs_bytes``): the checkpoints of a stage's recomputed
blocks keep references to the same tensor. The graph builds the mask and the tables again
in every forward (they are ops, not buffers), so each micro-batch in flight holds its own.
Measured with the storage meter (tests/test_recompute.py, every block recomputed): llama-tiny
(4 layers) keeps 111,104 bytes at the end of its forward, what the model now counts, where
adding the blocks' ``input_bytes`` gave 147,968; its second stage of two 77,824 (90,112).
Left over-counted: a stage's output that a checkpoint of the stage also keeps (the mask,
``cos`` and ``sin`` leaving Llama's first stage: 12,288 bytes there) is counted as both, and a
tensor that the blocks *save* without recomputation (``cos`` and ``sin`` through each
layer's ``unsqueeze``) is counted in each block's ``activation_bytes``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Iterable, Mapping, Sequence

import networkx as nx
import torch

from .capture import CapturedModel, NodeInfo
from .errors import CaptureError

__all__ = ["Block", "BlockEdge", "PartitionGraph", "TensorFlow", "build_partition_graph"]


@dataclass(frozen=True, slots=True)
class Block:
    """A group of nodes aligned to a module. All figures are per capture batch."""

    index: int  # position in the block order (a topological order)
    name: str  # the module FQN it is named after, e.g. "transformer.h.3"
    modules: tuple[str, ...]  # every module FQN whose nodes it holds
    nodes: tuple[str, ...]  # FX node names, in graph order
    is_layer: bool  # an element of a layer container (a transformer layer)
    params: tuple[str, ...]  # canonical FQNs of the parameters/buffers it reads
    param_count: int  # trainable elements among ``params``
    param_bytes: int  # bytes of ``params`` (parameters and buffers)
    forward_flops: int
    backward_flops: int
    bytes_read: int
    bytes_written: int
    activation_bytes: int  # bytes autograd keeps for backward between forward and backward
    # Bytes of the tensors entering the block from outside it, each counted here: a tensor that several
    # blocks read (a causal mask, rotary cos/sin) is counted at each of them, though a stage holds its
    # storage once ([Note: tensors several blocks read]).
    input_bytes: int
    inputs: tuple[str, ...]  # the nodes whose outputs enter the block from outside it, sorted by name
    output_bytes: int  # bytes of the tensors its nodes produce that other blocks read
    signature: str  # structure hash; equal for repeated identical blocks
    type_id: int  # index of its signature among the distinct block types

    @property
    def flops(self) -> int:
        return self.forward_flops + self.backward_flops


@dataclass(frozen=True, slots=True)
class BlockEdge:
    """Tensors flowing from one block to another (skip connections included)."""

    src: int
    dst: int
    bytes: int  # total bytes of the distinct tensors src produces and dst reads
    tensors: tuple[str, ...]  # names of the producing nodes


@dataclass(frozen=True, slots=True)
class TensorFlow:
    """One tensor that a block produces and later blocks read (counted once, whatever the readers)."""

    producer: int  # index of the producing block
    readers: tuple[int, ...]  # indices of the blocks that read it, sorted
    bytes: float  # its size: per capture batch in the partition graph, per micro-batch in a StageProblem
    # a float tensor a trainable parameter flows into: its gradient comes back across a cut (a mask or a
    # rotary table does not; torch's stage sends no gradient for it)
    needs_grad: bool = True


@dataclass(frozen=True, slots=True)
class Cut:
    """What a pipeline cut carries per capture batch: its bytes, and its tensors, which torch's stage sends
    each as its own point-to-point operation ([Note: software overheads] in cost_models/overheads.py)."""

    bytes: int  # of every tensor crossing it
    forward: int  # tensors sent to the next stage
    backward: int  # gradients sent back: those of the tensors that need one


class PartitionGraph:
    """Annotated nodes (``graph``), blocks, and the block-level DAG (``block_graph``)."""

    def __init__(self, captured: CapturedModel, blocks: Sequence[Block], edges: Sequence[BlockEdge]) -> None:
        self.captured = captured
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.edges: tuple[BlockEdge, ...] = tuple(edges)
        self._block_of_node = {n: b.index for b in self.blocks for n in b.nodes}
        self._flows = self._compute_flows()
        self._storage: dict[str, tuple[str, int] | None] = {}  # node -> storage_of(node)
        # Nodes whose output another block (or the graph's output) reads, and the model's outputs.
        outputs = [n for n in captured.nodes.values() if n.op == "output"]
        self.model_outputs: frozenset[str] = frozenset(i for o in outputs for i in o.inputs)
        # their bytes at the capture batch: what the loss reads, for its memory and its time
        self.output_bytes: int = sum(captured.nodes[n].output_bytes for n in self.model_outputs)
        self.read_outside: frozenset[str] = frozenset(
            i
            for n in captured.nodes.values()
            for i in n.inputs
            if i in self._block_of_node and self._block_of_node.get(n.name) != self._block_of_node[i]
        )

    # --- networkx views (built on first use: planning never needs them) ----------------

    @cached_property
    def graph(self) -> nx.DiGraph:
        """Every annotated FX node, with data edges sized in bytes."""
        return _node_graph(self.captured)

    @cached_property
    def block_graph(self) -> nx.DiGraph:
        """The block-level DAG: a node per block (``block=``), edges with ``bytes`` and ``tensors``."""
        g = nx.DiGraph()
        for b in self.blocks:
            g.add_node(b.index, block=b)
        for e in self.edges:
            g.add_edge(e.src, e.dst, bytes=e.bytes, tensors=e.tensors)
        return g

    @cached_property
    def split_backward_roots(self) -> tuple[str, ...]:
        """Nodes that apply a trainable weight to inputs that need no gradient (an embedding of token
        ids, T5's relative position bias): a split-backward schedule makes their weight's gradient only
        on the first stage ([Note: weights a split backward cannot reach])."""
        trainable = {name for name, p in self.captured.params.items() if p.trainable}
        nodes = self.captured.nodes
        return tuple(
            n.name for n in nodes.values()
            if any(p in trainable for p in n.params) and not any(nodes[i].needs_grad for i in n.inputs)
        )

    def split_backward_refused(self, stage_blocks: Sequence[Sequence[int]]) -> str | None:
        """The first split-backward root node outside the first of the stages ``stage_blocks`` (block
        indices per stage, in stage order), or None when a split-backward schedule can train them."""
        first = set(stage_blocks[0]) if stage_blocks else set()
        for n in self.split_backward_roots:
            block = self._block_of_node.get(n)
            if block is not None and block not in first:
                return n
        return None

    # --- queries the planners use -----------------------------------------------------

    def block_of(self, node: str) -> int:
        return self._block_of_node[node]

    def block_index(self, name: str) -> int:
        """The index of the block named ``name`` (a module FQN); a clear error if there is none."""
        for b in self.blocks:
            if b.name == name or name in b.modules:
                return b.index
        import difflib

        near = difflib.get_close_matches(name, [b.name for b in self.blocks], n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; blocks are {self.blocks[0].name} .. {self.blocks[-1].name}"
        raise CaptureError(f"no block is named {name!r}{hint}")

    def boundary_bytes(self, k: int) -> int:
        """Bytes that cross a pipeline cut placed before block ``k`` (blocks < k | blocks >= k).

        A tensor produced before the cut and read at or after it crosses once,
        however many later blocks read it: pipelining forwards it stage to stage.
        """
        return sum(t.bytes for t in self._flows if t.producer < k <= t.readers[-1])

    def stage_boundary_bytes(self, cuts: Sequence[int]) -> list[int]:
        """Bytes crossing each cut in ``cuts`` (each a block index where a new stage begins)."""
        return [self.boundary_bytes(k) for k in cuts]

    def block_types(self) -> dict[int, list[int]]:
        """type_id -> indices of the blocks of that type (repeated blocks share a type)."""
        out: dict[int, list[int]] = {}
        for b in self.blocks:
            out.setdefault(b.type_id, []).append(b.index)
        return out

    def shared_params(self) -> dict[str, list[int]]:
        """Parameters read by more than one block (tied weights), with the blocks that read them."""
        readers: dict[str, list[int]] = {}
        for b in self.blocks:
            for p in b.params:
                readers.setdefault(p, []).append(b.index)
        return {p: bs for p, bs in readers.items() if len(bs) > 1}

    def storage_of(self, node: str) -> tuple[str, int] | None:
        """The node whose output owns the storage of ``node``'s output, and that storage's bytes (per capture
        batch); None for a view of a parameter or buffer, which is resident, not an activation. See
        [Note: tensors several blocks read]."""
        if node not in self._storage:
            nodes = self.captured.nodes
            n = nodes[node]
            # Through views of views to the first tensor that is not one; a view of one of several outputs
            # (``getitem`` of a tuple) is that output's own storage.
            while n.is_view and len(n.inputs) == 1 and len(nodes[n.inputs[0]].outputs) == 1:
                n = nodes[n.inputs[0]]
            resident = n.is_view and not n.inputs and bool(n.params)
            self._storage[node] = None if resident else (n.name, n.output_bytes)
        return self._storage[node]

    def params_bytes(self, blocks: Iterable[int]) -> tuple[int, int]:
        """(trainable elements, bytes) of the distinct parameters read by ``blocks`` (tied ones once)."""
        names = {p for i in blocks for p in self.blocks[i].params}
        table = self.captured.params
        count = sum(table[n].numel for n in names if table[n].trainable)
        size = sum(table[n].bytes for n in names)
        return count, size

    # --- internals --------------------------------------------------------------------

    def tensor_flows(self) -> list[TensorFlow]:
        """Every tensor that another block reads: its producer, readers and size."""
        return list(self._flows)

    def _compute_flows(self) -> list[TensorFlow]:
        nodes = self.captured.nodes
        readers: dict[str, set[int]] = {}
        for b in self.blocks:
            for n in b.nodes:
                for i in nodes[n].inputs:
                    if i in self._block_of_node and self._block_of_node[i] != b.index:
                        readers.setdefault(i, set()).add(b.index)
        return [
            TensorFlow(producer=self._block_of_node[prod], readers=tuple(sorted(rs)), bytes=nodes[prod].output_bytes,
                       needs_grad=nodes[prod].needs_grad and any(o.dtype.startswith(("float", "bfloat"))
                                                                  for o in nodes[prod].outputs))
            for prod, rs in sorted(readers.items())
        ]

    def crossings(self, stage_of: Sequence[int]) -> list[Cut]:
        """What crosses each cut (after stage k) when block i is on stage ``stage_of[i]``.

        A tensor crosses every cut between its producer's stage and its last
        reader's stage, once per cut (pipelining forwards it stage to stage).
        """
        stages = max(stage_of) + 1 if stage_of else 0
        size, forward, backward = ([0] * max(0, stages - 1) for _ in range(3))
        for t in self._flows:
            for k in range(stage_of[t.producer], max(stage_of[r] for r in t.readers)):
                size[k] += t.bytes
                forward[k] += 1
                backward[k] += t.needs_grad
        return [Cut(*c) for c in zip(size, forward, backward, strict=True)]


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------


# [Note: weights a split backward cannot reach]
# torch's split-backward stages (``zb``, ``zbv``, ``dualpipev``: input gradients in one action,
# weight gradients later) find a stage's weights by walking back from its outputs to its inputs
# that need a gradient (torch.distributed.pipelining's ``stage_backward_input``); the first stage
# is the exception, run as a full backward. On any other stage a weight applied to tensors that
# need no gradient, such as T5's decoder embedding of the decoder's token ids or its relative
# position bias of position buckets, is on no such path, and its gradient is never made (found
# as a hang in the tied-weight sum of T5 under zbv, one rank holding no gradient, and as a
# silently missing gradient under zb). So the planners offer split-backward schedules only for
# splits whose first stage holds every such node (``PartitionGraph.split_backward_refused``). A
# plan that breaks this, given or planned under a pinned schedule, is refused when it is planned
# (``plan_parallelism``) and before it runs (``check_plan``), by planner.check_split_backward.


def build_partition_graph(captured: CapturedModel, model: torch.nn.Module | None = None) -> PartitionGraph:
    """Coarsen ``captured`` into blocks; see [Note: how nodes become blocks].

    ``model`` (the captured module) is used to find layer containers; without
    it they are inferred from the module FQNs in the graph.
    """
    nodes = captured.nodes
    compute = [n for n in nodes.values() if n.op in ("call_function", "call_method", "call_module")]
    if not compute:
        raise CaptureError(f"{captured.name}: the traced graph has no operations to partition")
    containers = _layer_containers(captured, model)
    # A container and everything above it are not blocks themselves: their children are.
    ancestors = {""} | {".".join(c.split(".")[:k]) for c in containers for k in range(1, c.count(".") + 2)}
    owners = _param_owners(captured)

    def key_of(n: NodeInfo) -> str:
        for m in n.module_stack:
            if m not in ancestors:
                return m
        return n.module_stack[-1] if n.module_stack else ""

    def is_layer(key: str) -> bool:
        return any(_contains(c, key) and key != c and "." not in key[len(c) + bool(c) :] for c in containers)

    strong_keys = {key_of(n) for n in compute if key_of(n) not in ancestors and owners.get(key_of(n))}
    if not strong_keys:  # a model without parameters: every module is its own block
        strong_keys = {key_of(n) for n in compute}

    # Assign nodes to block segments (see the Note, steps 3 and 4).
    seg_of_node: dict[str, int] = {}
    seg_key: list[str] = []
    latest_seg: dict[str, int] = {}
    pending: list[NodeInfo] = []
    for n in compute:
        producers = [seg_of_node[i] for i in n.inputs if i in seg_of_node]
        need = max(producers, default=-1)
        key = key_of(n)
        if key in strong_keys:
            seg = latest_seg.get(key)
            if seg is None or seg < need:
                seg = len(seg_key)
                seg_key.append(key)
                latest_seg[key] = seg
            seg_of_node[n.name] = seg
        elif producers:
            seg_of_node[n.name] = need
        elif seg_key:  # glue that reads only graph inputs (mask building): the block that is open
            seg_of_node[n.name] = len(seg_key) - 1
        else:
            pending.append(n)
    if not seg_key:
        raise CaptureError(f"{captured.name}: no node could be placed in a block")
    consumers: dict[str, list[str]] = {}
    for n in compute:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n.name)
    for n in reversed(pending):  # reverse topological: consumers are resolved first
        segs = [seg_of_node[c] for c in consumers.get(n.name, []) if c in seg_of_node]
        seg_of_node[n.name] = min(segs) if segs else 0
    # A pending node placed before one of its producers would point an edge backwards.
    for n in compute:
        need = max((seg_of_node[i] for i in n.inputs if i in seg_of_node), default=0)
        if seg_of_node[n.name] < need:
            seg_of_node[n.name] = need

    members: list[list[str]] = [[] for _ in seg_key]
    for n in compute:
        members[seg_of_node[n.name]].append(n.name)
    order = [i for i in range(len(seg_key)) if members[i]]
    renum = {old: new for new, old in enumerate(order)}
    seg_of_node = {k: renum[v] for k, v in seg_of_node.items()}
    counts: dict[str, int] = {}
    names = []
    for old in order:
        k = seg_key[old] or "<root>"
        counts[k] = counts.get(k, 0) + 1
        names.append(k if counts[k] == 1 else f"{k}@{counts[k]}")

    blocks = [
        _make_block(captured, i, names[i], members[old], is_layer(seg_key[old]), seg_of_node)
        for i, old in enumerate(order)
    ]
    blocks = _assign_types(blocks)
    edges = _block_edges(captured, blocks, seg_of_node)
    return PartitionGraph(captured, blocks, edges)


def _layer_containers(captured: CapturedModel, model: torch.nn.Module | None) -> list[str]:
    """Module FQNs of the layer containers (see the Note, step 1).

    A container qualifies when at least two of its parameter-owning children
    share a class (GPT-2's ``h``, T5's ``encoder.block``); T5's per-block
    ``layer`` list, whose children are all different, does not. Larger
    containers (by parameters, then children) are chosen first and none may
    contain another.
    """
    candidates: list[tuple[int, int, str]] = []
    if model is not None:
        for fqn, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
                continue
            classes: dict[type, int] = {}
            total = 0
            for sub in mod.children():
                n = sum(p.numel() for p in sub.parameters())
                if n:
                    classes[type(sub)] = classes.get(type(sub), 0) + 1
                    total += n
            if max(classes.values(), default=0) >= 2:
                candidates.append((total, len(list(mod.children())), fqn))
    else:  # without the module tree: a parent whose children are named 0, 1, 2, ...
        kids: dict[str, set[str]] = {}
        for n in captured.nodes.values():
            for m in n.module_stack:
                parent, _, last = m.rpartition(".")
                if last.isdigit():
                    kids.setdefault(parent, set()).add(m)
        candidates = [(len(k), len(k), fqn) for fqn, k in kids.items() if len(k) >= 2]
    chosen: list[str] = []
    for _, _, fqn in sorted(candidates, key=lambda t: (-t[0], -t[1], t[2])):
        if not any(_contains(c, fqn) or _contains(fqn, c) for c in chosen):
            chosen.append(fqn)
    return chosen


def _contains(outer: str, inner: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _param_owners(captured: CapturedModel) -> dict[str, bool]:
    """Module FQN -> True if it or a submodule owns a trainable parameter read in the graph."""
    owners: dict[str, bool] = {}
    for n in captured.nodes.values():
        if n.params and any(captured.params[p].trainable for p in n.params if p in captured.params):
            for m in n.module_stack:
                owners[m] = True
    return owners


def _make_block(
    captured: CapturedModel, index: int, name: str, names: list[str], layer: bool, seg_of_node: Mapping[str, int]
) -> Block:
    nodes = [captured.nodes[n] for n in names]
    inside = set(names)
    params = tuple(dict.fromkeys(p for n in nodes for p in n.params))
    table = captured.params
    saved: dict[str, int] = {}  # tensor (node name) -> bytes kept for backward
    other_saved = 0
    for n in nodes:
        for s in n.saved_inputs:
            if s in captured.nodes:
                saved[s] = captured.nodes[s].output_bytes
        if n.saves_output:
            saved[n.name] = n.output_bytes
        other_saved += n.saved_bytes
    inputs = sorted({i for n in nodes for i in n.inputs if i not in inside})
    input_bytes = sum(captured.nodes[i].output_bytes for i in inputs)
    read_outside = {i for m in captured.nodes.values() if m.name not in inside for i in m.inputs}
    output_bytes = sum(n.output_bytes for n in nodes if n.name in read_outside)
    modules = tuple(dict.fromkeys(n.module for n in nodes if n.module))
    return Block(
        index=index,
        name=name,
        modules=modules,
        nodes=tuple(names),
        is_layer=layer,
        params=params,
        param_count=sum(table[p].numel for p in params if p in table and table[p].trainable),
        param_bytes=sum(table[p].bytes for p in params if p in table),
        forward_flops=sum(n.forward_flops for n in nodes),
        backward_flops=sum(n.backward_flops for n in nodes),
        bytes_read=sum(n.bytes_read for n in nodes),
        bytes_written=sum(n.bytes_written for n in nodes),
        activation_bytes=sum(saved.values()) + other_saved,
        input_bytes=input_bytes,
        inputs=tuple(inputs),
        output_bytes=output_bytes,
        signature=_block_signature(captured, nodes, inside),
        type_id=-1,
    )


def _block_signature(captured: CapturedModel, nodes: list[NodeInfo], inside: set[str]) -> str:
    """Hash of the block's ops, their output shapes, parameter shapes and internal wiring."""
    local = {n.name: i for i, n in enumerate(nodes)}
    h = hashlib.sha256()
    for n in nodes:
        wiring = [local.get(i, -1) for i in n.inputs]
        pshapes = [captured.params[p].shape for p in n.params if p in captured.params]
        # An fx call_module target is the module's FQN ("h.3.attn"), unique per layer: use its class.
        op = n.module_type if n.op == "call_module" else n.target
        h.update(repr((op, [(t.shape, t.dtype) for t in n.outputs], wiring, pshapes)).encode())
    return h.hexdigest()[:16]


def _assign_types(blocks: list[Block]) -> list[Block]:
    types: dict[str, int] = {}
    out = []
    for b in blocks:
        tid = types.setdefault(b.signature, len(types))
        out.append(replace(b, type_id=tid))
    return out


def _block_edges(captured: CapturedModel, blocks: list[Block], seg_of_node: Mapping[str, int]) -> list[BlockEdge]:
    acc: dict[tuple[int, int], dict[str, int]] = {}
    for b in blocks:
        for n in b.nodes:
            for i in captured.nodes[n].inputs:
                src = seg_of_node.get(i)
                if src is not None and src != b.index:
                    acc.setdefault((src, b.index), {})[i] = captured.nodes[i].output_bytes
    return [BlockEdge(s, d, sum(t.values()), tuple(t)) for (s, d), t in sorted(acc.items())]


def _node_graph(captured: CapturedModel) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in captured.nodes.values():
        g.add_node(n.name, info=n)
    for n in captured.nodes.values():
        for i in n.inputs:
            g.add_edge(i, n.name, bytes=captured.nodes[i].output_bytes)
    return g
