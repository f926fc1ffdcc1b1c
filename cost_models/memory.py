"""Memory per device: parameters, gradients, optimizer state and activations.

Used by every planner and the simulator to decide whether a plan fits. The
defaults follow ZeRO (Rajbhandari et al., 2020, Sec. 3.1): mixed-precision
Adam keeps 2 bytes of half-precision weights, 2 of gradients and 12 of fp32
state (master weights, momentum, variance) per parameter, 16 bytes in all.
When the plan computes in fp32 (or tf32, which computes on fp32 tensors) there is
nothing to keep a master copy of: adam-mixed then holds what plain Adam holds,
4 + 4 + 8 = 16 bytes (``optimizer_spec``), as the runtime does
(``PrecisionPolicy.master_dtype`` is None in partitioner/precision.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OptimizerSpec", "OPTIMIZERS", "FULL_PRECISION", "optimizer_spec", "static_bytes"]


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    """Bytes kept per trainable parameter, beyond the weights themselves."""

    name: str
    grad_bytes: int  # gradient, per parameter
    state_bytes: int  # optimizer state (and fp32 master copy), per parameter
    # Of state_bytes, the fp32 master copy: every dp rank keeps it whole (the runtime's
    # MasterWeightOptimizer); ZeRO-1 shards the rest (Adam's m and v).
    master_bytes: int = 0

    def __post_init__(self) -> None:
        if self.grad_bytes < 0 or self.state_bytes < 0 or not 0 <= self.master_bytes <= self.state_bytes:
            raise ValueError(f"optimizer {self.name}: byte counts must be >= 0, the master copy within the state")


OPTIMIZERS = {
    # ZeRO paper, Sec. 3.1: fp16/bf16 weights + grads, fp32 master + Adam m, v.
    "adam-mixed": OptimizerSpec("adam-mixed", grad_bytes=2, state_bytes=12, master_bytes=4),
    # Plain fp32 Adam: fp32 grads, m and v (weights counted separately at 4 bytes).
    "adam": OptimizerSpec("adam", grad_bytes=4, state_bytes=8),
    # SGD with momentum in fp32.
    "sgd": OptimizerSpec("sgd", grad_bytes=4, state_bytes=4),
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
        return OptimizerSpec(name, grad_bytes=4, state_bytes=8)
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
