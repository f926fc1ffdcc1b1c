"""The runtime against a single-process reference, in real gloo process groups (tier 3 of STYLE.md).

One launch per world size checks every layout of that size and every model, and the
checkpoint scenarios share three launches (process start-up dominates); see
tests/runtime_harness.py for what each rank computes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from partitioner.schedules import SCHEDULES

sys.path.insert(0, str(Path(__file__).parent))
from runtime_harness import MODELS, launch  # noqa: E402

# Every test here launches several processes (5-15 s each on 2 cores): `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

TOL = 1e-5
ALL = list(MODELS)

# name: (ranks, pins); global batch = dp x microbatches x micro-batch size. A layout with pp > 1
# pins its schedule: unpinned, the planner picks each model's best (interleaved for some).
LAYOUTS = {
    "pp2": (2, dict(pp=2, tp=1, dp=1, schedule="1f1b", microbatches=2, global_batch=4)),  # micro-batches of 2
    "pp4-interleaved": (4, dict(pp=4, tp=1, dp=1, schedule="interleaved", virtual_stages=2, microbatches=4, global_batch=4)),
    "tp2": (2, dict(pp=1, tp=2, dp=1, microbatches=1, global_batch=2)),
    "dp2": (2, dict(pp=1, tp=1, dp=2, microbatches=1, global_batch=4)),
    "dp2-zero1": (2, dict(pp=1, tp=1, dp=2, microbatches=1, global_batch=4, zero1=True)),
    "pp2xtp2": (4, dict(pp=2, tp=2, dp=1, schedule="gpipe", microbatches=2, global_batch=2)),
    "pp2xdp2": (4, dict(pp=2, tp=1, dp=2, schedule="1f1b", microbatches=2, global_batch=4)),
    "pp2xtp2xdp2": (8, dict(pp=2, tp=2, dp=2, schedule="1f1b", microbatches=2, global_batch=4)),
    # Split-backward schedules (I and W actions). zbv and dualpipev fold 4 stages into a V, so
    # GPT-2's tied embedding and LM head share rank 0; pp2xdp2-zb averages replicas without DDP.
    "pp2-zb": (2, dict(pp=2, tp=1, dp=1, schedule="zb", microbatches=2, global_batch=4)),
    "pp2-zbv": (2, dict(pp=2, tp=1, dp=1, schedule="zbv", virtual_stages=2, microbatches=2, global_batch=4)),
    # A middle stage ending in a view (GPT-2's ln_f is followed by one), which torch's split backward
    # detaches in place: sent as a copy of its own ([Note: a split backward's stage outputs] in rewrite.py).
    "pp2-zbv-view": (2, dict(pp=2, tp=1, dp=1, schedule="zbv", virtual_stages=2, microbatches=2, global_batch=4,
                             method="manual", split_at=["transformer.h.1", "transformer.h.3", "lm_head"])),
    "pp2-dualpipev": (2, dict(pp=2, tp=1, dp=1, schedule="dualpipev", virtual_stages=2, microbatches=4,
                              global_batch=4)),
    "pp2xdp2-zb": (4, dict(pp=2, tp=1, dp=2, schedule="zb", microbatches=2, global_batch=4)),
    # ZeRO-2/3 through FSDP2 (per-block units; partitioner/fsdp.py). dp2-zero3 runs AdamW, the optimizer
    # the plan prices, so each rank's held bytes can be compared with the memory model's, byte for byte.
    "dp2-zero2-recompute": (2, dict(pp=1, tp=1, dp=2, microbatches=2, global_batch=4, dp_sharding="zero2",
                                    recompute=True)),  # a checkpoint around each FSDP unit (and the tied blocks)
    # Every block recomputed under ZeRO-3: each unit's replay runs after its pre-backward regather.
    "dp2-zero3-recompute": (2, dict(pp=1, tp=1, dp=2, microbatches=2, global_batch=4, dp_sharding="zero3",
                                    recompute=True)),
    "dp2-zero3": (2, dict(pp=1, tp=1, dp=2, microbatches=1, global_batch=2, dp_sharding="zero3", adamw=True)),
    "pp2xdp2-zero3": (4, dict(pp=2, tp=1, dp=2, schedule="1f1b", microbatches=2, global_batch=4, dp_sharding="zero3")),
    # Under tp the stage runs through TensorParallelModule: one FSDP unit per stage, over its tp shards.
    "tp2xdp2-zero3": (4, dict(pp=1, tp=2, dp=2, microbatches=2, global_batch=4, dp_sharding="zero3")),
    # HSDP on this machine as 2 nodes of 2: sharded over the 2 dp ranks of a node, replicated across nodes.
    "dp4-hsdp": (4, dict(pp=1, tp=1, dp=4, microbatches=1, global_batch=4, dp_sharding="hsdp", nodes=2, adamw=True)),
    # Recomputation (every stage replays its forward in backward) under DDP.
    "pp2xdp2-recompute": (4, dict(pp=2, tp=1, dp=2, schedule="1f1b", microbatches=2, global_batch=4, recompute=True)),
    # Recomputation per block and selective (partitioner/recompute.py): plans edited to recompute each stage's
    # first layer and the attention cores of the others; under tp as checkpointed node regions; under ZeRO-3
    # inside FSDP's folded blocks; and a version-4 file's `recompute: true` loaded and run.
    "pp2-recompute-blocks": (2, dict(pp=2, tp=1, dp=1, schedule="1f1b", microbatches=2, global_batch=4,
                                     recompute_layers=dict(blocks=1, selective=True))),
    "tp2-recompute-selective": (2, dict(pp=1, tp=2, dp=1, microbatches=1, global_batch=2,
                                        recompute_layers=dict(blocks=1, selective=True))),
    "dp2-zero3-selective": (2, dict(pp=1, tp=1, dp=2, microbatches=1, global_batch=2, dp_sharding="zero3",
                                    recompute_layers=dict(blocks=1, selective=True))),
    "pp2-recompute-v4": (2, dict(pp=2, tp=1, dp=1, schedule="1f1b", microbatches=2, global_batch=4, recompute=True,
                                 as_v4=True)),
    # Every block recomputed under tp: each block's nodes one checkpointed region, the tied ones too.
    "tp2-recompute": (2, dict(pp=1, tp=2, dp=1, microbatches=2, global_batch=4, recompute=True)),
    # The head's vocabulary in two blocks, one on each stage (vocab_split.py): GPT-2's head is tied to its
    # embedding, Llama's is a weight of its own; either way both stages read the one weight.
    "pp2-vocab-chunks": (2, dict(pp=2, tp=1, dp=1, schedule="1f1b", microbatches=2, global_batch=4, vocab_chunks=2,
                                 method="manual", split_at=["lm_head.vocab1"])),
}
RECOMPUTE_LAYERS = {"pp2-recompute-blocks", "tp2-recompute-selective", "dp2-zero3-selective"}
SPLIT_BACKWARD = {"pp2-zb", "pp2-zbv", "pp2-zbv-view", "pp2-dualpipev", "pp2xdp2-zb"}  # slow: they lengthen two shared launches
# Models per layout where not all: the split-backward and recompute layouts run GPT-2 (tied weights) and the MLP only.
FSDP = {"dp2-zero2-recompute", "dp2-zero3-recompute", "dp2-zero3", "pp2xdp2-zero3", "tp2xdp2-zero3", "dp4-hsdp", "dp2-zero3-selective"}
LAYOUT_MODELS = {name: ["gpt2-tiny", "mlp"] for name in [*SPLIT_BACKWARD, *FSDP, "pp2xdp2-recompute"]}
LAYOUT_MODELS.update({"pp2-recompute-blocks": ["gpt2-tiny", "llama-tiny"], "tp2-recompute-selective": ["gpt2-tiny"],
                      "dp2-zero3-selective": ["gpt2-tiny"], "pp2-recompute-v4": ["gpt2-tiny"],
                      "tp2-recompute": ["gpt2-tiny"], "pp2-vocab-chunks": ["gpt2-tiny", "llama-tiny"],
                      "pp2-zbv-view": ["gpt2-tiny"]})
# GPT-2 (tied weights, blocks folded into units) is the case that matters; dp2-zero3 also runs the MLP.
for name in ("dp2-zero2-recompute", "dp2-zero3-recompute", "pp2xdp2-zero3", "tp2xdp2-zero3", "dp4-hsdp"):
    LAYOUT_MODELS[name] = ["gpt2-tiny"]

# Layouts that also run models built on meta (each rank materializes only its stages' weights),
# against a reference materialized whole by the same rule.
META_MODELS = {"pp2": ALL, "pp2xtp2": ["gpt2-tiny", "llama-tiny"]}


def _ok(reports: list[dict]) -> None:
    for rank, r in enumerate(reports):
        assert r["rc"] == 0 and r.get("job_failed") is None, f"rank {rank}: {r.get('job_failed')}\n{r['stderr'][-4000:]}"


@pytest.fixture(scope="module")
def equivalence_launches(tmp_path_factory: pytest.TempPathFactory):
    """``reports(layout)``: every rank's report for ``layout``. All layouts of one world size share a
    launch (made on first use), since process start-up dominates."""
    done: dict[int, list[dict]] = {}

    def reports(layout: str) -> list[dict]:
        ranks = LAYOUTS[layout][0]
        if ranks not in done:
            group = {name: pins for name, (n, pins) in LAYOUTS.items() if n == ranks}
            done[ranks] = launch(ranks, "equivalence", {"layouts": group, "models": ALL, "meta_models": META_MODELS,
                                                        "layout_models": LAYOUT_MODELS},
                                 tmp_path_factory.mktemp(f"equivalence{ranks}"), timeout_s=360)
        _ok(done[ranks])
        return [r[layout] for r in done[ranks]]

    return reports


@pytest.mark.parametrize(
    "layout", [pytest.param(name, marks=pytest.mark.slow) if name in SPLIT_BACKWARD else name for name in LAYOUTS]
)
def test_equivalence(layout: str, equivalence_launches) -> None:
    pins = LAYOUTS[layout][1]
    meta = META_MODELS.get(layout, [])
    reports = equivalence_launches(layout)
    for name in meta:  # built on meta: a rank holds its own stages' tensors and nothing else
        for rank, r in enumerate(reports):
            m = r[f"meta:{name}"]
            assert m["foreign"] == [], f"{name} rank {rank} materialized tensors of other stages: {m['foreign'][:3]}"
            assert 0 < m["resident_bytes"] <= m["stage_bytes"] < m["model_bytes"], (name, rank, m)
    models = LAYOUT_MODELS.get(layout, ALL)
    for name in models + [f"meta:{n}" for n in meta]:
        seen: set[str] = set()
        for rank, r in enumerate(reports):
            m = r[name]
            assert m["loss"] == pytest.approx(m["ref_loss"], rel=TOL), (name, rank)
            assert m["grad"] <= TOL, f"{name} rank {rank}: gradients differ by {m['grad']:.2e} (relative)"
            # Adam's first step is lr * sign(g) where g is ~0: float noise flips it, so only SGD's step is compared.
            if not pins.get("adamw"):
                assert m["param"] <= TOL, f"{name} rank {rank}: parameters after the step differ by {m['param']:.2e}"
            seen.update(m["names"])
        assert seen == set(reports[0][name]["all_names"]), f"{name}: parameters no rank checked: {set(reports[0][name]['all_names']) - seen}"
    if pins.get("zero1"):  # optimizer state sharded over dp: each rank holds a share, together all of it
        for name in ALL:
            assert {r[name]["optimizer"] for r in reports} == {"ZeroRedundancyOptimizer"}, name
            shares = [r[name]["state_params"] for r in reports]
            assert sum(shares) == reports[0][name]["n_params"] and max(shares) < reports[0][name]["n_params"], (name, shares)
    if layout in FSDP:  # the plan's level ran: blocks folded into FSDP units besides each stage root (tp: the root)
        for name in models:
            for rank, r in enumerate(reports):
                assert r[name]["dp_sharding"] == pins["dp_sharding"], (name, rank)
                units, stages = r[name]["fsdp_units"], len(r[name]["stages"])
                assert units == stages if pins["tp"] > 1 else units > stages, (name, rank, units)
    if pins.get("adamw"):  # byte-exact residency: dim-0 chunks, the first rank's the largest
        for name in models:
            held = [r[name]["held_bytes"] for r in reports]
            assert held[0] == reports[0][name]["priced_bytes"], (name, held, reports[0][name]["priced_bytes"])
            assert all(h <= r[name]["priced_bytes"] for h, r in zip(held, reports)), (name, held)
    for name in models:  # the plan's recompute flags are what the stages run
        for rank, r in enumerate(reports):
            if layout in RECOMPUTE_LAYERS:  # some blocks and attention cores, each through its own checkpoint
                edit = pins["recompute_layers"]
                assert all(len(b) == edit["blocks"] for b in r[name]["plan_recompute"]), (name, r[name]["plan_recompute"])
                assert all(s == edit.get("selective", False) for s in r[name]["plan_selective"])
                assert (r[name]["checkpoints"] > 0) == (pins["tp"] == 1), (name, rank)
                if pins["tp"] == 1:
                    assert r[name]["checkpointed"] == [edit["blocks"]] * len(r[name]["stages"]), (name, rank)
                continue
            assert all(r[name]["plan_recompute"]) == bool(pins.get("recompute")), (name, r[name]["plan_recompute"])
            # Every block of a recomputing stage through its own checkpoint, the tied embedding and head too
            # (under tp, as node regions the interpreter runs: no checkpoint node in the graph).
            each = [len(r[name]["plan_recompute"][s]) if pins.get("recompute") and pins["tp"] == 1 else 0
                    for s in r[name]["stages"]]
            assert r[name]["checkpointed"] == each, (name, rank, r[name]["checkpointed"], each)
    if pins.get("vocab_chunks"):  # each stage computes a share of the logits
        for name in models:
            assert [[m for m in mods if ".vocab" in m] for mods in reports[0][name]["plan_modules"]] == \
                [["lm_head.vocab0"], ["lm_head.vocab1"]], reports[0][name]["plan_modules"]
    schedules = {reports[0][n]["schedule"] for n in models}
    if "schedule" in pins:  # a pinned schedule is the one run
        assert schedules == {pins["schedule"]}
    else:  # the tuned baselines choose their own (gpipe, 1f1b, interleaved, ...)
        assert schedules <= set(SCHEDULES), schedules


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every checkpoint scenario in three launches (process start-up dominates; see runtime_harness.py).

    1. 2 ranks: GPT-2 under pp=2 trains steps 0-1, saves, trains steps 2-3 (the run that never stopped);
       the MLP under pp=2 trains a step and saves; rank 0 makes a copy with a truncated data file; the
       MLP in bf16 (fp32 master weights) under pp=2 trains a step, lowers its learning rate, records its
       state and saves, and trains step 1.
    2. 2 ranks: GPT-2 under tp=2 loads and trains step 2; the MLP tries a missing, the corrupt and
       GPT-2's checkpoint (each must fail, changing nothing), then loads its own and trains on; the bf16
       MLP under dp=2 with ZeRO-1 (masters whole, the state of each dp rank's share) loads, records its
       state and trains step 1.
    3. 4 ranks: GPT-2 under pp=2 x dp=2 with ZeRO-3 (FSDP2) loads and trains step 2, and saves its
       sharded state; GPT-2 under dp=4 with ZeRO-2 loads that; GPT-2 under tp=2 x dp=2 with ZeRO-3
       (FSDP shards of tp shards) loads, trains step 2 and saves; GPT-2 under dp=4 with ZeRO-1 loads
       that and trains step 3, and GPT-2 under tp=2 x dp=2 with HSDP (two virtual nodes) loads it too.
    """
    tmp = tmp_path_factory.mktemp("ckpt")
    gpt, mlp, corrupt, bf16 = str(tmp / "gpt"), str(tmp / "mlp"), str(tmp / "corrupt"), str(tmp / "bf16")
    gpt_run = dict(model="gpt2-tiny", global_batch=4)
    mlp_run = dict(model="mlp", global_batch=2, layout=dict(pp=2, microbatches=2))
    bf16_run = dict(model="mlp", global_batch=4, dtype="bf16")
    reports = {}
    reports["save"] = launch(2, "checkpoint", {"runs": [
        dict(gpt_run, key="gpt", layout=dict(pp=2, microbatches=2),
             phases=[{"steps": [0, 2]}, {"save": gpt}, {"steps": [2, 2]}]),
        dict(mlp_run, key="mlp", phases=[{"steps": [0, 1]}, {"save": mlp}, {"corrupt": [mlp, corrupt]}]),
        dict(bf16_run, key="bf16", layout=dict(pp=2, microbatches=2),
             phases=[{"steps": [0, 1]}, {"lr": 0.05}, {"state": "saved"}, {"save": bf16}, {"steps": [1, 1]}]),
    ]}, tmp)
    reports["tp2"] = launch(2, "checkpoint", {"runs": [
        dict(gpt_run, key="gpt", layout=dict(tp=2, pp=1, microbatches=1), phases=[{"load": gpt}, {"steps": [2, 2]}]),
        dict(mlp_run, key="mlp", phases=[{"load": str(tmp / "nothing-here")}, {"load": corrupt}, {"load": gpt},
                                         {"load": mlp}, {"steps": [1, 1]}]),
        dict(bf16_run, key="bf16", layout=dict(pp=1, dp=2, microbatches=1, dp_sharding="zero1"),
             phases=[{"load": bf16}, {"state": "loaded"}, {"steps": [1, 1]}]),
    ]}, tmp)
    reports["pp2xdp2"] = launch(4, "checkpoint", {"runs": [
        dict(gpt_run, key="gpt", layout=dict(pp=2, dp=2, microbatches=2, dp_sharding="zero3"),
             phases=[{"load": gpt}, {"steps": [2, 1]}, {"save": str(tmp / "zero3")}, {"steps": [3, 1]}]),
        dict(gpt_run, key="zero2", layout=dict(pp=1, dp=4, microbatches=1, dp_sharding="zero2"),
             phases=[{"load": str(tmp / "zero3")}]),
        dict(gpt_run, key="tp-zero3", layout=dict(pp=1, tp=2, dp=2, microbatches=2, dp_sharding="zero3"),
             phases=[{"load": gpt}, {"steps": [2, 1]}, {"save": str(tmp / "tp-zero3")}]),
        dict(gpt_run, key="zero1", layout=dict(pp=1, dp=4, microbatches=1, dp_sharding="zero1"),
             phases=[{"load": str(tmp / "tp-zero3")}, {"steps": [3, 1]}]),
        dict(gpt_run, key="tp-hsdp", layout=dict(pp=1, tp=2, dp=2, microbatches=2, dp_sharding="hsdp", nodes=2),
             phases=[{"load": str(tmp / "tp-zero3")}]),
    ]}, tmp)
    return reports


