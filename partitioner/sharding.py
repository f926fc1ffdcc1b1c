"""Pricing tensor-parallel layouts of a block, and Megatron-LM's layout.

The strategies themselves (which nodes each applies to, the layouts they need
and produce, their collectives, the parameters they split and how they run)
are one table, ``tp_strategies.STRATEGIES``; see [Note: layouts and
resharding] there. This module prices an assignment of strategies to a
block's nodes (``BlockLayoutCosts``, the one place that says what a strategy
costs) and derives Megatron-LM's layout from data flow
(``megatron_sharding``, see [Note: Megatron layout from data flow]); the ILP
(``partitioner.solver``) chooses strategies from the same costs instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from cost_models import CostModel, NodeRef, OpTime

from .capture import CapturedModel, NodeInfo
from .errors import PlanError
from .tp_strategies import (
    INPUT_LAYOUT,
    OUTPUT_LAYOUT,
    STRATEGIES,
    allowed_strategies,
    is_embedding,
    is_linear_like,
    splits_param,
)

if TYPE_CHECKING:
    from .graph import Block

__all__ = [
    "megatron_sharding",
    "is_linear_like",
    "is_embedding",
    "sharded_params",
    "splits_param",
    "BlockLayoutCosts",
    "NodeOption",
    "OUTPUT_LAYOUT",
    "INPUT_LAYOUT",
    "allowed_strategies",
]


def megatron_sharding(captured: CapturedModel, tp: int, sequence_parallel: bool = False) -> dict[str, str]:
    """Megatron-LM's tensor-parallel layout, for every node that is not replicated.

    [Note: Megatron layout from data flow]
    Walk the graph in order, tracking which tensors are split on their last
    dim. A linear reading a whole tensor becomes ``column`` (its output is
    split); a linear reading a split tensor becomes ``row`` (its output is
    whole again after the all-reduce). Weightless ops on split inputs are
    ``sharded`` and keep the split, except ops that need the whole hidden
    vector (norms, losses), which are left replicated
    and would see a whole tensor. Embeddings with a weight are ``vocab``.
    This yields column-then-row for attention (QKV, then the output
    projection) and for the MLP (up/gate, then down) in GPT-2, Llama and BERT,
    and a column-parallel LM head. It never reads layer names. A strategy that
    ``tp`` cannot realize (heads or features not divisible) falls back to
    ``replicate``, gathering its input.

    With ``sequence_parallel`` (Megatron's ``--sequence-parallel``; [Note:
    sequence parallelism] in tp_strategies.py), a row linear is ``row_seq``
    (reduce-scatter to the tokens) and every node that reads no split
    features and can run on split tokens is ``seq``: the dropout, residual
    add and norm between a row linear and the next column linear.
    """
    split: set[str] = set()
    out: dict[str, str] = {}
    for node in captured.nodes.values():
        if node.op not in ("call_function", "call_method", "call_module") or not node.outputs:
            continue
        allowed = allowed_strategies(node, captured, tp)
        reads_split = any(i in split for i in node.inputs)
        if is_linear_like(node, captured):
            want = "row" if reads_split else "column"
            if want == "row" and sequence_parallel and "row_seq" in allowed:
                want = "row_seq"
        elif is_embedding(node):
            want = "vocab"
        else:
            want = "sharded" if reads_split else "replicate"
            if want == "replicate" and sequence_parallel and "seq" in allowed:
                want = "seq"
        if want not in allowed:
            continue
        if want != "replicate":
            out[node.name] = want
        if OUTPUT_LAYOUT[want] == "S":
            split.add(node.name)
    return out


def sharded_params(captured: CapturedModel, sharding: Mapping[str, str]) -> set[str]:
    """Parameters divided over the tp axis: those read by a column or vocab node, and a row node's weight.

    A row linear's bias stays whole on every tp rank (it is added once, after the all-reduce), as
    the runtime holds it (``param_placements`` in rewrite.py); a meta build of each rank checks that the
    two agree to the byte (partitioner/meta_build.py)."""
    return {
        p
        for name, strat in sharding.items()
        for p in captured.nodes[name].params
        if p in captured.params and splits_param(strat, captured.params[p].shape)
    }


@dataclass(frozen=True, slots=True)
class NodeOption:
    """One node under one strategy, for one micro-batch on one device."""

    compute: OpTime  # the node's own work
    comm: OpTime  # its own collectives (row/vocab forward all-reduce)
    saved_other: float  # bytes of intermediates autograd keeps (not inputs/outputs)
    param_bytes: float  # weight bytes of its parameters held per device (divided by tp when split)


class BlockLayoutCosts:
    """Cost tables of one block under ``tp``-way sharding; see [Note: layouts and resharding]
    in tp_strategies.py.

    ``evaluate(strategies)`` prices an assignment; ``partitioner.solver``
    builds its ILP from the same tables (``options``, ``edge_cost``,
    ``column_input_cost``, ``saved_tensors``), so the two always agree.
    """

    def __init__(
        self,
        captured: CapturedModel,
        block: "Block",
        tp: int,
        micro_batch: int,
        cost_model: CostModel,
        dtype: str,
        read_outside: frozenset[str],
        model_outputs: frozenset[str],
    ) -> None:
        self.captured = captured
        self.block = block
        self.tp = tp
        self.scale = micro_batch / captured.batch_size
        self.cost_model = cost_model
        self.group = tuple(range(tp))  # a tensor-parallel group is tp consecutive ranks
        self.nodes: tuple[str, ...] = tuple(
            n for n in block.nodes if captured.nodes[n].outputs or captured.nodes[n].inputs
        )
        inside = set(self.nodes)
        self.options: dict[str, dict[str, NodeOption]] = {
            n: self._options(captured.nodes[n], dtype) for n in self.nodes
        }
        # Data edges (producer, consumer) inside the block, and boundary inputs.
        self.edges: list[tuple[str, str]] = []
        self.boundary_inputs: list[tuple[str, str]] = []  # (outside producer, consumer)
        for n in self.nodes:
            for i in captured.nodes[n].inputs:
                (self.edges if i in inside else self.boundary_inputs).append((i, n))
        # Tensors that leave the block must be whole, except the model's own outputs.
        self.leaving = [n for n in self.nodes if n in read_outside and n not in model_outputs]
        saved: set[str] = set()
        self.savers: dict[str, set[str]] = {}  # saved tensor -> the block's nodes that save it
        for n in self.nodes:
            info = captured.nodes[n]
            saved.update(info.saved_inputs)
            if info.saves_output:
                saved.add(n)
            for t in (*info.saved_inputs, *((n,) if info.saves_output else ())):
                self.savers.setdefault(t, set()).add(n)
        self.saved_tensors = sorted(saved)

    # --- tables -----------------------------------------------------------------------

    def tensor_bytes(self, name: str) -> float:
        return self.captured.nodes[name].output_bytes * self.scale

    def is_float(self, name: str) -> bool:
        outs = self.captured.nodes[name].outputs
        return bool(outs) and any(t.dtype.startswith(("float", "bfloat")) for t in outs)

    def edge_cost(self, producer: str, produced: str, needed: str) -> OpTime:
        """Resharding of ``producer``'s output from layout ``produced`` to ``needed``.

        ``Q -> R`` is priced here as a forward all-gather; ``evaluate`` charges it once per tensor and
        adds the backward reduce-scatter where a column linear reads it ([Note: sequence parallelism])."""
        if produced == needed or self.tp == 1:
            return OpTime(0.0, 0.0)
        size = self.tensor_bytes(producer)
        gather = self.cost_model.collective_time("all_gather", size, self.group)
        grad = gather if self.is_float(producer) else 0.0
        if produced == "R":  # slice forward, gather the gradient backward
            return OpTime(0.0, grad)
        if needed == "R":  # gather forward, slice the gradient backward
            return OpTime(gather, 0.0)
        return OpTime(gather, grad)  # S <-> Q: gather and re-split, both ways

    def sequence_input_cost(self, tensor: str) -> OpTime:
        """Backward reduce-scatter of the partial gradient of a ``Q`` tensor that column linears read
        gathered; it replaces their input all-reduce ([Note: sequence parallelism])."""
        return OpTime(0.0, self.cost_model.collective_time("reduce_scatter", self.tensor_bytes(tensor), self.group))

    def column_input_cost(self, tensor: str) -> OpTime:
        """Backward all-reduce of the gradient of a tensor read by column-parallel nodes."""
        return OpTime(0.0, self.cost_model.collective_time("all_reduce", self.tensor_bytes(tensor), self.group))

    def _options(self, node: NodeInfo, dtype: str) -> dict[str, NodeOption]:
        cap, k, tp = self.captured, self.scale, self.tp
        allowed = allowed_strategies(node, cap, tp)
        out: dict[str, NodeOption] = {}
        for strat in allowed:
            div = tp if STRATEGIES[strat].divides_work else 1
            if not node.outputs:
                compute = OpTime(0.0, 0.0)  # assertions
            elif node.is_view:
                # An alias launches no kernel and moves no data: zero FLOPs and bytes. A measured
                # or calibrated model still charges its dispatcher call.
                compute = self.cost_model.node_time(node.op_label, 0, 0, 0, dtype, NodeRef(node.name, strat, tp if div > 1 else 1))
            else:
                pbytes = sum(cap.params[p].bytes for p in node.params if p in cap.params)
                moved = (node.bytes_read - pbytes + node.bytes_written) * k + pbytes
                compute = self.cost_model.node_time(
                    node.op_label, node.forward_flops * k / div, node.backward_flops * k / div, moved / div, dtype,
                    NodeRef(node.name, strat, tp if div > 1 else 1), pbytes / div,
                )
            if not node.needs_grad:  # nothing trainable flows into it (masks, positions): no backward
                compute = OpTime(compute.forward_s, 0.0)
            comm = OpTime(0.0, 0.0)
            spec = STRATEGIES[strat]
            if spec.output_all_reduce:
                comm = OpTime(self.cost_model.collective_time("all_reduce", node.output_bytes * k, self.group), 0.0)
            if spec.output_reduce_scatter:  # [Note: sequence parallelism]: gathered again in backward
                comm = OpTime(self.cost_model.collective_time("reduce_scatter", node.output_bytes * k, self.group),
                              self.cost_model.collective_time("all_gather", node.output_bytes * k, self.group))
            if spec.param_grad_all_reduce and node.needs_grad:
                trainable = sum(cap.params[p].bytes for p in node.params if p in cap.params and cap.params[p].trainable)
                if trainable:
                    comm = comm + OpTime(0.0, self.cost_model.collective_time("all_reduce", trainable, self.group))
            held = sum(cap.params[p].bytes / (tp if splits_param(strat, cap.params[p].shape) else 1)
                       for p in node.params if p in cap.params)
            out[strat] = NodeOption(compute, comm, node.saved_bytes * k / div, held)
        return out

    # --- pricing an assignment --------------------------------------------------------

    def evaluate(self, strategies: Mapping[str, str]) -> tuple[OpTime, OpTime, float]:
        """(compute, tp communication, saved activation bytes) of this block under ``strategies``.

        Nodes absent from ``strategies`` replicate; a strategy not allowed for
        a node (``column`` on a norm, heads not divisible by tp) is a PlanError.
        """
        strat = {n: strategies.get(n, "replicate") if self.tp > 1 else "replicate" for n in self.nodes}
        compute = OpTime(0.0, 0.0)
        comm = OpTime(0.0, 0.0)
        saved_other = 0.0
        for n in self.nodes:
            opts = self.options[n]
            if strat[n] not in opts:
                raise PlanError(
                    f"sharding: node {n} ({self.captured.nodes[n].target}) cannot be {strat[n]!r} at tp={self.tp}; "
                    f"allowed: {', '.join(opts)}"
                )
            o = opts[strat[n]]
            compute = compute + o.compute
            comm = comm + o.comm
            saved_other += o.saved_other
        layout = {n: OUTPUT_LAYOUT[s] for n, s in strat.items()}
        gathered: set[str] = set()  # Q tensors read whole inside the block: one gather each
        for u, v in self.edges:
            if layout[u] == "Q" and INPUT_LAYOUT[strat[v]] == "R":
                gathered.add(u)
            else:
                comm = comm + self.edge_cost(u, layout[u], INPUT_LAYOUT[strat[v]])
        for u, v in self.boundary_inputs:
            comm = comm + self.edge_cost(u, "R", INPUT_LAYOUT[strat[v]])
        for u in self.leaving:
            if layout[u] != "Q" or u not in gathered:
                comm = comm + self.edge_cost(u, layout[u], "R")
        for u in sorted(gathered):
            comm = comm + self.edge_cost(u, "Q", "R")
        column_inputs = {
            u for u, v in [*self.edges, *self.boundary_inputs] if STRATEGIES[strat[v]].input_grad_all_reduce
        }
        for u in sorted(column_inputs):
            comm = comm + (self.sequence_input_cost(u) if layout.get(u) == "Q" else self.column_input_cost(u))
        saved = saved_other + sum(self.saved_bytes(t, layout, strat) for t in self.saved_tensors)
        return compute, comm, saved

    def saved_bytes(self, tensor: str, layout: Mapping[str, str], strat: Mapping[str, str]) -> float:
        """Bytes autograd keeps of ``tensor``: 1/tp when split (``S`` or ``Q``) unless a node that
        reads it whole saves it (the gathered copy: a replicated node runs on the whole tensor and
        autograd keeps that); a block input (whole) that only nodes reading it along the tokens save
        is kept as their slices ([Note: sequence parallelism])."""
        savers = [v for v in self.savers.get(tensor, ()) if v != tensor]
        split = layout.get(tensor, "R")
        if split != "R" and any(INPUT_LAYOUT[strat[v]] == "R" for v in savers):
            split = "R"
        if tensor not in layout and savers and all(INPUT_LAYOUT[strat[v]] == "Q" for v in savers):
            split = "Q"
        return self.tensor_bytes(tensor) / (self.tp if split != "R" else 1)

    def core(self, strategies: Mapping[str, str], core: Sequence[str]) -> tuple[float, float]:
        """(forward seconds, saved bytes freed) when the nodes ``core`` (the block's attention core,
        recompute.py) replay in the backward instead of keeping what they save ([Note: recompute per
        block] in recompute.py): their own intermediates, and the tensors they make that no other node
        of the block saves. What they read stays saved: the checkpoint keeps its inputs."""
        inside = set(core) & set(self.nodes)
        if not inside:
            return 0.0, 0.0
        strat = {n: strategies.get(n, "replicate") if self.tp > 1 else "replicate" for n in self.nodes}
        fwd = sum(self.options[n][strat[n]].compute.forward_s + self.options[n][strat[n]].comm.forward_s for n in inside)
        freed = sum(self.options[n][strat[n]].saved_other for n in inside)
        layout = {n: OUTPUT_LAYOUT[s] for n, s in strat.items()}
        for t in self.saved_tensors:
            if t in inside and self.savers.get(t, set()) <= inside:
                freed += self.saved_bytes(t, layout, strat)
        return fwd, freed
