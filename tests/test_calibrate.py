"""Communication calibration: the alpha-beta fit, the cluster file it writes, and a real run under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from partitioner.calibrate import (
    CalibrateError,
    CalibrationReport,
    CommSample,
    ComputeRates,
    LinkFit,
    calibrated_cluster,
    compute_slowdown,
    fit_link,
    median_report,
    oversubscription,
    pass_spread,
    ring_coefficients,
)
from partitioner.cluster import Cluster, available_cpus, load_cluster
from partitioner.hostload import LoadMeter


def _ideal(kind: str, k: int, nbytes: int, alpha: float, bandwidth: float) -> CommSample:
    steps, factor = ring_coefficients(kind, k)
    return CommSample(kind, "intra", k, nbytes, steps * alpha + factor * nbytes / bandwidth)


def test_ring_coefficients_match_the_analytic_model():
    from cost_models import AnalyticCostModel

    cluster = Cluster.preset("dgx-a100-80g", 1)
    model = AnalyticCostModel(cluster)
    link = cluster.intra_node
    bw = link.bandwidth * cluster.efficiency.comm
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        steps, factor = ring_coefficients(kind, 8)
        assert model.collective_time(kind, 1e8, range(8)) == pytest.approx(steps * link.latency + factor * 1e8 / bw)
    steps, factor = ring_coefficients("p2p", 2)
    assert model.p2p_time(1e8, 0, 1) == pytest.approx(steps * link.latency + factor * 1e8 / bw)


def test_alpha_beta_fit_recovers_the_link():
    alpha, bandwidth = 40e-6, 2.5e9
    samples = [
        _ideal(kind, k, n, alpha, bandwidth)
        for kind in ("p2p", "all_reduce", "all_gather", "reduce_scatter")
        for k in ((2,) if kind == "p2p" else (2, 4))
        for n in (4096, 65536, 1 << 20, 16 << 20)
    ]
    fit = fit_link(samples)
    assert fit.latency == pytest.approx(alpha, rel=1e-6)
    assert fit.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    assert fit.mape < 1e-9
    assert fit.factors == pytest.approx({"all_reduce": 1.0, "all_gather": 1.0, "reduce_scatter": 1.0})
    assert fit_link([]) is None


def test_the_link_is_the_transfers_and_each_collective_gets_its_own_factor():
    # [Note: fitting alpha-beta]: gloo's collectives are slower than the ring on the transfers' link; a
    # joint fit would fit neither. The link comes from the transfers alone, each kind's factor from its own.
    alpha, bandwidth = 80e-6, 4e9
    slower = {"all_reduce": 2.7, "all_gather": 2.0, "reduce_scatter": 10.0}
    samples = [_ideal("p2p", 2, n, alpha, bandwidth) for n in (4096, 65536, 1 << 20, 16 << 20)]
    for kind, f in slower.items():
        for n in (4096, 65536, 1 << 20, 16 << 20):
            ideal = _ideal(kind, 2, n, alpha, bandwidth)
            samples.append(CommSample(kind, "intra", 2, n, ideal.seconds * f))
    fit = fit_link(samples)
    assert fit.latency == pytest.approx(alpha, rel=1e-6) and fit.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    assert fit.points == 4 and fit.mape < 1e-9
    assert fit.factors == pytest.approx(slower)
    # the link prices a collective as the cost model does: the ring, times its factor
    assert fit.time("all_reduce", 2, 1 << 20) == pytest.approx(2.7 * (2 * alpha + (1 << 20) / bandwidth))
    assert fit.time("p2p", 2, 1 << 20) == pytest.approx(alpha + (1 << 20) / bandwidth)
    assert fit_link([s for s in samples if s.kind != "p2p"]) is None  # no transfers: nothing to fit the link to


def test_the_cost_model_multiplies_each_collective_by_its_factor_and_not_transfers():
    from dataclasses import replace

    from cost_models import AnalyticCostModel
    from cost_models.overheads import Overheads

    base = Cluster.local(2)
    factors = Overheads(all_reduce_factor=2.5, all_gather_factor=2.0, reduce_scatter_factor=4.0)
    slow = replace(base, overheads=factors)
    plain, measured = AnalyticCostModel(base), AnalyticCostModel(slow)
    for kind, f in (("all_reduce", 2.5), ("all_gather", 2.0), ("reduce_scatter", 4.0)):
        assert measured.collective_time(kind, 1 << 20, [0, 1]) == pytest.approx(f * plain.collective_time(kind, 1 << 20, [0, 1]))
    assert measured.p2p_time(1 << 20, 0, 1) == plain.p2p_time(1 << 20, 0, 1)
    with pytest.raises(ValueError, match="all_reduce_factor"):
        Overheads(all_reduce_factor=0.0)


def _report(matmul: float, bandwidth: float, links: dict) -> CalibrationReport:
    return CalibrationReport((), links, ComputeRates(matmul, bandwidth, "fp32"), 2, "gloo")


def test_calibrated_cluster_takes_the_measurements_and_reads_back(tmp_path):
    base = Cluster.local(2)
    fit = LinkFit(latency=30e-6, bandwidth=4e9, points=20, mape=0.05)
    peak = base.device.peak_flops["fp32"]
    slow = calibrated_cluster(base, _report(peak * 0.5, base.device.memory_bandwidth * 0.25, {"intra": fit}))
    assert slow.intra_node.bandwidth == 4e9 and slow.intra_node.latency == 30e-6
    assert slow.efficiency.comm == 1.0  # the fitted bandwidth is already effective
    assert slow.efficiency.matmul == pytest.approx(0.5)
    assert slow.efficiency.elementwise == pytest.approx(0.25)
    assert slow.device.peak_flops == base.device.peak_flops
    fast = calibrated_cluster(base, _report(peak * 3, base.device.memory_bandwidth * 2, {"intra": fit}))
    assert fast.efficiency.matmul == 1.0 and fast.device.peak_flops["fp32"] == pytest.approx(peak * 3, rel=1e-2)
    path = tmp_path / "c.toml"
    path.write_text(fast.to_toml())
    again = load_cluster(str(path))
    assert again.intra_node.bandwidth == pytest.approx(4e9)
    assert again.efficiency == fast.efficiency


def _pass(slowdown: float, gemm: float, bandwidth: float, transfer_s: float, factor: float,
          inter: bool = True) -> CalibrationReport:
    """One calibration pass's report, as run_calibration returns it (a sample per link, a factor per link)."""
    from cost_models.overheads import Overheads

    links = {"intra": LinkFit(20e-6, bandwidth, 7, 0.05, {"all_reduce": factor})}
    if inter:
        links["inter"] = LinkFit(40e-6, bandwidth / 4, 7, 0.08, {"all_reduce": factor})
    samples = tuple(CommSample("p2p", link, 2, 4096, 1e-4) for link in links)
    return CalibrationReport(samples, links, ComputeRates(gemm, 30e9, "fp32", slowdown, slowdown, 1.0), 2, "gloo",
                             Overheads(action_s=250e-6, p2p_transfer_s=transfer_s, compute_slowdown=slowdown,
                                       all_reduce_factor=factor))