def _assert_params_match(got: dict[str, list[float]], want: dict[str, list[float]], what: str) -> None:
    assert set(got) == set(want), what
    for k in want:
        worst = max(abs(a - b) for a, b in zip(got[k], want[k]))
        scale = max(abs(b) for b in want[k]) or 1.0
        assert worst / scale <= TOL, f"{what}: {k} differs by {worst / scale:.2e}"


def test_checkpoint_resumes_under_another_layout(checkpoint_runs: dict[str, list[dict]]) -> None:
    """Saved under pp=2, loaded under tp=2, pp=2 x dp=2 (ZeRO-3) and tp=2 x dp=2 (ZeRO-3: FSDP shards of tp
    shards), continued: the same as a run that never stopped; the ZeRO-3 run's sharded state, loaded under
    dp=4 with ZeRO-2, is the tensors of step 2; the tp=2 x ZeRO-3 run's, loaded under dp=4 with ZeRO-1 (each dp
    rank loading its share of the optimizer state), continues as the run that never stopped, and loaded under
    tp=2 x dp=2 with HSDP is the same tensors."""
    straight = checkpoint_runs["save"]
    _ok(straight)
    want = {k: v for r in straight for k, v in r["gpt"]["params"].items()}  # after step 3
    sharded = checkpoint_runs["pp2xdp2"]
    for layout, key in (("tp2", "gpt"), ("pp2xdp2", "gpt"), ("pp2xdp2", "tp-zero3")):
        resumed = checkpoint_runs[layout]
        _ok(resumed)
        assert resumed[0][key]["loads"] == [None]
        assert resumed[0][key]["losses"][0] == pytest.approx(straight[0]["gpt"]["losses"][2], rel=TOL)
        if key == "gpt":  # trained on to step 3
            assert resumed[0][key]["losses"][1] == pytest.approx(straight[0]["gpt"]["losses"][3], rel=TOL)
            _assert_params_match({k: v for r in resumed for k, v in r[key]["params"].items()}, want, layout)
    assert sharded[0]["zero1"]["loads"] == [None]
    assert sharded[0]["zero1"]["losses"][0] == pytest.approx(straight[0]["gpt"]["losses"][3], rel=TOL)
    _assert_params_match({k: v for r in sharded for k, v in r["zero1"]["params"].items()}, want,
                         "pp=2 -> tp2 x dp2 ZeRO-3 -> dp4 ZeRO-1")
    # ZeRO-2 loaded what the ZeRO-3 run saved after step 2: the tp=2 x ZeRO-3 run's parameters then
    saved = {k: v for r in sharded for k, v in r["tp-zero3"]["params"].items()}
    _assert_params_match({k: v for r in sharded for k, v in r["zero2"]["params"].items()}, saved, "ZeRO-3 -> ZeRO-2")
    for r in sharded:  # HSDP's shards of tp shards: the tensors the tp=2 x ZeRO-3 run saved, bit for bit
        assert r["tp-hsdp"]["loads"] == [None] and r["tp-hsdp"]["params"] == {k: saved[k] for k in r["tp-hsdp"]["params"]}
    assert set(sharded[0]["tp-hsdp"]["params"]) == set(saved)


