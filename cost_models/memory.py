"""Memory per device: parameters, gradients, optimizer state and activations.

Used by every planner and the simulator to decide whether a plan fits. The
defaults follow ZeRO (Rajbhandari et al., 2020, Sec. 3.1): mixed-precision
Adam keeps 2 bytes of half-precision weights, 2 of gradients and 12 of fp32
state (master weights, momentum, variance) per parameter, 16 bytes in all.
When the plan computes in fp32 (or tf32, which computes on fp32 tensors) there is
nothing to keep a master copy of: adam-mixed then holds what plain Adam holds,
4 + 4 + 8 = 16 bytes (``optimizer_spec``), as the runtime does
(``PrecisionPolicy.master_dtype`` is None in partitioner/precision.py).

Beyond what is resident, a training step allocates memory that lives only for
part of it; each term below is a mechanism of torch or of our runtime, sized
from shapes and dtypes (docs/solver.md, "Memory"), and checked against the
dispatch-mode storage meter (partitioner/measure.py) in tests/test_memory_model.py:

- ``optimizer_workspace_bytes``: the optimizer step's temporaries.
- ``loss_memory``: what the loss keeps from its forward to its backward, and the
  gradients its backward makes ([Note: the loss's memory]).

[Note: the optimizer step's workspace]
What the step allocates beyond the state depends on the implementation the run uses
(``adamw_factory`` in partitioner/precision.py picks it, and the evaluator prices the same one):

- ``fused`` (the runtime's AdamW on CUDA, as in torchtitan's default ``implementation =
  "fused"`` and Megatron-LM's fused Adam from apex / Transformer Engine): one multi-tensor
  kernel updates the weights, m and v in place: no workspace (measured on CPU's fused kernel,
  tests/test_memory_model.py).
- ``single`` (torch's default on CPU, the runtime's there): the denominator
  ``sqrt(v) / sqrt(bias2) + eps`` is made out of place one parameter at a time, two fp32 copies
  of one parameter's state at once (the square root, then its quotient): ``2 x 4 x`` the
  largest parameter's elements.
- ``foreach`` (torch's default on CUDA when no implementation is asked for): the square root of
  every state tensor of the group in one call, ``4 x`` the sum of the elements.

SGD with momentum updates in place: no workspace.

Under mixed precision the update runs on fp32 masters, whose fp32 gradients the step makes from
the parameters' low-precision ones (``MasterWeightOptimizer`` in partitioner/precision.py). It
makes them a chunk at a time (``MASTER_GRAD_CHUNK`` elements, a parameter larger than that on its
own), steps the chunk and frees them, so ``4 x`` the largest chunk is live beside the update's
workspace: at most ``4 x min(all, max(chunk, largest))``. Two paths make them all at once, ``4 x``
the sum: fp16's loss scaler, which unscales every gradient before it steps, and ZeRO-1, whose
``ZeroRedundancyOptimizer.step`` broadcasts every parameter (a step per chunk would repeat it).
The step's workspace is priced per stage; a rank with several stages steps them together, so
for it the all-at-once terms are a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .base import load_record

__all__ = [
    "OptimizerSpec",
    "OPTIMIZERS",
    "FULL_PRECISION",
    "optimizer_spec",
    "static_bytes",
    "optimizer_workspace_bytes",
    "OPTIMIZER_IMPLS",
    "MASTER_GRAD_CHUNK",
    "optimizer_impl",
    "LossMemory",
    "LOSSES",
    "loss_memory",
    "RecordedMargin",
    "MARGIN_FILE",
    "recorded_margin",
]


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    """Bytes kept per trainable parameter, beyond the weights themselves."""

    name: str
    grad_bytes: int  # gradient, per parameter
    state_bytes: int  # optimizer state (and fp32 master copy), per parameter
    # Of state_bytes, the fp32 master copy: every dp rank keeps it whole (the runtime's
    # MasterWeightOptimizer); ZeRO-1 shards the rest (Adam's m and v).
    master_bytes: int = 0
    # The step's out-of-place temporaries, in fp32 copies of one state tensor: held at once per
    # tensor by the single-tensor implementation, over the whole group by foreach, none by fused
    # ([Note: the optimizer step's workspace]).
    step_copies: int = 0

    def __post_init__(self) -> None:
        if self.grad_bytes < 0 or self.state_bytes < 0 or not 0 <= self.master_bytes <= self.state_bytes:
            raise ValueError(f"optimizer {self.name}: byte counts must be >= 0, the master copy within the state")
        if self.step_copies < 0:
            raise ValueError(f"optimizer {self.name}: step_copies must be >= 0")


OPTIMIZERS = {
    # ZeRO paper, Sec. 3.1: fp16/bf16 weights + grads, fp32 master + Adam m, v.
    "adam-mixed": OptimizerSpec("adam-mixed", grad_bytes=2, state_bytes=12, master_bytes=4, step_copies=2),
    # Plain fp32 Adam: fp32 grads, m and v (weights counted separately at 4 bytes).
    "adam": OptimizerSpec("adam", grad_bytes=4, state_bytes=8, step_copies=2),
    # SGD with momentum in fp32.
    "sgd": OptimizerSpec("sgd", grad_bytes=4, state_bytes=4, step_copies=0),
}

# Plan dtypes whose tensors are fp32: no half-precision copy, so no separate fp32 master.
FULL_PRECISION = frozenset({"fp32", "tf32"})


def optimizer_spec(name: str, dtype: str) -> OptimizerSpec:
    """The bytes ``name`` keeps per parameter when the plan computes in ``dtype``.

    adam-mixed in fp32/tf32 keeps fp32 gradients and Adam's m and v, and no master copy
    (the weights are the master): plain Adam's 4 + 8 bytes. Raises KeyError for an unknown name.
    """
    spec = OPTIMIZERS[name]
    if name == "adam-mixed" and dtype in FULL_PRECISION:
        return OptimizerSpec(name, grad_bytes=4, state_bytes=8, step_copies=spec.step_copies)
    return spec


def static_bytes(
    param_count: int, weight_bytes: int, optimizer: OptimizerSpec, dp: int = 1, zero1: bool = False
) -> int:
    """Resident bytes on one device for ``param_count`` trainable parameters it holds.

    ``weight_bytes`` are the bytes of the weights as stored (already divided by
    the tensor-parallel degree where sharded); ``dp`` shards the optimizer
    state when ``zero1`` is set, all but the fp32 master copy, which the runtime keeps
    whole on every replica (``partitioner/precision.py``).
    """
    master = optimizer.master_bytes * param_count
    state = (optimizer.state_bytes - optimizer.master_bytes) * param_count
    if zero1:
        state = -(-state // max(1, dp))
    return int(weight_bytes + optimizer.grad_bytes * param_count + master + state)


STATE_BYTES = 4  # optimizer state is fp32 (Adam's m and v, the masters)


# The optimizer step's implementations ([Note: the optimizer step's workspace]).
OPTIMIZER_IMPLS = ("single", "foreach", "fused")
# Elements of fp32 master gradients made at once by MasterWeightOptimizer's chunked step (256 MiB).
MASTER_GRAD_CHUNK = 1 << 26


def optimizer_impl(device_type: str) -> str:
    """The AdamW implementation the runtime runs on ``device_type`` (``adamw_factory`` in
    partitioner/precision.py) and the evaluator prices: ``fused`` on CUDA, torch's default on CPU
    (``single``) ([Note: the optimizer step's workspace])."""
    return "fused" if device_type == "cuda" else "single"


def optimizer_workspace_bytes(
    optimizer: OptimizerSpec, numels: Sequence[int], impl: str, *, master_numels: Sequence[int] | None = None,
    master_chunk: int | None = None,
) -> int:
    """Bytes the optimizer step allocates beyond the state ([Note: the optimizer step's workspace]).

    ``numels`` are the elements of the parameters this device's optimizer updates (its shards); the
    update's temporaries are ``step_copies`` fp32 copies of the largest one (``single``), one copy of
    them all (``foreach``, or of one chunk of masters) or none (``fused``). With fp32 masters
    (``optimizer.master_bytes``), ``master_numels`` (default ``numels``) are the parameters whose
    gradients the step copies up to fp32, ``master_chunk`` elements at a time (None: all at once).
    Raises ValueError for an ``impl`` not in OPTIMIZER_IMPLS.
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer implementation {impl!r} is not one of {', '.join(OPTIMIZER_IMPLS)}")
    masters = list(numels if master_numels is None else master_numels)
    grads = 0
    if optimizer.master_bytes and masters:
        grads = sum(masters) if master_chunk is None else min(sum(masters), max(master_chunk, max(masters)))
    if not numels or optimizer.step_copies == 0 or impl == "fused":
        return STATE_BYTES * grads
    if impl == "foreach":
        group = sum(numels) if not optimizer.master_bytes or master_chunk is None else min(sum(numels), grads)
        return STATE_BYTES * (grads + group)
    return STATE_BYTES * (grads + optimizer.step_copies * max(numels))


@dataclass(frozen=True, slots=True)
class LossMemory:
    """What the loss adds on the last stage, per micro-batch ([Note: the loss's memory])."""

    saved_bytes: int  # kept from the loss's forward to its backward (per micro-batch in flight)
    backward_bytes: int  # allocated by the loss's backward, live together at its end


# [Note: the loss's memory]
# ``autopart run`` trains a model that takes token ids with cross-entropy over its output's
# last dimension and any other model with the mean squared error (partitioner/runtime.py,
# ``run_plan``). ``F.cross_entropy`` is ``log_softmax`` then ``nll_loss``: log_softmax saves
# its output (one output-sized tensor), and the backward makes nll_loss's gradient and then
# log_softmax's, both output-sized and live together. ``F.mse_loss`` saves its input and
# target, which exist anyway, and its backward makes the difference and the gradient, two
# output-sized tensors. Sizes are in the output's dtype.
# A loss the graph computes (``in_graph``: the vocabulary in chunks) is priced with its blocks: nothing after.
LOSSES = {"cross_entropy": (1, 2), "mse": (0, 2), "in_graph": (0, 0)}  # (saved, backward) output-sized tensors


def loss_memory(kind: str, output_bytes: int) -> LossMemory:
    """The loss ``kind``'s memory for a model output of ``output_bytes`` per micro-batch.
    Raises KeyError for a kind not in LOSSES."""
    saved, backward = LOSSES[kind]
    return LossMemory(saved * output_bytes, backward * output_bytes)


# [Note: the memory margin]
# A plan that says it fits must not run out of memory. The memory model's error is measured:
# ``python -m benchmarks.fidelity --memory-only --report FILE --record-margin`` runs every layout
# of the fidelity benchmark, sets each rank's measured peak (partitioner/measure.py) against its
# prediction, and writes the worst excess of a measured peak over its prediction to
# ``memory_margin.json`` beside this module, with the command, the date and the report. Every
# plan adds that fraction to its predicted peak when checking fit (``Predicted.fits``:
# ``peak * (1 + margin) <= memory * (1 - memory_reserve)``), so the reserve stays what it was
# for (the allocator's fragmentation and the runtime's own buffers), and ``autopart explain``
# states the margin and its source. A layout unlike the measured ones (another device, another
# kernel) is covered only as far as its error resembles theirs.
MARGIN_FILE = Path(__file__).with_name("memory_margin.json")


@dataclass(frozen=True, slots=True)
class RecordedMargin:
    """The memory margin and where it comes from ([Note: the memory margin])."""

    margin: float  # fraction added to a predicted peak: the worst measured excess over it, >= 0
    worst_error: float  # the largest |predicted / measured - 1| over the measured ranks
    median_error: float  # their median
    ranks: int  # measured ranks
    layouts: int  # measured layouts
    command: str  # the command that measured them
    date: str  # when (UTC)
    source: str  # the report it wrote

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 10.0:
            raise ValueError(f"memory margin {self.margin!r} must be in [0, 10)")

    def describe(self) -> str:
        return (f"memory margin: +{self.margin:.1%} on the predicted peak, the measured worst underestimate of the "
                f"memory model over {self.ranks} ranks of {self.layouts} layouts (median error "
                f"{self.median_error:.1%}, worst {self.worst_error:.1%}), {self.source}, {self.date}")


def recorded_margin(path: Path | None = None) -> RecordedMargin:
    """The recorded memory margin (``memory_margin.json``). Raises ValueError naming the file when it
    is missing or malformed, with the command that writes it."""
    path = MARGIN_FILE if path is None else path
    fix = "regenerate it with python -m benchmarks.fidelity --memory-only --report FILE --record-margin"
    return load_record(RecordedMargin, path, "memory margin", fix)