def test_calibration_passes_keep_each_figure_s_median_so_a_slow_pass_is_outvoted():
    # [Note: calibration passes]: the second pass caught a slow moment (every rank at once 1.79x slower,
    # the GEMM and the link slow, the transfer wait long); the file keeps the other passes' side of each figure.
    passes = [_pass(1.06, 92e9, 3.5e9, 0.9e-3, 2.5), _pass(1.79, 64e9, 2.2e9, 1.67e-3, 5.2),
              _pass(1.10, 88e9, 3.9e9, 1.1e-3, 2.2)]
    kept = median_report(passes)
    assert kept.compute.slowdown == 1.10 and kept.compute.matmul_flops == 88e9
    assert kept.overheads.compute_slowdown == 1.10 and kept.overheads.p2p_transfer_s == 1.1e-3
    assert kept.overheads.action_s == 250e-6  # a figure every pass read alike stays as read
    assert kept.links["intra"].bandwidth == 3.5e9 and kept.links["intra"].factors == {"all_reduce": 2.5}
    assert kept.links["inter"].bandwidth == 3.5e9 / 4
    assert len(kept.samples) == 6  # every pass's measurements stay in the report
    # the cluster file is written from the medians: the slow pass moves none of its figures
    cluster = calibrated_cluster(Cluster.local(2), kept)
    assert cluster.overheads.compute_slowdown == 1.10 and cluster.intra_node.bandwidth == pytest.approx(3.5e9)
    spread = pass_spread(passes)
    assert "compute slowdown 1.06-1.79x (kept 1.1)" in spread and "pipeline transfer wait 900-1670 us (kept 1100)" in spread
    assert pass_spread(passes[:1]).startswith("compute slowdown 1.06x, GEMM 92 GFLOP/s")
    # a link some pass did not measure is not kept; one pass is its own report; none is an error
    assert set(median_report([*passes[:2], _pass(1.1, 88e9, 3.9e9, 1e-3, 2.2, inter=False)]).links) == {"intra"}
    assert median_report(passes[:1]) is passes[0]
    # of two passes, each figure is one pass's (the lower), never a mean the file would round otherwise
    two = median_report(passes[1:])
    assert two.compute.slowdown == 1.10 and two.overheads.p2p_transfer_s == 1.1e-3 and two.compute.matmul_flops == 64e9
    assert "(kept 1.1)" in pass_spread(passes[1:])
    with pytest.raises(CalibrateError, match="at least one pass"):
        median_report([])


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "partitioner.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_calibrate_outside_torchrun_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = _cli("calibrate", "--out", str(tmp_path / "c.toml"), env=env)
    assert r.returncode == 2 and "torchrun" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_calibrate_refuses_to_overwrite_before_measuring(tmp_path):
    out = tmp_path / "c.toml"
    out.write_text("mine")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    r = _cli("calibrate", "--out", str(out), env=env)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert out.read_text() == "mine"


