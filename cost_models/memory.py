"""Memory per device: parameters, gradients, optimizer state and activations.

Used by every planner and the simulator to decide whether a plan fits. The
defaults follow ZeRO (Rajbhandari et al., 2020, Sec. 3.1): mixed-precision
Adam keeps 2 bytes of half-precision weights, 2 of gradients and 12 of fp32
state (master weights, momentum, variance) per parameter, 16 bytes in all.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OptimizerSpec", "OPTIMIZERS", "static_bytes"]


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    """Bytes kept per trainable parameter, beyond the weights themselves."""

    name: str
    grad_bytes: int  # gradient, per parameter
    state_bytes: int  # optimizer state (and fp32 master copy), per parameter; shardable by ZeRO-1

    def __post_init__(self) -> None:
        if self.grad_bytes < 0 or self.state_bytes < 0:
            raise ValueError(f"optimizer {self.name}: byte counts must be >= 0")


OPTIMIZERS = {
    # ZeRO paper, Sec. 3.1: fp16/bf16 weights + grads, fp32 master + Adam m, v.
    "adam-mixed": OptimizerSpec("adam-mixed", grad_bytes=2, state_bytes=12),
    # Plain fp32 Adam: fp32 grads, m and v (weights counted separately at 4 bytes).
    "adam": OptimizerSpec("adam", grad_bytes=4, state_bytes=8),
    # SGD with momentum in fp32.
    "sgd": OptimizerSpec("sgd", grad_bytes=4, state_bytes=4),
}


def static_bytes(
    param_count: int, weight_bytes: int, optimizer: OptimizerSpec, dp: int = 1, zero1: bool = False
) -> int:
    """Resident bytes on one device for ``param_count`` trainable parameters it holds.

    ``weight_bytes`` are the bytes of the weights as stored (already divided by
    the tensor-parallel degree where sharded); ``dp`` shards the optimizer
    state when ``zero1`` is set.
    """
    state = optimizer.state_bytes * param_count
    if zero1:
        state = -(-state // max(1, dp))
    return int(weight_bytes + optimizer.grad_bytes * param_count + state)
