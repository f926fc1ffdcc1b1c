"""The calibrated analytic model: the roofline's form, with its constants fitted to measurements.

The analytic model prices an op from datasheet peaks and assumed efficiency
factors. This one keeps its inputs (the op, its FLOPs and its bytes) but
replaces the assumptions with constants fitted to kernels measured on the
device (``partitioner/profile/``), so that a model too large to profile
whole is still predicted from measured kernels. It implements ``CostModel``;
communication is left to the base model (whose alpha-beta figures
``autopart calibrate`` measures).

[Note: the calibrated op model]
For each op (by its aten name, e.g. ``aten.addmm``) and direction (forward,
backward), measured time is fitted as

    t = alpha + F * x    for ops whose FLOPs are counted (matmuls, attention),
    t = alpha + B * y    for the rest (memory-bound: elementwise, norms, copies),
    alpha, x, y >= 0,

where ``F`` is the direction's FLOPs and ``B`` the bytes the op moves. An op
with parameters and no counted FLOPs (an embedding, a norm) splits ``B`` into
its activations and its parameters ``P``: forward ``t = alpha + (B - P) * y``
(an embedding reads the rows it looks up, not its table), backward
``t = alpha + (B - P) * y + P * z`` (it writes a gradient as large as the
whole table).

``x`` is the inverse of the effective FLOP rate, ``y`` the inverse of the
effective bandwidth, and ``alpha`` the per-call overhead (dispatcher, launch).
FLOPs or bytes, not both: the FLOPs of a matmul grow as d^2 s and its bytes
as d s, and a fit given both on a few sizes trades one for the other and
extrapolates badly to larger widths. For a matmul ``alpha + F * x`` is exactly
an efficiency rising with size, ``F / (F + alpha / x)`` of the fitted peak.
The fit minimizes *relative* squared error (every row divided by its measured
time), because the planner cares about ratios and a plain least squares fit
would ignore the many small ops. An op with fewer than
``MIN_POINTS`` distinct sizes falls back to its class's fit (matmul,
attention, elementwise; see ``op_class``), and a class with none to the
base model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .base import CollectiveKind, CostModel, NodeRef, OpTime, SplitShare, op_class

__all__ = ["Sample", "OpFit", "Calibration", "fit_calibration", "CalibratedCostModel", "op_key"]

MIN_POINTS = 3  # distinct (F, B) sizes an op needs for a fit of its own


def op_key(target: str) -> str:
    """``aten.addmm.default`` -> ``aten.addmm``: overloads of one op share a fit; a kernel variant
    (``aten.scaled_dot_product_attention.default[causal]``) keeps its own."""
    name, bracket, variant = target.partition("[")
    parts = name.split(".")
    base = ".".join(parts[:2]) if name.startswith("aten.") else parts[0]
    return f"{base}[{variant}" if bracket else base


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured op: what the model sees (op, FLOPs, bytes, dtype) and the measured seconds."""

    op: str  # aten target, e.g. "aten.addmm.default"
    dtype: str  # compute dtype (fp32, bf16, ...)
    forward_flops: float
    backward_flops: float
    bytes_moved: float
    forward_s: float
    backward_s: float  # 0 when the op has no backward (integer inputs, no grad)
    param_bytes: float = 0.0  # the parameters' share of bytes_moved


@dataclass(frozen=True, slots=True)
class OpFit:
    """``t = overhead + flops * s_per_flop + (bytes - params) * s_per_byte + params * s_per_param_byte``."""

    overhead_s: float
    s_per_flop: float
    s_per_byte: float
    points: int  # measurements it was fitted on
    mape: float  # its mean absolute percentage error on those measurements
    s_per_param_byte: float = 0.0  # see [Note: the calibrated op model]
    split_params: bool = False  # bytes are priced as activations (s_per_byte) + parameters (s_per_param_byte)

    def predict(self, flops: float, nbytes: float, param_bytes: float = 0.0) -> float:
        if not self.split_params:
            return self.overhead_s + flops * self.s_per_flop + nbytes * self.s_per_byte
        return (self.overhead_s + flops * self.s_per_flop + (nbytes - param_bytes) * self.s_per_byte
                + param_bytes * self.s_per_param_byte)

    def to_dict(self) -> dict[str, Any]:
        keys = ("overhead_s", "s_per_flop", "s_per_byte", "s_per_param_byte", "split_params", "points", "mape")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OpFit":
        vals = {k: d.get(k, 0.0) for k in ("overhead_s", "s_per_flop", "s_per_byte", "s_per_param_byte", "mape")}
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in vals.values()):
            raise ValueError(f"invalid fit {dict(d)!r}")
        return cls(**{k: float(v) for k, v in vals.items()}, points=int(d["points"]),
                   split_params=bool(d.get("split_params", False)))


