"""benchmarks/fidelity_steps.py: a fidelity run's prediction against the mean, median and fastest steps."""

from __future__ import annotations

import json

import pytest

from benchmarks.fidelity_steps import errors, main


def _run(folder, name: str, predicted: float, steps: list[float]) -> None:
    (folder / f"{name}.run.json").write_text(json.dumps(
        {"plan_data": {"predicted": {"step_time_s": predicted}}, "step_times_s": steps}))


def test_each_layout_is_its_rounds_mean_prediction_over_each_statistic(tmp_path):
    _run(tmp_path, "mlp-dp2-r1", 0.010, [0.010, 0.012, 0.020])
    _run(tmp_path, "mlp-dp2-r2", 0.012, [0.011, 0.014, 0.014])
    (tmp_path / "mlp-dp2-r1.plan.json").write_text("{}")  # the run's other files are not runs
    e = errors(tmp_path)["mlp-dp2"]
    assert e["mean"] == pytest.approx(0.011 / ((0.014 + 0.013) / 2) - 1)
    assert e["median"] == pytest.approx(0.011 / 0.013 - 1)
    assert e["fastest"] == pytest.approx(0.011 / 0.0105 - 1)


def test_a_folder_without_runs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="holds no LAYOUT-rN.run.json"):
        main([str(tmp_path)])


def test_a_failed_run_keeps_its_output_and_names_its_cause(tmp_path):
    # benchmarks/fidelity.py: a layout whose run fails is left out of the figures with one line; the line
    # names the rank's exception, not torchrun's wrapper, and the whole output is kept beside the run
    import sys

    from benchmarks.fidelity import RunFailed, run_metered

    script = ("import sys; print('steps'); sys.stderr.write('Traceback (most recent call last):\\n'"
              " '    raise ChildFailedError(\\n[rank1]: RuntimeError: the peer went away\\n'"
              " 'torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \\n'); sys.exit(1)")
    log = tmp_path / "layout.run.failed.txt"
    with pytest.raises(RunFailed) as failed:
        run_metered([sys.executable, "-c", script], "run layout", log=log)
    assert "RuntimeError: the peer went away" in str(failed.value) and "layout.run.failed.txt" in str(failed.value)
    kept = log.read_text()
    assert "rc 1" in kept and "steps" in kept and "ChildFailedError" in kept