def test_compute_slowdown_is_contention_times_oversubscription():
    # [Note: measured device efficiencies]: the rounds' CPU-time ratios give the contention (their
    # median, at least 1), more ranks than cores the time-slicing.
    assert compute_slowdown([1.10, 0.97, 1.04]) == pytest.approx(1.04)
    assert compute_slowdown([1.10, 0.97, 1.04], 2.0) == pytest.approx(2.08)
    assert compute_slowdown([0.93, 0.95, 0.99]) == 1.0
    assert compute_slowdown([0.93, 0.95, 0.99], 2.0) == 2.0  # a contention below 1 is noise, not a discount
    with pytest.raises(CalibrateError, match="at least one round"):
        compute_slowdown([])


def test_oversubscription_counts_the_ranks_against_the_cores():
    cores = available_cpus()
    assert oversubscription(cores) == 1.0 and oversubscription(1) == 1.0
    assert oversubscription(2 * cores) == 2.0  # 4 ranks on 2 cores run at half speed


@pytest.mark.slow  # a torchrun launch
def test_calibrate_under_torchrun_writes_a_cluster_plans_can_use(tmp_path):
    out = tmp_path / "measured.toml"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "partitioner.cli", "calibrate", "--out", str(out), "--max-bytes", str(4 << 20), "--reps", "3",
         "--passes", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wrote" in run.stdout
    # [Note: calibration passes]: each pass reported as it ends, their spread printed and kept in the header
    assert "pass 1/2 (" in run.stdout and "pass 2/2 (" in run.stdout
    header = out.read_text().split("\n[")[0]
    assert "# 2 passes, each figure their median; the passes read: compute slowdown" in header
    assert "passes: 2, each figure their median" in run.stdout
    if LoadMeter().available:  # [Note: other load]: how quiet the machine was, printed and kept in the header
        assert "machine: while measuring," in run.stdout and "went to other work" in out.read_text().split("\n[")[0]
    cluster = load_cluster(str(out))
    assert cluster.name == "local-cpu-calibrated" and cluster.devices_per_node == 2
    assert "(measured)" in cluster.intra_node.name
    assert 1e-7 < cluster.intra_node.latency < 0.05
    assert 1e7 < cluster.intra_node.bandwidth < 1e12
    o = cluster.overheads  # [Note: measuring overheads]: every experiment ran and was written
    assert "[overheads]" in out.read_text() and o.measured
    # a_step is timed directly; a_action is a residual over the fitted link, at least 0 (0 when a run's link
    # fit already holds it: seen once in CI, with this test's 4 MiB sizes)
    assert o.step_s > 0 and o.action_s >= 0 and 0.0 <= o.comm_overlap <= 1.0
    printed = " ".join(run.stdout.split())  # the summary names what each new experiment measured
    assert "us per pipeline action" in printed
    # torch's multi-stage runtime (two tiny stages a rank, in a loop and in a V), timed beside the single-stage one:
    # its actions cost more than nothing on any machine, and the summary says so
    assert o.multi_action_s > 0 and o.v_action_s > 0
    assert f"({o.multi_action_s * 1e6:.0f} us with several stages a rank in a loop" in printed
    # the slowdown's two factors are printed: 2 ranks time-slice on fewer than 2 cores, never on more
    assert f"ranks over cores {max(1.0, 2 / available_cpus()):.2f}x" in printed
    # what a rank uses of a core outside its pipeline actions (its transfers' threads, the schedule's work)
    assert 0.0 <= o.idle_core_use <= 1.0 and f"a waiting rank still uses {o.idle_core_use:.0%} of a core" in printed
    assert "us per pipeline transfer while the ranks compute" in printed and "per saving node forward" in printed
    assert o.p2p_transfer_s >= 0 and o.p2p_tensor_s >= 0 and o.checkpoint_node_s >= 0
    # ZeroRedundancyOptimizer's own work per tensor, beyond its broadcasts' link time: measured and printed
    # (a residual, at least 0: the fitted link latency may already hold it on a given run)
    assert "ZeRO-1 +" in printed and o.zero1_tensor_s >= 0
    # FSDP2 over gloo: per-unit hooks and copies beyond the collectives, and DTensor's dispatch per
    # tensor in the optimizer (milliseconds and a few hundred microseconds on this CPU).
    # The per-unit figures are residuals beyond the unit's collective as the fitted link prices it, which a
    # loaded machine's link fit can exceed (a fresh-clone CI run beside a busy worker read 0 and 0; their
    # arithmetic is tests/test_fsdp_overheads.py's); the optimizer's DTensor dispatch, from the same FSDP
    # experiment, is the larger effect and shows that the experiment ran.
    assert o.optimizer_dtensor_s > 0
    assert o.checkpoint_s > 0 and o.checkpoint_backward_s > 0  # torch.utils.checkpoint is never free on a CPU
    # torch's split backward (zero-bubble) walks the autograd graph in Python and runs an autograd.grad per
    # weight group: tens of us a node and a tensor on this CPU (each a residual, at least 0)
    assert o.split_backward_node_s >= 0 and o.split_backward_param_s >= 0
    assert o.split_backward_node_s + o.split_backward_param_s > 0 and "split backward (zero-bubble) +" in printed
    # each collective's time over the ring model on the transfers' link ([Note: fitting alpha-beta]): written, printed
    # (printed as the file holds them: a factor that rounds to 1 is not written)
    for kind, label in (("all_reduce", "all-reduce"), ("all_gather", "all-gather"), ("reduce_scatter", "reduce-scatter"),
                        ("broadcast", "broadcast")):
        assert f"{label} {o.collective_factor(kind):.2f}x" in printed
    assert "the ring model on the link" in printed
    plan = _cli("plan", "--model", "gpt2-tiny", "--cluster", str(out), "--method", "uniform", "--global-batch", "4")
    assert plan.returncode == 0, plan.stderr
    assert "local-cpu-calibrated" in plan.stdout


def test_the_calibration_passes_benchmark_refuses_bad_input_before_it_measures(tmp_path, capsys):
    # benchmarks/calibration_passes.py runs 16 calibrations: a typo must stop it at once, and never overwrite a report
    from benchmarks.calibration_passes import main

    report = tmp_path / "r.md"
    report.write_text("kept")
    for argv, says in ((["--report", str(report)], "exists"), (["--plan", "no-such-layout-r1"], "has no no-such-layout-r1"),
                       (["--each", "1"], "at least 2")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and says in capsys.readouterr().err
    assert report.read_text() == "kept"