@dataclass(frozen=True)
class Calibration:
    """Fitted op constants for one device, keyed ``"<dtype>|<forward|backward>|<op or class>"``."""

    device: str  # the device it was measured on
    fits: Mapping[str, OpFit] = field(default_factory=dict)

    def lookup(self, dtype: str, direction: str, op: str) -> OpFit | None:
        return self.fits.get(f"{dtype}|{direction}|{op_key(op)}") or self.fits.get(
            f"{dtype}|{direction}|class:{op_class(op)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "fits": {k: f.to_dict() for k, f in sorted(self.fits.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        return cls(str(d["device"]), {str(k): OpFit.from_dict(v) for k, v in dict(d["fits"]).items()})


def nnls_relative(rows: Sequence[tuple[float, ...]], targets: Sequence[float]) -> tuple[float, ...]:
    """Non-negative least squares on relative error, exactly, by trying every support set.

    With two or three unknowns there are at most seven supports; the best
    feasible one is the NNLS optimum (the KKT point lies on one of them).
    """
    import numpy as np

    a = np.asarray(rows, dtype=float) / np.asarray(targets, dtype=float)[:, None]
    b = np.ones(len(targets))
    n = a.shape[1]
    best, best_res = tuple([0.0] * n), float(len(targets))  # all-zero coefficients: residual = count
    for size in range(1, n + 1):
        for cols in itertools.combinations(range(n), size):
            sub = a[:, cols]
            if not np.any(sub):
                continue
            coef, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if np.any(coef < 0):
                continue
            res = float(np.sum((sub @ coef - b) ** 2))
            if res < best_res - 1e-15:
                full = [0.0] * n
                for c, v in zip(cols, coef):
                    full[c] = float(v)
                best, best_res = tuple(full), res
    return best


def _fit(points: list[tuple[float, float, float, float]], backward: bool) -> OpFit | None:
    """Fit (F, B, P, t) points; see [Note: the calibrated op model] for which terms."""
    pts = [p for p in points if p[3] > 0]
    if not pts:
        return None
    times = [t for *_, t in pts]
    x = y = z = 0.0
    split = False
    if any(f > 0 for f, *_ in pts):
        a, x = nnls_relative([(1.0, f) for f, *_ in pts], times)
    elif any(p > 0 for _, _, p, _ in pts) and not backward:  # forward touches the rows it reads, not the table
        a, y = nnls_relative([(1.0, b - p) for _, b, p, _ in pts], times)
        split = True
    elif any(p > 0 for _, _, p, _ in pts) and len({(b - p, p) for _, b, p, _ in pts}) >= MIN_POINTS:
        a, y, z = nnls_relative([(1.0, b - p, p) for _, b, p, _ in pts], times)
        split = True
    else:
        a, y = nnls_relative([(1.0, b) for _, b, _, _ in pts], times)
    fit = OpFit(a, x, y, len(pts), 0.0, z, split)
    mape = sum(abs(fit.predict(f, b, p) - t) / t for f, b, p, t in pts) / len(pts)
    return OpFit(a, x, y, len(pts), mape, z, split)


def fit_calibration(device: str, samples: Iterable[Sample]) -> Calibration:
    """Fit every op (with enough distinct sizes) and every op class; see [Note: the calibrated op model]."""
    groups: dict[str, list[tuple[float, float, float, float]]] = {}
    for s in samples:
        for direction, flops, t in (("forward", s.forward_flops, s.forward_s), ("backward", s.backward_flops, s.backward_s)):
            if t <= 0:
                continue
            for key in (op_key(s.op), f"class:{op_class(s.op)}"):
                groups.setdefault(f"{s.dtype}|{direction}|{key}", []).append((flops, s.bytes_moved, s.param_bytes, t))
    fits: dict[str, OpFit] = {}
    for key, pts in groups.items():
        distinct = {(f, b) for f, b, _, _ in pts}
        if not key.split("|")[2].startswith("class:") and len(distinct) < MIN_POINTS:
            continue
        fit = _fit(pts, key.split("|")[1] == "backward")
        if fit is not None:
            fits[key] = fit
    return Calibration(device, fits)


@dataclass(frozen=True)
class CalibratedCostModel:
    """``base`` with its op times replaced by ``calibration``'s fits where it has them."""

    base: CostModel
    calibration: Calibration

    def node_time(
        self, op: str, forward_flops: float, backward_flops: float, bytes_moved: float, dtype: str,
        node: NodeRef | None = None, param_bytes: float = 0.0,
    ) -> OpTime:
        # No early return for zero FLOPs and bytes: a view launches no kernel but still costs its
        # dispatcher call, and the fit of the view op (or its class) says how much.
        fallback = None
        times = []
        for direction, flops in (("forward", forward_flops), ("backward", backward_flops)):
            fit = self.calibration.lookup(dtype, direction, op)
            if fit is None:
                fallback = fallback or self.base.node_time(
                    op, forward_flops, backward_flops, bytes_moved, dtype, node, param_bytes
                )
                times.append(fallback.forward_s if direction == "forward" else fallback.backward_s)
            else:
                times.append(fit.predict(flops, bytes_moved, param_bytes))
        return OpTime(times[0], times[1])

    def collective_time(self, kind: CollectiveKind, nbytes: float, ranks: Sequence[int]) -> float:
        return self.base.collective_time(kind, nbytes, ranks)

    def p2p_time(self, nbytes: float, src: int, dst: int) -> float:
        return self.base.p2p_time(nbytes, src, dst)

    def loss_time(self, kind: str, output_bytes: float) -> OpTime:
        return self.base.loss_time(kind, output_bytes)

    def split_share(self, block: str, micro_batch: int) -> SplitShare | None:
        return self.base.split_share(block, micro_batch)
