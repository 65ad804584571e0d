"""The command line, through typer's test runner: the same entry point as `tunesmith ...`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunesmith.cli import app
from tunesmith.config import load_config
from tunesmith.engine.tracking import read_metrics

runner = CliRunner()


def flat(text: str) -> str:
    """Output with rich's line wrapping undone, for phrase checks."""
    return " ".join(text.split())


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_train_with_override(run_config, tmp_path):
    cfg = run_config()
    cfg["data"]["train"] = "train.jsonl"  # relative: resolves against the YAML's folder
    path = write_yaml(tmp_path / "run.yaml", cfg)
    result = runner.invoke(app, ["train", str(path), "--set", "training.max_steps=2"])
    assert result.exit_code == 0, result.output
    run_dir = Path(cfg["output"]["dir"])
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    out = flat(result.output)
    assert "data: alpaca format, 24 rows read" in out
    assert "done: 2 steps" in out and "final metrics" in out
    # The run folder's config.yaml records the override and the resolved data path.
    saved = load_config(run_dir / "config.yaml")
    assert saved.training.max_steps == 2 and saved.data.train == str(tmp_path / "train.jsonl")

    # Same folder again: refused with the fix in the message, exit status 2, no traceback.
    again = runner.invoke(app, ["train", str(path), "--set", "training.max_steps=2"])
    assert again.exit_code == 2 and "already holds a run" in flat(again.output)
    assert again.exception is None or isinstance(again.exception, SystemExit)

    # --resume needs a checkpoint, and this run wrote none (save_every was unset).
    more = runner.invoke(app, ["train", str(path), "--resume", "latest"])
    assert more.exit_code == 2 and "no checkpoint" in flat(more.output)


def test_resume_latest_via_cli(run_config, tmp_path):
    path = write_yaml(tmp_path / "run.yaml", run_config(training={"max_steps": 3, "save_every": 1}))
    first = runner.invoke(app, ["train", str(path), "--set", "training.max_steps=2"])
    assert first.exit_code == 0, first.output
    # Same schedule length as the saved run is not required: here it is extended to 3 steps.
    more = runner.invoke(app, ["train", str(path), "--resume", "latest"])
    assert more.exit_code == 0, more.output
    assert "resumed from" in flat(more.output) and "at step 2" in flat(more.output)
    run_dir = Path(run_config()["output"]["dir"])
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_config_prints_the_resolved_config(run_config, tmp_path):
    path = write_yaml(tmp_path / "run.yaml", run_config())
    result = runner.invoke(app, ["config", str(path), "--set", "training.max_steps=7"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # Defaults filled in, overrides applied, every section present.
    for line in ("  max_steps: 7", "  scheduler: cosine", "  r: 4", "  keep_last: 2", "  tensorboard: false"):
        assert line in lines, line
    for section in ("model", "data", "method", "objective", "training", "eval", "tracking", "output"):
        assert f"{section}:" in lines


def test_config_output_is_valid_yaml_even_with_long_paths(run_config, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "data"
    deep.mkdir(parents=True)
    cfg = run_config()
    cfg["data"]["train"] = str(deep / "train.jsonl")
    path = write_yaml(tmp_path / "run.yaml", cfg)
    result = runner.invoke(app, ["config", str(path)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["data"]["train"] == cfg["data"]["train"]


@pytest.mark.parametrize("where, key, hint", [
    ("training", "learning_rat", "learning_rate"),
    ("method", "alpah", "alpha"),
    (None, "trainig", "training"),
])
def test_typo_exits_non_zero_with_suggestion(run_config, tmp_path, where, key, hint):
    cfg = run_config()
    if where is None:
        cfg[key] = cfg.pop("training")
    else:
        cfg[where][key] = 1
    path = write_yaml(tmp_path / "run.yaml", cfg)
    for command in ("config", "train"):
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert f"did you mean '{hint}'?" in flat(result.output)
    assert not Path(cfg["output"]["dir"]).exists()  # train failed before touching anything


def test_unknown_method_suggests_the_right_one(run_config, tmp_path):
    path = write_yaml(tmp_path / "run.yaml", run_config(method={"type": "lroa"}))
    result = runner.invoke(app, ["config", str(path)])
    assert result.exit_code == 2 and "did you mean 'lora'?" in flat(result.output)


def test_bad_override_and_missing_file(run_config, tmp_path):
    path = write_yaml(tmp_path / "run.yaml", run_config())
    result = runner.invoke(app, ["config", str(path), "--set", "training.max_steps"])
    assert result.exit_code == 2 and "expected section.key=value" in flat(result.output)
    result = runner.invoke(app, ["config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in flat(result.output)


def test_env_runs():
    import peft
    import torch
    import transformers

    from tunesmith.api import env_info

    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "tunesmith environment" in out
    assert torch.__version__ in out and transformers.__version__ in out
    assert "cpu" in out
    info = env_info()
    assert info["peft"] == peft.__version__  # read from metadata, without importing peft
    for package in ("peft", "accelerate", "bitsandbytes"):
        assert re.search(rf"{package}\W+{re.escape(info[package])}", out), package


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "config", "env", "data", "quickstart"):
        assert command in result.output


def test_eval_and_compare_are_commands_of_the_main_app():
    for command, flag in (("eval", "--adapter"), ("compare", "--baseline")):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert flag in result.output


def test_methods_refusal_reaches_the_cli(run_config, tmp_path):
    cfg = run_config(method={"type": "prompt_tuning"}, objective={"type": "masked_lm"})
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "method.type 'prompt_tuning' cannot train objective.type 'masked_lm'" in flat(result.output)