def test_checkpoint_of_master_weights_under_zero1_is_the_saved_state(checkpoint_runs: dict[str, list[dict]]) -> None:
    """bf16 with fp32 master weights: saved under pp=2, loaded under dp=2 with ZeRO-1, every saved tensor comes
    back bit for bit (weights, masters, momentum; each dp rank holds its share of the momentum), the learning
    rate lowered before the save is the one the loaded run steps with, and the next step matches."""
    saved, loaded = checkpoint_runs["save"], checkpoint_runs["tp2"]
    _ok(saved)
    _ok(loaded)
    before = {k: v for r in saved for k, v in r["bf16"]["state"]["saved"]["entries"].items()}
    assert saved[0]["bf16"]["state"]["saved"]["optimizer"] == "MasterWeightOptimizer"
    assert any(k.startswith("master.") for k in before) and any(k.endswith(".momentum_buffer") for k in before)
    seen: set[str] = set()
    for r in loaded:
        run = r["bf16"]
        assert run["loads"] == [None], run["loads"]
        after = run["state"]["loaded"]
        assert after["lr"] == [0.05], after["lr"]
        for k, v in after["entries"].items():
            assert v == before[k], f"{k} differs after the load"
        seen |= set(after["entries"])
        assert run["losses"][0] == pytest.approx(saved[0]["bf16"]["losses"][1], rel=2e-2)  # bf16 reductions
    assert seen == set(before), sorted(set(before) ^ seen)[:4]


