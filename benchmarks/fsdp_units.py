"""FSDP2's cost per unit on this machine, as calibrate measures it and as real units pay it (issue 12).

``autopart calibrate`` measures FSDP's software cost per unit on a stack of tiny linear units
(``_fsdp_sample``: [Note: measuring overheads] in partitioner/calibrate.py), and the evaluator prices a
unit's pass as its collective on the fitted link plus that cost ([Note: FSDP prefetch overlap] in
partitioner/evaluate.py). Two questions, on every rank of a torchrun job:

1. **How much does the calibrated figure move between calibrations?** ``--calibrations K`` times: the
   link fitted as calibrate fits it, then the FSDP experiment over 7 rounds and over
   ``FSDP_ROUNDS`` (alternated), each giving the per-unit totals (FSDP's pass less the plain pass, per
   unit) and ``a_fsdp`` / ``a_fsdp_bwd`` (the totals less the unit's collective on the link). Printed:
   each estimate's median, range and coefficient of variation over the K calibrations.
2. **Do real units cost what the tiny ones do?** ``--rounds R`` interleaved rounds of ZeRO-3 units
   (``reshard_after_forward=True``) of several shapes (calibrate's own Linear(16, 16); units of 2 or 9
   tensors, small and about 80 KiB; llama-tiny's decoder layers with its root as a unit), each against
   the same modules run plainly, paired per round: the per-unit cost of a forward and of a backward
   (its regather and reduce-scatter), beside what the evaluator prices for a unit of those bytes with
   this job's link fit and calibrated costs (forward: all-gather + ``a_fsdp``; backward: all-gather +
   ``a_fsdp`` + reduce-scatter + ``a_fsdp_bwd``, nothing hidden, as on a CPU).

    torchrun --standalone --nproc-per-node 2 -m benchmarks.fsdp_units [--calibrations 10] [--rounds 15]

A benchmark: it prints figures and changes nothing. One thread per rank (as ``autopart run``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from partitioner import calibrate as cal
from partitioner.devices import init_distributed


def _spread(xs: list[float]) -> str:
    mean = statistics.fmean(xs)
    cv = statistics.pstdev(xs) / mean if mean > 0 else float("nan")
    return f"median {statistics.median(xs) * 1e6:6.0f} us, range {min(xs) * 1e6:5.0f}-{max(xs) * 1e6:5.0f}, cv {cv:.2f}"


def calibrations(k: int, device: torch.device, rank: int) -> cal.LinkFit:
    group = [dist.new_group(list(range(dist.get_world_size())))]
    found: dict[int, list[tuple[float, float, float, float]]] = {7: [], cal.FSDP_ROUNDS: []}
    fit = None
    for i in range(k):
        samples: list[cal.CommSample] = []
        cal._measure_links(samples, group, [], dist.get_world_size(), 1, rank, cal.DEFAULT_SIZES, 5, device)
        fit = cal.fit_link(samples)
        for rounds in (sorted(found) if i % 2 == 0 else sorted(found, reverse=True)):
            s = cal._fsdp_sample(device, rounds)
            a_f, a_b, _ = cal.fsdp_overheads(s, fit)
            raw_f = (s.fsdp_forward_s - s.plain_forward_s) / s.units
            raw_b = (s.fsdp_backward_s - s.plain_backward_s) / s.units
            found[rounds].append((raw_f, raw_b, a_f, a_b))
        if rank == 0:
            print(f"calibration {i + 1}/{k} done", flush=True)
    if rank == 0:
        print("\n1. The FSDP experiment's figures over", k, "calibrations (per unit; ZeRO-2 units, as calibrate runs them)")
        for rounds, xs in found.items():
            cols = list(zip(*xs))
            for name, col in zip(("total forward", "total backward", "a_fsdp", "a_fsdp_bwd"), cols):
                print(f"  {rounds:2d} rounds  {name:15s} {_spread(list(col))}")
    assert fit is not None
    return fit


class _Unit(torch.nn.Module):
    """``tensors`` square weights of ``width``, applied one after another."""

    def __init__(self, tensors: int, width: int) -> None:
        super().__init__()
        self.ws = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(width, width) / width) for _ in range(tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.ws:
            x = x @ w
        return x


def _sharded(model: torch.nn.Module, units: list[torch.nn.Module], mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for u in units:
        fully_shard(u, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def unit_shapes(rounds: int, device: torch.device, rank: int, fit: cal.LinkFit) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from partitioner.zoo import load_model

    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    cases: dict[str, tuple[torch.nn.Module, torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor], list[int]]] = {}
    torch.manual_seed(0)
    linear = torch.nn.Sequential(*(torch.nn.Linear(cal.FSDP_WIDTH, cal.FSDP_WIDTH) for _ in range(cal.FSDP_UNITS)))
    sharded = copy.deepcopy(linear)
    x16 = torch.randn(4, cal.FSDP_WIDTH)
    cases["calibrate's Linear(16, 16) units"] = (linear, _sharded(sharded, list(sharded), mesh), lambda m: m(x16).sum(),
                                                 [sum(p.numel() * 4 for p in u.parameters()) for u in linear])
    for tensors, width in ((2, 16), (9, 16), (2, 96), (9, 48)):
        plain = torch.nn.Sequential(*(_Unit(tensors, width) for _ in range(cal.FSDP_UNITS)))
        sharded = copy.deepcopy(plain)
        x = torch.randn(4, width)
        cases[f"{tensors} tensors of {width}x{width} ({tensors * width * width * 4 // 1024} KiB)"] = (
            plain, _sharded(sharded, list(sharded), mesh), lambda m, x=x: m(x).sum(),
            [tensors * width * width * 4] * cal.FSDP_UNITS)
    lm = load_model("llama-tiny", device="cpu").model
    sharded = copy.deepcopy(lm)
    layers = list(sharded.model.layers)
    ids = torch.randint(0, 1000, (1, 64))
    own = [sum(p.numel() * 4 for p in layer.parameters()) for layer in lm.model.layers]
    root = sum(p.numel() * 4 for p in lm.parameters()) - sum(own)
    cases["llama-tiny: 4 decoder layers and the root (1 x 64 tokens)"] = (
        lm, _sharded(sharded, layers, mesh), lambda m: m(ids).logits.float().pow(2).mean(), [*own, root])

    def timed(fn: Callable[[], None]) -> float:  # one call, the slowest rank's time, as calibrate times its rounds
        return cal._timed(fn, device, 1, warmup=0)

    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(2 + rounds):  # two warm-up rounds, then interleaved rounds: each case sees the same spread of load
        for name, (plain, sharded, run, _) in cases.items():
            for tag, model in (("plain", plain), ("fsdp", sharded)):
                held: list[torch.Tensor] = []
                f = timed(lambda: held.append(run(model)))
                b = timed(lambda: held.pop().backward())
                model.zero_grad(set_to_none=False)
                if r >= 2:
                    times.setdefault((name, tag), []).append((f, b))
    # This job's own calibrated costs (calibrate's experiment, FSDP_ROUNDS rounds) and link, as the evaluator prices.
    a_f, a_b, _ = cal.fsdp_overheads(cal._fsdp_sample(device, cal.FSDP_ROUNDS), fit)
    if rank != 0:
        return
    print(f"\n2. ZeRO-3 units by shape, {rounds} rounds, paired per round (this job's a_fsdp {a_f * 1e6:.0f} us, "
          f"a_fsdp_bwd {a_b * 1e6:.0f} us)")
    print(f"  {'units':58s} {'forward: measured / priced':>28s} {'backward: measured / priced':>30s}")
    for name, (_, _, _, unit_bytes) in cases.items():
        n = len(unit_bytes)
        pairs = list(zip(times[(name, "fsdp")], times[(name, "plain")]))
        fwd = statistics.median(s[0] - p[0] for s, p in pairs) / n
        bwd = statistics.median(s[1] - p[1] for s, p in pairs) / n
        k = dist.get_world_size()
        gather = statistics.fmean(fit.time("all_gather", k, b) for b in unit_bytes)
        scatter = statistics.fmean(fit.time("reduce_scatter", k, b) for b in unit_bytes)
        pf, pb = gather + a_f, gather + a_f + scatter + a_b
        print(f"  {name:58s} {fwd * 1e6:8.0f} / {pf * 1e6:6.0f} us ({fwd / pf:4.2f}x) "
              f"{bwd * 1e6:10.0f} / {pb * 1e6:6.0f} us ({bwd / pb:4.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrations", type=int, default=10, help="times the link and the FSDP experiment are measured")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the unit shapes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_distributed(prefer="cpu", timeout_s=300)
    device = cal._device()
    rank = dist.get_rank()
    warnings.simplefilter("ignore", FutureWarning)
    fit = calibrations(args.calibrations, device, rank)
    unit_shapes(args.rounds, device, rank, fit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
