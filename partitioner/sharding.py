"""Per-node tensor-parallel strategies and the layouts they produce.

A plan says, per FX node, how the ``tp`` axis splits it: ``replicate`` (every
tensor-parallel rank computes it whole), ``column`` (a linear whose weight is
split by output features; its output is split on the last dim), ``row`` (a
linear whose weight is split by input features; it reads a split input and
its partial sums are all-reduced), ``vocab`` (an embedding split by
vocabulary; partial lookups are all-reduced) and ``sharded`` (a weightless op
that works on split data, e.g. attention over a subset of heads).

``megatron_sharding`` derives Megatron-LM's layout from data flow rather than
from layer names (see [Note: Megatron layout from data flow]); the ILP
(a later phase) chooses strategies from costs instead.
"""

from __future__ import annotations

from typing import Mapping

from .capture import CapturedModel, NodeInfo

__all__ = ["megatron_sharding", "is_linear_like", "is_embedding"]

_LINEAR = ("aten.linear", "aten.addmm", "aten.mm", "aten.matmul", "linear", "addmm")
# Ops that need the whole hidden vector, so they cannot run on a split last dim.
_NEEDS_FULL = ("layer_norm", "native_layer_norm", "rms_norm", "mean", "softmax", "log_softmax", "cross_entropy", "nll_loss")


def is_linear_like(node: NodeInfo, captured: CapturedModel) -> bool:
    """A matmul against a 2-D weight parameter (nn.Linear, F.linear, GPT-2's Conv1D)."""
    base = node.target.split(".")
    name = ".".join(base[:2]) if node.target.startswith("aten.") else node.target
    if name not in _LINEAR and node.target not in _LINEAR:
        return False
    return any(len(captured.params[p].shape) == 2 for p in node.params if p in captured.params)


def is_embedding(node: NodeInfo) -> bool:
    return "embedding" in node.target and bool(node.params)


def megatron_sharding(captured: CapturedModel) -> dict[str, str]:
    """Megatron-LM's tensor-parallel layout, for every node that is not replicated.

    [Note: Megatron layout from data flow]
    Walk the graph in order, tracking which tensors are split on their last
    dim. A linear reading a whole tensor becomes ``column`` (its output is
    split); a linear reading a split tensor becomes ``row`` (its output is
    whole again after the all-reduce). Weightless ops on split inputs are
    ``sharded`` and keep the split, except ops that need the whole hidden
    vector (norms, softmax over features, losses), which are left replicated
    and would see a whole tensor. Embeddings with a weight are ``vocab``.
    This yields column-then-row for attention (QKV, then the output
    projection) and for the MLP (up/gate, then down) in GPT-2, Llama and BERT,
    and a column-parallel LM head. It never reads layer names.
    """
    split: set[str] = set()
    out: dict[str, str] = {}
    for node in captured.nodes.values():
        if node.op not in ("call_function", "call_method", "call_module") or not node.outputs:
            continue
        reads_split = any(i in split for i in node.inputs)
        if is_linear_like(node, captured):
            if reads_split:
                out[node.name] = "row"
            else:
                out[node.name] = "column"
                split.add(node.name)
        elif is_embedding(node):
            out[node.name] = "vocab"
        elif reads_split and not any(k in node.target for k in _NEEDS_FULL):
            out[node.name] = "sharded"
            split.add(node.name)
    return out


def sharded_params(captured: CapturedModel, sharding: Mapping[str, str]) -> set[str]:
    """Parameters divided over the tp axis: those read by a column, row or vocab node."""
    return {
        p
        for name, strat in sharding.items()
        if strat in ("column", "row", "vocab")
        for p in captured.nodes[name].params
    }