def test_checkpoint_errors_before_any_step(checkpoint_runs: dict[str, list[dict]]) -> None:
    """Missing, corrupt, and other-model checkpoints: one clear line on every rank, weights untouched;
    the good checkpoint still loads afterwards (nothing was overwritten) and training continues."""
    _ok(checkpoint_runs["save"])
    reports = checkpoint_runs["tp2"]
    _ok(reports)
    cases = {"missing": "no checkpoint at", "corrupt": "corrupt", "other model": "not of this model"}
    for r in reports:
        loads = r["mlp"]["loads"]
        for (what, words), outcome in zip(cases.items(), loads):
            assert outcome is not None, f"{what}: the load succeeded"
            assert "CheckpointError" in outcome["error"] and words in outcome["error"], (what, outcome["error"])
            assert "\n" not in outcome["error"]
            assert outcome["unchanged"], f"{what}: a failed load changed the weights"
        assert loads[3] is None, f"the good checkpoint no longer loads: {loads[3]}"
        assert len(r["mlp"]["losses"]) == 1


# The failures the suite injects (benchmarks/failure_matrix.py runs every combination):
# (how, failing rank, where, under torchrun, words its line must hold). Rank 1 is stage 1 of 2 (the
# loss is on it), rank 0 is stage 0 and hosts the job's store.
FAILURES = {
    "raise": ("raise", 1, "loss", False, "rank 1 (stage 1) failed: ValueError: injected failure"),
    "hang": ("hang", 1, "loss", False, "rank 1 (stage 1) hangs"),
    "exit": ("exit", 1, "forward", False, "rank 1 (stage 1) died"),
    "kill-rank0": ("kill", 0, "forward", False, "rank 0 (stage 0) died"),
    "torchrun-hang": ("hang", 1, "loss", True, "rank 1 (stage 1) hangs"),
    "torchrun-raise": ("raise", 1, "forward", True, "rank 1 (stage 1) failed: ValueError: injected failure"),
    # torchrun ends the job before a heartbeat is missed: the survivor names the rank whose process is gone
    "torchrun-kill": ("kill", 1, "forward", True, "rank 1 (stage 1) died: its process ended"),
    # 4 ranks: rank 2 is watched by rank 1 alone ([Note: watching a ring] in watchdog.py)
    "exit-of-4": ("exit", 2, "forward", False, "rank 2 (stage 2) died"),
}


