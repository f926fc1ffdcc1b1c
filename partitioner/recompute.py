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

    act_s  = sum_{b in R} in_b + sum_{b not in R} (sv_b - σ core_b)
    rec_s  = sum_{b in R} f_b  + σ sum_{b not in R} fc_b          (added to its backward)
    work_s = max(max_{b in R} sv_b, σ max_{b not in R} core_b)     (one replay live at a time)

and ``work_s`` is held once (in ``static_bytes``), not per micro-batch. With ``R`` all
blocks and ``σ`` off this is the former whole-stage recomputation; a plan of version 4 or
older with ``recompute: true`` loads as exactly that. Megatron-LM's "selective" mode
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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from cost_models import op_class

if TYPE_CHECKING:
    from .capture import CapturedModel

__all__ = ["is_attention_core", "attention_core"]


def is_attention_core(target: str) -> bool:
    """Whether an op (its target, ``aten.scaled_dot_product_attention.default``) is an attention core."""
    return op_class(str(target)) == "attention"


def attention_core(nodes: Iterable[str], captured: "CapturedModel") -> tuple[str, ...]:
    """The attention-core nodes among ``nodes`` (names in ``captured``), in their order."""
    return tuple(n for n in nodes if is_attention_core(captured.nodes[n].target))
