"""Plans at odds with themselves: refused alike by ``plan --plan``, ``run`` and ``auto_parallelize``.

One plan for a small MLP (pp=2) is edited 25 ways that must be refused and 2 ways that stay
consistent ([Note: what a stage holds] in partitioner/plan.py). Every consumer is called in
this process: the runtime checks a given plan against the model before it starts a process
group, so a refused plan never needs torchrun, and a consistent one gets as far as asking
for it. A consistent edit is then split by the runtime's rewriter exactly as ``plan --plan``
priced it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from partitioner import auto_parallelize, cli
from partitioner.errors import AutopartError
from partitioner.plan import Plan

MODEL = ["--model", "mlp", "--config", "width=32", "depth=4"]
CLUSTER = ["--cluster", "local-cpu:2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("plans") / "base.json"
    rc = cli.main(["plan", *MODEL, *CLUSTER, "--mesh", "pp=2", "--global-batch", "4", "--method", "params",
                   "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    assert [s["modules"] for s in data["stages"]] == [["layers.0", "layers.1"], ["layers.2", "layers.3", "head"]]
    assert {GELU_0, LINEAR_1, GELU_1} <= set(data["stages"][0]["nodes"])
    return data


def _stage(d: dict, i: int) -> dict:
    return d["stages"][i]


def _move_module(d: dict) -> None:  # layers.2 listed by stage 0, its nodes left in stage 1
    _stage(d, 1)["modules"].remove("layers.2")
    _stage(d, 0)["modules"].append("layers.2")


def _move_module_and_nodes(d: dict) -> None:  # consistent: a different split
    _move_module(d)
    for n in [n for n in _stage(d, 1)["nodes"] if n.startswith("layers.2.")]:
        _stage(d, 1)["nodes"].remove(n)
        _stage(d, 0)["nodes"].append(n)


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *keys, last = path.split(".")
        for k in keys:
            d = d[int(k)] if k.isdigit() else d[k]
        d[int(last) if last.isdigit() else last] = value
    return edit


def _swap_stages(d: dict) -> None:
    a, b = _stage(d, 0), _stage(d, 1)
    a["modules"], b["modules"] = b["modules"], a["modules"]
    a["nodes"], b["nodes"] = b["nodes"], a["nodes"]


# Node keys ([Note: stable node keys] in partitioner/capture.py) of the plan's first stage.
GELU_0, LINEAR_1, GELU_1 = "layers.0.1/aten.gelu.default#0", "layers.1.0/aten.linear.default#0", "layers.1.1/aten.gelu.default#0"

# name: (edit of the plan dict, or raw bytes; words the one-line error must hold)
REFUSED: dict[str, tuple[Callable[[dict], None] | bytes, str]] = {
    "moved module": (_move_module, "disagree"),
    "missing module": (lambda d: (_stage(d, 0)["modules"].remove("layers.1"),
                                  [_stage(d, 0)["nodes"].remove(n) for n in (LINEAR_1, GELU_1)]), "no stage holds module layers.1"),
    "unknown module": (lambda d: _stage(d, 0)["modules"].__setitem__(1, "layers.9"), "'layers.9'"),
    "missing node": (lambda d: _stage(d, 0)["nodes"].remove(GELU_0), f"not its node {GELU_0!r}"),
    "unknown node": (lambda d: _stage(d, 0)["nodes"].append("bogus"), "'bogus'"),
    "node in two stages": (lambda d: _stage(d, 1)["nodes"].append(GELU_0), f"node {GELU_0} is listed by stage 0 and stage 1"),
    "module in two stages": (lambda d: _stage(d, 1)["modules"].insert(0, "layers.1"), "module layers.1 is listed by"),
    "modules out of order": (lambda d: _stage(d, 1)["modules"].reverse(), "model order"),
    "stages out of order": (_swap_stages, "model order"),
    "inconsistent batch": (_set("training.global_batch", 5), "training.global_batch is 5"),
    "modules a string": (_set("stages.0.modules", "layers.0"), "stages[0].modules must be an array"),
    "params a string": (_set("stages.0.params", "12"), "stages[0].params"),
    "rank a fraction": (_set("stages.0.ranks", [0.5]), "stages[0].ranks[0]"),
    "recompute a string": (_set("stages.1.recompute", "yes"), "stages[1].recompute"),
    "pp a string": (_set("mesh.pp", "2"), "mesh.pp"),
    "dtype a number": (_set("training.dtype", 32), "training.dtype"),
    "wrong ranks": (_set("stages.0.ranks", [1]), "stages[0].ranks is [1]"),
    "sharding of no stage's node": (_set("sharding.nodes", {"bogus": "column"}), "'bogus'"),
    "empty modules": (_set("stages.0.modules", []), "stage 0 owns no modules"),
    "another model": (_set("model.fingerprint", "0123456789abcdef"), "made for model"),
    "future version": (_set("version", 99), "version 99"),
    "not an object": (b"[1, 2]", "must be an object"),
    "not JSON": (b'{"version": 1, "model": ', "not valid JSON"),
    "not UTF-8": (b'{"version": 1, "model": "\xff\xfe"}', "not UTF-8"),
    "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}
CONSISTENT: dict[str, Callable[[dict], None]] = {
    "nodes and ranks left to fill in": lambda d: [s.update(nodes=[], ranks=[]) for s in d["stages"]],
    "module moved with its nodes": _move_module_and_nodes,
}


def _write(tmp: Path, base: dict, edit: Callable[[dict], None] | bytes) -> Path:
    path = tmp / "edited.json"
    if isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        d = copy.deepcopy(base)
        edit(d)
        path.write_text(json.dumps(d))
    return path


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def _mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from partitioner.zoo import load_model

    lm = load_model("mlp", config=dict(width=32, depth=4))
    return lm.model, lm.example_inputs


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def test_edited_plans_refused_by_every_consumer(base: dict, tmp_path: Path, capsys, no_torchrun) -> None:
    assert len(REFUSED) >= 20
    model, example = _mlp()
    for name, (edit, words) in REFUSED.items():
        path = _write(tmp_path, base, edit)
        for consumer in ("plan", "run"):
            argv = ["plan", *MODEL, *CLUSTER, "--plan", str(path)] if consumer == "plan" else ["run", "--plan", str(path), *MODEL]
            rc, err = _cli(capsys, *argv)
            lines = err.strip().splitlines()
            assert rc != 0 and len(lines) == 1, f"{name}: {consumer} rc {rc}: {err}"
            assert lines[0].startswith("autopart: error:") and "internal error" not in lines[0], f"{name}: {consumer}: {err}"
            assert words in lines[0], f"{name}: {consumer}: {lines[0]!r} lacks {words!r}"
        with pytest.raises(AutopartError) as exc:
            auto_parallelize(model, example_inputs=example, loss_fn=torch.nn.functional.mse_loss, plan=Plan.load(path))
        assert words in str(exc.value) and "\n" not in str(exc.value), f"{name}: auto_parallelize: {exc.value}"


def test_consistent_edits_are_priced_and_run_as_one_split(base: dict, tmp_path: Path, capsys, no_torchrun) -> None:
    from partitioner import Cluster
    from partitioner.capture import node_keys
    from partitioner.planner import check_plan, score_plan
    from partitioner.rewrite import microbatch_inputs, split_model

    model, example = _mlp()
    for name, edit in CONSISTENT.items():
        path = _write(tmp_path, base, edit)
        rc, err = _cli(capsys, "plan", *MODEL, *CLUSTER, "--plan", str(path))
        assert rc == 0, f"{name}: plan --plan refused it: {err}"
        # run gets past every check on the plan, to where it needs its ranks launched
        rc, err = _cli(capsys, "run", "--plan", str(path), *MODEL)
        assert rc != 0 and "pass --nproc-per-node 2" in err, f"{name}: {err}"
        plan = Plan.load(path)
        priced = score_plan(plan, model, example, Cluster.local(2)).plan
        run = split_model(model, check_plan(plan, model, example), microbatch_inputs(example, 1))
        for s, stage in enumerate(priced.stages):
            ran = set(node_keys([n for n in run.stages[s].module.graph.nodes if n.op == "call_function"]).values())
            assert ran == set(stage.nodes), f"{name}: stage {s} runs {sorted(ran)}, priced {sorted(stage.nodes)}"
        if name == "module moved with its nodes":
            assert priced.stages[0].modules == ("layers.0", "layers.1", "layers.2")


def test_stage_ranks_follow_the_schedules_layout(base: dict) -> None:
    """Under zbv (V layout, [Note: stage layouts] in schedules.py) rank 0 holds stages 0 and 3:
    ranks filled in from the modules follow the layout, and ranks of the loop layout are refused."""
    from partitioner.planner import check_plan

    d = copy.deepcopy(base)
    d["schedule"].update(name="zbv", virtual_stages=2)
    modules = [["layers.0"], ["layers.1"], ["layers.2"], ["layers.3", "head"]]
    d["stages"] = [dict(copy.deepcopy(base["stages"][0]), index=i, modules=m, nodes=[], ranks=[])
                   for i, m in enumerate(modules)]
    model, example = _mlp()
    plan = check_plan(Plan.from_dict(d), model, example)
    assert [list(st.ranks) for st in plan.stages] == [[0], [1], [1], [0]]
    d["stages"][3]["ranks"] = [1]  # where stage 3 of pp=2 would be without the V
    with pytest.raises(AutopartError, match=r"stages\[3\]\.ranks is \[1\] .* schedule zbv runs stage 3 on ranks \[0\]"):
        Plan.from_dict(d).check_consistent()