def first_error_line(stderr: str) -> str:
    """The first line that reports an error. A C++ warning is not one: torch logs TCPStore's
    ``[W ...] recvValue failed`` with an ``Exception raised from ...`` line and ``frame #`` lines."""
    import re

    return next((line for line in stderr.splitlines() if re.match(r"autopart: error|Traceback|\w*(Error|Exception)\b", line)
                 and not line.startswith("Exception raised from")), "")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FAILURES))
def test_failing_rank_stops_every_rank(case: str, tmp_path: Path) -> None:
    """A rank fails mid-run: every rank exits within 60 s of the fault (timeout_s=5), and the first
    error line names the failing rank and its stage; under torchrun autopart's line comes once."""
    how, rank, where, torchrun, words = FAILURES[case]
    fault = tmp_path / "fault"
    world = 4 if case.endswith("-of-4") else 2
    layout = dict(pp=world, microbatches=world, global_batch=world)
    reports = launch(world, "fail", {"fail_rank": rank, "how": how, "where": where, "timeout_s": 5.0,
                                     "fault_file": str(fault), "layout": layout},
                     tmp_path, timeout_s=180, torchrun=torchrun)
    assert fault.exists(), reports[0]["stderr"][-3000:]
    after = [r["ended_at"] - float(fault.read_text()) for r in reports]
    assert all(a < 60 for a in after), after
    assert all(r["rc"] != 0 for r in reports), [r["rc"] for r in reports]
    for survivor in (r for i, r in enumerate(reports) if i != rank):
        assert words in first_error_line(survivor["stderr"]), survivor["stderr"][-3000:]
    if torchrun:
        ours = [line for line in survivor["stderr"].splitlines() if line.startswith("autopart: error")]
        assert len(ours) == 1, survivor["stderr"][-3000:]  # (torchrun's summary quotes it once more)
        if how != "kill":  # the rank that ended first left autopart's line for torchrun's summary to quote
            root_cause = survivor["stderr"].rpartition("Root Cause")[2]
            assert "autopart: error" in root_cause and "To enable traceback" not in root_cause, root_cause


