"""The runtime against a single-process reference, in real gloo process groups (tier 3 of STYLE.md).

One launch per layout checks every model (process start-up dominates); see
tests/runtime_harness.py for what each rank computes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_harness import MODELS, launch  # noqa: E402

TOL = 1e-5
ALL = list(MODELS)

# name: (ranks, pins); global batch = dp x microbatches x micro-batch size.
LAYOUTS = {
    "pp2": (2, dict(pp=2, tp=1, dp=1, microbatches=2, global_batch=4)),  # micro-batches of 2
    "pp4-interleaved": (4, dict(pp=4, tp=1, dp=1, schedule="interleaved", virtual_stages=2, microbatches=4, global_batch=4)),
    "tp2": (2, dict(pp=1, tp=2, dp=1, microbatches=1, global_batch=2)),
    "dp2": (2, dict(pp=1, tp=1, dp=2, microbatches=1, global_batch=4)),
    "pp2xtp2": (4, dict(pp=2, tp=2, dp=1, schedule="gpipe", microbatches=2, global_batch=2)),
    "pp2xdp2": (4, dict(pp=2, tp=1, dp=2, microbatches=2, global_batch=4)),
    "pp2xtp2xdp2": (8, dict(pp=2, tp=2, dp=2, microbatches=2, global_batch=4)),
}

# Layouts that also run models built on meta (each rank materializes only its stages' weights),
# against a reference materialized whole by the same rule.
META_MODELS = {"pp2": ALL, "pp2xtp2": ["gpt2-tiny", "llama-tiny"]}


def _ok(reports: list[dict]) -> None:
    for rank, r in enumerate(reports):
        assert r["rc"] == 0 and r.get("job_failed") is None, f"rank {rank}: {r.get('job_failed')}\n{r['stderr'][-4000:]}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_equivalence(layout: str, tmp_path: Path) -> None:
    ranks, pins = LAYOUTS[layout]
    meta = META_MODELS.get(layout, [])
    reports = launch(ranks, "equivalence", {"layout": pins, "models": ALL, "meta_models": meta}, tmp_path)
    _ok(reports)
    for name in meta:  # built on meta: a rank holds its own stages' tensors and nothing else
        for rank, r in enumerate(reports):
            m = r[f"meta:{name}"]
            assert m["foreign"] == [], f"{name} rank {rank} materialized tensors of other stages: {m['foreign'][:3]}"
            assert 0 < m["resident_bytes"] <= m["stage_bytes"] < m["model_bytes"], (name, rank, m)
    for name in ALL + [f"meta:{n}" for n in meta]:
        seen: set[str] = set()
        for rank, r in enumerate(reports):
            m = r[name]
            assert m["loss"] == pytest.approx(m["ref_loss"], rel=TOL), (name, rank)
            assert m["grad"] <= TOL, f"{name} rank {rank}: gradients differ by {m['grad']:.2e} (relative)"
            assert m["param"] <= TOL, f"{name} rank {rank}: parameters after the step differ by {m['param']:.2e}"
            seen.update(m["names"])
        assert seen == set(reports[0][name]["all_names"]), f"{name}: parameters no rank checked: {set(reports[0][name]['all_names']) - seen}"
    schedules = {reports[0][n]["schedule"] for n in ALL}
    assert schedules == {pins.get("schedule", "1f1b")}


def test_checkpoint_resumes_under_another_layout(tmp_path: Path) -> None:
    """Save under pp=2, load under tp=2 and pp=2 x dp=2, continue: the same weights as a run that never stopped."""
    common = dict(model="gpt2-tiny", global_batch=4)
    straight = launch(2, "checkpoint", {**common, "layout": dict(pp=2, microbatches=2), "first_step": 0, "steps": 3}, tmp_path)
    _ok(straight)
    ckpt = tmp_path / "ckpt"
    first = launch(2, "checkpoint", {**common, "layout": dict(pp=2, microbatches=2), "first_step": 0, "steps": 2,
                                     "save": str(ckpt)}, tmp_path)
    _ok(first)
    assert first[0]["losses"] == straight[0]["losses"][:2]
    for n, layout in ((2, dict(tp=2, pp=1, microbatches=1)), (4, dict(pp=2, dp=2, microbatches=2))):
        resumed = launch(n, "checkpoint", {**common, "layout": layout, "first_step": 2, "steps": 1, "load": str(ckpt)}, tmp_path)
        _ok(resumed)
        assert resumed[0]["losses"][0] == pytest.approx(straight[0]["losses"][2], rel=TOL)
        want = {k: v for r in straight for k, v in r["params"].items()}
        got = {k: v for r in resumed for k, v in r["params"].items()}
        assert set(got) == set(want)
        for k in want:
            worst = max(abs(a - b) for a, b in zip(got[k], want[k]))
            scale = max(abs(b) for b in want[k]) or 1.0
            assert worst / scale <= TOL, f"{layout}: {k} differs by {worst / scale:.2e}"


def test_checkpoint_errors_before_any_step(tmp_path: Path) -> None:
    """Missing, corrupt, and other-model checkpoints: one clear line on every rank, weights untouched."""
    ckpt = tmp_path / "ckpt"
    _ok(launch(2, "checkpoint", {"model": "mlp", "global_batch": 2, "layout": dict(pp=2, microbatches=2),
                                 "first_step": 0, "steps": 1, "save": str(ckpt)}, tmp_path))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in ckpt.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    data = next(f for f in corrupt.iterdir() if f.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 3])
    cases = {
        "missing": (tmp_path / "nothing-here", "no checkpoint at"),
        "corrupt": (corrupt, "corrupt"),
        "other model": (ckpt, "not of this model"),
    }
    for what, (path, words) in cases.items():
        model = "gpt2-tiny" if what == "other model" else "mlp"
        reports = launch(2, "checkpoint", {"model": model, "global_batch": 2, "layout": dict(pp=2, microbatches=2),
                                           "first_step": 0, "steps": 1, "load": str(path)}, tmp_path)
        _ok(reports)
        for r in reports:
            assert "CheckpointError" in r["load_error"] and words in r["load_error"], (what, r["load_error"])
            assert "\n" not in r["load_error"]
            assert r["unchanged"], f"{what}: a failed load changed the weights"
    # Nothing was overwritten: the good checkpoint still loads.
    good = launch(2, "checkpoint", {"model": "mlp", "global_batch": 2, "layout": dict(pp=2, microbatches=2),
                                    "first_step": 1, "steps": 1, "load": str(ckpt)}, tmp_path)
    _ok(good)
    assert "load_error" not in good[0]


@pytest.mark.parametrize("how", ["raise", "die"])
def test_failing_rank_stops_every_rank(how: str, tmp_path: Path) -> None:
    """Rank 1 (stage 1 of 2) fails inside its step: every rank exits within 60 s, naming rank 1 and stage 1."""
    reports = launch(2, "fail", {"fail_rank": 1, "how": how, "layout": dict(pp=2, microbatches=2, global_batch=2)},
                     tmp_path, timeout_s=90)
    assert all(r["elapsed_s"] < 60 for r in reports), [r["elapsed_s"] for r in reports]
    assert all(r["rc"] != 0 for r in reports), [r["rc"] for r in reports]
    assert "rank 1 (stage 1)" in reports[0]["stderr"], reports[0]["stderr"][-2000:]
    if how == "raise":
        assert "injected failure" in reports[0]["stderr"]


def test_wrong_world_size_and_wrong_model_are_refused(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    reports = launch(2, "wrong_world", {"plan": str(plan_file)}, tmp_path)
    for r in reports:
        assert r.get("job_failed") and "needs 4 ranks but this job has 2" in r["job_failed"], r.get("job_failed")
        assert "torchrun --nproc-per-node 4" in r["job_failed"]
    assert json.loads(reports[0]["plan_mesh"]) == {"pp": 2, "tp": 1, "dp": 2}
    assert "PlanError" in reports[0]["wrong_model"] and "re-plan" in reports[0]["wrong_model"]
