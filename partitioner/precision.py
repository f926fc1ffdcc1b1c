"""Mixed precision as the plan priced it: low-precision compute, fp32 master weights, fp16 loss scaling.

Part of the run phase (... -> Plan -> rewrite -> **run**). The plan's
``training.dtype`` and ``training.optimizer`` fix what the memory model
(``cost_models/memory.py``) charges per parameter; :class:`PrecisionPolicy`
reads the same two fields and the runtime builds exactly that, so the bytes
a rank holds are the bytes its stage was priced at.

[Note: mixed precision as priced]
``adam-mixed`` is ZeRO's mixed-precision Adam (Rajbhandari et al., 2020,
Sec. 3.1): per parameter, 2 bytes of bf16/fp16 weights, 2 of gradients, and
12 of fp32 state (master weights, Adam's m and v). The runtime realizes it as:

- the stage modules hold their parameters in the plan's dtype (the model was
  loaded in it; the plan's fingerprint includes parameter dtypes), so forward
  and backward compute in it, and the gradients are in it too: DDP's
  all-reduce over ``dp`` and the tied-weight sum run in the plan's dtype;
- :class:`MasterWeightOptimizer` keeps an fp32 copy of each parameter and
  runs the user's optimizer (AdamW by default, ``adamw_factory``) on the
  copies: each step copies the gradients up to fp32, steps, and rounds the
  masters back into the parameters. Its fp32 gradients exist only inside
  ``step`` (after the backward, when activations are already freed), and only
  a chunk of them at a time (``MASTER_GRAD_CHUNK`` elements): it makes a
  chunk's, steps the inner optimizer, which updates only parameters that
  have a gradient, and frees them. The fp16 loss scaler, which unscales every
  gradient first, and ZeRO-1, whose step broadcasts every parameter, take
  them all at once (priced as such: [Note: the optimizer step's workspace] in
  cost_models/memory.py);
- with fp16, the loss is scaled by ``ShardedGradScaler`` (torch's GradScaler
  whose inf/NaN check is all-reduced over the process group, so every
  pipeline rank skips the same steps; the ranks hold different parameters).
  The loss function then reads the model's outputs upcast to fp32
  (:func:`loss_inputs`), as autocast would run it: the gradient of an fp16
  loss is the scale itself, 2**16, which fp16 cannot hold.

No torch optimizer keeps fp32 master weights for low-precision parameters
outside FSDP (whose ``MixedPrecisionPolicy`` keeps fp32 *sharded parameters*
and casts them per forward, a different layout: 4 bytes of weights and 4 of
gradients), and the runtime shards with DTensor, pipelining and DDP rather
than FSDP, hence the small wrapper here. Other pairings (fp32 with any
optimizer; bf16 with plain ``adam`` or ``sgd``) run the optimizer on the
parameters as they are. Under ``training.dp_sharding`` ``zero1`` the masters are kept for all
of the rank's parameters and only Adam's m and v are sharded over ``dp``, and
the memory model prices exactly that (``OptimizerSpec.master_bytes``; the ZeRO paper
shards the masters too, which would save 4 bytes per parameter more). Under ``zero2``,
``zero3`` and ``hsdp`` the parameters are FSDP2's dp-sharded DTensors, so the masters made
from them, and the state, are sharded with them (fsdp.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from cost_models import MASTER_GRAD_CHUNK, optimizer_impl

from .errors import PlanError

__all__ = [
    "DTYPES",
    "PrecisionPolicy",
    "adamw_factory",
    "MasterWeightOptimizer",
    "make_scaler",
    "loss_inputs",
    "optimizer_step",
    "resident_bytes",
    "ResidentBytes",
]

# The plan's dtype keys (cluster peak FLOP/s keys) as torch dtypes; tf32 computes on fp32 tensors.
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class PrecisionPolicy:
    """What runs in which dtype, from the plan's ``training`` (see [Note: mixed precision as priced])."""

    compute_dtype: torch.dtype  # parameters, activations and gradients in forward/backward
    reduce_dtype: torch.dtype  # gradient reduction over dp (and tied-weight sums)
    master_dtype: torch.dtype | None  # fp32 master weights kept by the optimizer, or None
    loss_scaling: bool  # scale the loss (fp16 only: its exponent range loses small gradients)

    @classmethod
    def from_training(cls, dtype: str, optimizer: str) -> "PrecisionPolicy":
        if dtype not in DTYPES:
            raise PlanError(f"training.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        compute = DTYPES[dtype]
        low = compute in (torch.bfloat16, torch.float16)
        return cls(compute, compute, torch.float32 if low and optimizer == "adam-mixed" else None,
                   compute == torch.float16)


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def adamw_factory(device: torch.device, lr: float = 1e-3) -> OptimizerFactory:
    """The runtime's default optimizer on ``device``: AdamW in the implementation the evaluator
    prices (``optimizer_impl``: torch's fused kernel on CUDA, its default on CPU), see [Note: the
    optimizer step's workspace] in cost_models/memory.py."""
    fused = optimizer_impl(device.type) == "fused"
    return lambda ps: torch.optim.AdamW(ps, lr=lr, fused=fused or None)


class MasterWeightOptimizer:
    """Runs ``inner`` on fp32 copies of low-precision parameters (see [Note: mixed precision as priced]).

    ``make_inner`` builds the optimizer over the masters (the user's factory,
    or ZeRO-1 around it). ``param_groups`` are the inner optimizer's, over the
    masters, so ``GradScaler.unscale_`` sees (and unscales) fp32 gradients;
    ``state`` is keyed by the model's parameters, with the master under
    ``"master"``, so checkpoints name every byte by the model's own names.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], make_inner: OptimizerFactory, *,
                 chunk_elements: int | None = MASTER_GRAD_CHUNK) -> None:
        """``chunk_elements``: the fp32 gradients made at once by ``step`` (None: all of them, as
        ZeRO-1's optimizer needs, since its step broadcasts every parameter)."""
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError(f"MasterWeightOptimizer: chunk_elements must be >= 1 or None, not {chunk_elements}")
        self.chunk_elements = chunk_elements
        self.params = [p for p in params]
        with torch.no_grad():
            self.masters = [torch.nn.Parameter(p.detach().to(torch.float32), requires_grad=p.requires_grad)
                            for p in self.params]
        self.inner = make_inner(self.masters)
        self.defaults = getattr(self.inner, "defaults", {})

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Mapping[torch.nn.Parameter, dict[str, Any]]:
        """Per model parameter: the inner optimizer's state of its master (this rank's share under ZeRO-1)
        plus the master itself; parameters whose state does not exist yet are left out."""
        inner_state = getattr(self.inner, "optim", self.inner).state
        return {p: {**inner_state[m], "master": m} for p, m in zip(self.params, self.masters) if inner_state.get(m)}

    def load_grads(self, which: Iterable[int] | None = None) -> None:
        """Copy the parameters' low-precision gradients up into the masters' (fp32): all, or those at
        the indices ``which``."""
        for i in range(len(self.params)) if which is None else which:
            p, m = self.params[i], self.masters[i]
            if p.grad is not None:
                m.grad = p.grad.to(torch.float32)

    def chunks(self) -> list[list[int]]:
        """The parameters' indices in order, cut where the next gradient would take a chunk past
        ``chunk_elements`` (a larger one alone); one chunk of all when that is None."""
        if self.chunk_elements is None:
            return [list(range(len(self.params)))]
        out: list[list[int]] = [[]]
        size = 0
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            n = _local(p).numel()
            if out[-1] and size + n > self.chunk_elements:
                out.append([])
                size = 0
            out[-1].append(i)
            size += n
        return out

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is not None:
            raise PlanError("MasterWeightOptimizer.step takes no closure (the pipeline schedule runs the backward)")
        loaded = [i for i, (p, m) in enumerate(zip(self.params, self.masters)) if m.grad is not None]
        # The loss scaler loaded (and unscaled) every gradient already: one step over them all.
        groups = [loaded] if loaded else self.chunks()
        out = None
        for chunk in groups:
            if not loaded:
                self.load_grads(chunk)
            out = self.inner.step()  # updates only the masters that have a gradient
            with torch.no_grad():
                for i in chunk:
                    self.params[i].copy_(self.masters[i])  # round to the compute dtype
                    self.masters[i].grad = None  # the fp32 gradients live only inside the step
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for m in self.masters:
            m.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def make_scaler(policy: PrecisionPolicy, device: torch.device) -> Any:
    """The fp16 loss scaler (None for other dtypes): torch's GradScaler with its inf check all-reduced
    over the world (``ShardedGradScaler``), initialized on every rank (only the last stage scales a loss)."""
    if not policy.loss_scaling:
        return None
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    scaler = ShardedGradScaler(device=device.type)
    scaler.scale(torch.zeros((), device=device))  # creates the scale tensor on ranks that never see a loss
    return scaler


def loss_inputs(outputs: list[Any], policy: PrecisionPolicy) -> list[Any]:
    """The model's outputs as the loss function should see them: fp16 ones upcast to fp32 under loss
    scaling (see [Note: mixed precision as priced]); otherwise unchanged."""
    if not policy.loss_scaling:
        return outputs
    return [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in outputs]


def optimizer_step(optimizer: Any, scaler: Any = None) -> None:
    """One optimizer step after the backward; with a scaler, unscale, skip on inf/NaN (on every rank), update."""
    if scaler is None:
        optimizer.step()
        return
    if isinstance(optimizer, MasterWeightOptimizer):
        optimizer.load_grads()  # the scaler unscales every gradient before the step
    scaler.step(optimizer)
    scaler.update()


@dataclass(frozen=True, slots=True)
class ResidentBytes:
    """The bytes one rank holds for its parameters, as the memory model counts them."""

    weights: int  # the parameters themselves (this rank's shards)
    grads: int  # their gradients
    state: int  # optimizer state tensors of parameter size, fp32 masters included (scalars such as Adam's step excluded)
    buffers: int = 0  # the stages' buffers (rotary tables, norms' statistics): the memory model counts them as weights

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state + self.buffers


def resident_bytes(params: Iterable[torch.Tensor], optimizer: Any, buffers: Iterable[torch.Tensor] = ()) -> ResidentBytes:
    """Count weights, gradients and optimizer state of ``params`` (local shards of DTensors; meta tensors
    count their would-be bytes), and ``buffers``; each tensor once. Scalar state (Adam's ``step``) is left
    out, as the memory model does."""
    from torch.distributed.tensor import DTensor

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list({id(p): p for p in params}.values())
    buffers = list({id(b): b for b in buffers}.values())
    state = getattr(optimizer, "state", {})
    if not isinstance(optimizer, MasterWeightOptimizer):
        state = getattr(optimizer, "optim", optimizer).state
    weights = sum(nbytes(p) for p in params)
    grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
    opt = 0
    for p in params:
        for value in state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                opt += nbytes(value)
    return ResidentBytes(weights, grads, opt, sum(nbytes(b) for b in buffers))