def test_wrong_world_size_and_wrong_model_are_refused(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    reports = launch(2, "wrong_world", {"plan": str(plan_file)}, tmp_path)
    for r in reports:
        assert r.get("job_failed") and "needs 4 ranks but this job has 2" in r["job_failed"], r.get("job_failed")
        assert "torchrun --nproc-per-node 4" in r["job_failed"]
    assert json.loads(reports[0]["plan_mesh"]) == {"pp": 2, "tp": 1, "dp": 2}
    assert "PlanError" in reports[0]["wrong_model"] and "re-plan" in reports[0]["wrong_model"]


@pytest.mark.slow
def test_an_error_under_torchrun_is_printed_once(tmp_path: Path) -> None:
    """A bad plan under torchrun: every rank refuses it, autopart's line comes once (rank 0's), and
    torchrun's closing summary quotes it as the root cause."""
    import os
    import subprocess

    from runtime_harness import ROOT, free_port

    bad = tmp_path / "plan.json"
    bad.write_bytes(b'{"version": 1, "model": "\xff"}')
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "partitioner", "run", "--plan", str(bad), "--model", "mlp"],
                          env=env, capture_output=True, text=True, timeout=180)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("autopart: error")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
    assert "is not UTF-8" in ours[0]
    assert f"traceback : {ours[0]}" in proc.stderr  # torchrun's summary names the cause
