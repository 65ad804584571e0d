"""`tunesmith sweep`: Optuna over dotted config keys, trials as run folders, pruning from the loop's
evaluations, a resumable SQLite study, reports and the best config."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunesmith.cli import app
from tunesmith.config import load_config
from tunesmith.errors import ConfigError

optuna = pytest.importorskip("optuna")
runner = CliRunner()


@pytest.fixture
def base_file(run_config, tmp_path) -> Path:
    cfg = run_config(data={"max_length": 64, "split": {"validation_ratio": 0.25}},
                     training={"max_steps": 4, "log_every": 1, "batch_size": 6},
                     eval={"every": 2, "forgetting": False}, output={"dir": str(tmp_path / "base-run")})
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_sweep(tmp_path: Path, name: str = "sw", **fields) -> Path:
    spec = {"base": "base.yaml", "metric": "eval_loss", "output": str(tmp_path / "sweeps" / "{name}"),
            "name": name, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_sweep_runs_each_point_as_a_run_and_writes_reports(base_file, tmp_path):
    from tunesmith.sweeping import sweep

    path = write_sweep(tmp_path, space={"training.learning_rate": [1e-4, 3e-2], "method.r": [2, 4]},
                       sampler="grid", pruner="none")
    result = sweep(path, echo=lambda m: None)
    out = tmp_path / "sweeps" / "sw"
    assert len(result.trials) == 4 and {t["state"] for t in result.trials} == {"complete"}
    assert sorted((t["params"]["training.learning_rate"], t["params"]["method.r"]) for t in result.trials) == \
        [(1e-4, 2), (1e-4, 4), (3e-2, 2), (3e-2, 4)]
    for t in result.trials:  # every trial is a normal run folder whose final eval_loss is the trial's value
        records = [json.loads(line) for line in (Path(t["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in records if r.get("final")][-1]
        assert final["eval_loss"] == pytest.approx(t["value"])
        cfg = yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())
        assert cfg["training"]["learning_rate"] == t["params"]["training.learning_rate"]
        assert cfg["method"]["r"] == t["params"]["method.r"]
    values = [t["value"] for t in result.trials]
    assert result.best_value == min(values)
    assert result.best_params["training.learning_rate"] == 3e-2  # 4 steps: the large rate learns most
    best = load_config(out / "best.yaml")
    assert best.training.learning_rate == result.best_params["training.learning_rate"]
    assert best.method.r == result.best_params["method.r"]
    report = (out / "report.md").read_text()
    assert report.count("| complete |") == 4 and "Best: trial" in report and "Parameter importances" in report
    assert "plotly" in (out / "report.html").read_text().lower()
    # Run again: the study is complete, so nothing trains.
    again = sweep(path, echo=lambda m: None)
    assert len(again.trials) == 4


def test_median_pruner_stops_a_trial_from_the_loop_evaluations(base_file, tmp_path):
    """Trial 0 (a good rate) sets the median; trial 1 (a rate that learns nothing) trails it at its first
    evaluation and stops there, its run cut short."""
    from tunesmith.sweeping import sweep

    from tunesmith.sweeping import STUDY_DB

    path = write_sweep(tmp_path, space={"training.learning_rate": [3e-2, 1e-9]}, sampler="random",
                       pruner="median", startup_trials=1, trials=2)
    out = tmp_path / "sweeps" / "sw"
    out.mkdir(parents=True)
    # The good rate first, then the useless one: queued in the study the sweep takes up.
    study = optuna.create_study(study_name="sw", storage=f"sqlite:///{out / STUDY_DB}", direction="minimize")
    for lr in (3e-2, 1e-9):
        study.enqueue_trial({"training.learning_rate": lr})
    lines: list[str] = []
    result = sweep(path, echo=lines.append)
    states = {t["params"]["training.learning_rate"]: t for t in result.trials}
    assert states[3e-2]["state"] == "complete", lines
    assert states[1e-9]["state"] == "pruned", lines
    records = [json.loads(line) for line in (Path(states[1e-9]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 2  # stopped at its first evaluation, not at step 4
    assert any("pruned at step 2" in line for line in lines)
    assert "| pruned | 1e-09 | " in (tmp_path / "sweeps" / "sw" / "report.md").read_text()
    assert " (at pruning) | 2 |" in (tmp_path / "sweeps" / "sw" / "report.md").read_text()


def test_ctrl_c_in_a_trial_stops_the_sweep_and_the_trial_runs_again_on_resume(base_file, tmp_path, monkeypatch):
    """Interrupted is a TrainingError: it must not be taken for a failed trial (optuna's catch) that the
    sweep steps over; it stops the sweep, and the resumed sweep runs that trial's values first."""
    from tunesmith import api
    from tunesmith.engine.loop import Interrupted
    from tunesmith.sweeping import sweep

    path = write_sweep(tmp_path, space={"training.learning_rate": [1e-2, 2e-2, 3e-2]}, sampler="random",
                       pruner="none", trials=3)
    real, calls = api.train, []

    def train(cfg, **kwargs):
        calls.append(cfg["training"]["learning_rate"])
        if len(calls) == 2:
            raise Interrupted("SIGINT", 1, None)
        return real(cfg, **kwargs)

    monkeypatch.setattr(api, "train", train)
    from typer.testing import CliRunner

    from tunesmith.cli import app

    stopped = CliRunner().invoke(app, ["sweep", str(path)])
    assert stopped.exit_code == 130, stopped.output  # as train does on Ctrl-C
    assert "stopped:" in stopped.output and f"resume: tunesmith sweep {path}" in " ".join(stopped.output.split())
    assert len(calls) == 2  # the sweep stopped at the interrupted trial
    stopped_at = calls[1]
    lines: list[str] = []
    result = sweep(path, echo=lines.append)
    assert calls[2] == stopped_at  # queued again with the same values, first
    assert any("was interrupted: queued again" in line for line in lines), lines
    assert sum(t["state"] == "complete" for t in result.trials) == 3


def test_a_killed_sweep_resumes_and_reruns_the_interrupted_trial(base_file, tmp_path):
    from tunesmith.sweeping import STUDY_DB, sweep

    path = write_sweep(tmp_path, space={"training.learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}},
                       sampler="random", pruner="none", trials=2)
    out = tmp_path / "sweeps" / "sw"
    out.mkdir(parents=True)
    # A sweep killed mid-trial leaves that trial RUNNING in the study.
    study = optuna.create_study(study_name="sw", storage=f"sqlite:///{out / STUDY_DB}", direction="minimize")
    killed = study.ask()
    lr = killed.suggest_float("training.learning_rate", 1e-3, 3e-2, log=True)
    lines: list[str] = []
    result = sweep(path, echo=lines.append)
    assert any(f"trial {killed.number} was interrupted: queued again with the same values" in m for m in lines)
    states = [t["state"] for t in result.trials]
    assert states == ["fail", "complete", "complete"]
    assert "| 0 | fail | " in (tmp_path / "sweeps" / "sw" / "report.md").read_text()
    assert "| interrupted |" in (tmp_path / "sweeps" / "sw" / "report.md").read_text()
    assert result.trials[1]["params"]["training.learning_rate"] == lr  # the interrupted values ran first
    # Taken up again for one more trial, the sampler draws new values, not the first process's again.
    more = sweep(path, trials=3, echo=lambda m: None)
    drawn = [t["params"]["training.learning_rate"] for t in more.trials]
    assert len(drawn) == 4 and drawn[3] not in drawn[:3]


def test_sweep_refuses_bad_specs_before_training(base_file, tmp_path):
    from tunesmith.sweeping import sweep

    def refused(match: str, **fields) -> None:
        with pytest.raises(ConfigError, match=match):
            sweep(write_sweep(tmp_path, **fields), echo=lambda m: None)
        assert not (tmp_path / "sweeps" / "sw" / "trial-000").exists()

    refused(r"(?s)space.method.rank = 2 is not a valid run setting: .*method.rank: unknown key",
            space={"method.rank": [2, 4]})
    refused(r"space.training.learning_rate = -1.0 is not a valid run setting",
            space={"training.learning_rate": {"low": -1.0, "high": 1.0}}, pruner="none")
    refused(r"sampler grid needs a list or a range with step for every key; training.learning_rate",
            space={"training.learning_rate": {"low": 1e-4, "high": 1e-2}}, sampler="grid")
    refused(r"space: .*at least 1 item", space={})
    refused(r"high \(0.001\) must be above low \(0.01\)", space={"training.learning_rate": {"low": 1e-2, "high": 1e-3}})
    refused(r"sweep base config not found", base="missing.yaml", space={"method.r": [2]})
    # The pruner needs evaluations during training; a sweep needs validation data.
    cfg = yaml.safe_load(base_file.read_text())
    cfg["eval"]["every"] = None
    base_file.write_text(yaml.safe_dump(cfg))
    refused(r"pruner median stops trials on their evaluations during training; the base config has no eval.every",
            space={"method.r": [2]})
    cfg["data"]["split"] = {"validation_ratio": 0.0}
    base_file.write_text(yaml.safe_dump(cfg))
    refused(r"a sweep scores trials on validation data; the base config has none", space={"method.r": [2]},
            pruner="none")


def test_a_resumed_study_with_another_space_is_refused_and_the_cli_reports(base_file, tmp_path):
    path = write_sweep(tmp_path, space={"method.r": [2]}, sampler="grid", pruner="none")
    result = runner.invoke(app, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    assert "best: trial 0 eval_loss" in result.output and "best.yaml" in result.output
    write_sweep(tmp_path, space={"method.r": [2, 4]}, sampler="grid", pruner="none")
    result = runner.invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2
    assert "was run with a different space; give the sweep another name" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_a_multi_task_base_config_sweeps(run_config, tmp_path):
    """A sweep over a multi-task run: every point is checked and becomes a trial config as written (tasks, no
    filled-in top-level data), scored on the mean of the tasks' losses."""
    from conftest import QA, write_jsonl
    from tunesmith.sweeping import SweepConfig, prepare

    base = run_config()
    other = write_jsonl(tmp_path / "other.jsonl", [{"instruction": a, "input": "", "output": q} for q, a in QA * 4])
    cfg = {k: v for k, v in base.items() if k != "data"}
    split = {"validation_ratio": 0.25}
    cfg["tasks"] = [{"name": "qa", "data": {**base["data"], "split": split}},
                    {"name": "reverse", "data": {"train": str(other), "max_length": 64, "split": split}}]
    cfg["eval"] = {"every": 2, "forgetting": False}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    spec = SweepConfig(base="base.yaml", metric="eval_loss", space={"multitask.temperature": [1.0, 3.0]},
                       output=str(tmp_path / "sweeps"), name="mt")
    data, metric, direction = prepare(spec, tmp_path)
    assert "data" not in data and [t["name"] for t in data["tasks"]] == ["qa", "reverse"]
    assert load_config(data, ["multitask.temperature=3.0"]).multitask.temperature == 3.0
    assert (metric, direction) == ("eval_loss", "minimize")
