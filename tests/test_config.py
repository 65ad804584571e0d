"""Config validation: every mistake is caught before loading anything, with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.config import RunConfig, dump_config, load_config
from tunesmith.errors import ConfigError


def base(**sections) -> dict:
    cfg = {"model": {"name_or_path": "some/model"}, "data": {"train": "train.jsonl"}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def error_of(source, overrides=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(source, overrides)
    return str(err.value)


def write_yaml(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_and_fixture_config_are_valid(run_config):
    cfg = load_config(base())
    assert isinstance(cfg, RunConfig)
    assert (cfg.method.type, cfg.objective.type, cfg.training.epochs) == ("lora", "sft", 1.0)
    assert cfg.packing_enabled and not cfg.has_validation
    assert cfg.run_name == "model-lora-sft"
    assert load_config(run_config()).training.batch_size == 4
    # A RunConfig passes through untouched; with overrides it is re-validated.
    assert load_config(cfg) is cfg
    assert load_config(cfg, ["training.seed=7"]).training.seed == 7


@pytest.mark.parametrize(
    "section, key, suggestion",
    [("training", "learning_rte", "learning_rate"),
     ("data", "max_lenght", "max_length"),
     ("method", "targets_modules", "target_modules"),
     ("eval", "evry", "every")],
)
def test_unknown_key_suggests_the_right_one_with_its_path(section, key, suggestion):
    msg = error_of(base(**{section: {key: 1}}))
    assert f"{section}.{key}: unknown key — did you mean '{suggestion}'?" in msg
    assert "(allowed: " in msg and suggestion in msg.split("allowed:")[1]


def test_unknown_nested_and_top_level_keys():
    msg = error_of(base(data={"split": {"validaton_ratio": 0.1}}))
    assert "data.split.validaton_ratio: unknown key — did you mean 'validation_ratio'?" in msg
    cfg = base()
    cfg["trainig"] = {"epochs": 2}
    assert "trainig: unknown key — did you mean 'training'?" in error_of(cfg)


def test_all_errors_are_reported_at_once():
    msg = error_of(base(training={"learning_rte": 1, "batch_size": 0}, data={"formt": "x"}))
    assert "training.learning_rte" in msg and "training.batch_size" in msg and "data.formt" in msg


@pytest.mark.parametrize(
    "section, value, suggestion",
    [("method", "lorra", "lora"), ("method", "ful", "full"), ("objective", "sfft", "sft")],
)
def test_unknown_method_or_objective_type_suggests(section, value, suggestion):
    msg = error_of(base(**{section: {"type": value}}))
    assert f"{section}.type: unknown value '{value}' — did you mean '{suggestion}'?" in msg
    assert "(known: " in msg


def test_unknown_type_without_close_match_lists_known():
    msg = error_of(base(method={"type": "zzzzzz"}))
    assert "did you mean" not in msg
    from tunesmith.methods import METHODS

    assert f"method.type: unknown value 'zzzzzz' (known: {', '.join(sorted(METHODS))})" in msg


@pytest.mark.parametrize(
    "sections, path, fragment",
    [({"training": {"batch_size": "eight"}}, "training.batch_size", "'eight'"),
     ({"training": {"learning_rate": -1}}, "training.learning_rate", "greater than 0"),
     ({"data": {"max_length": 4}}, "data.max_length", "greater than 8"),
     ({"data": {"format": "csv"}}, "data.format", "'csv'"),
     ({"data": {"split": {"validation_ratio": 1.5}}}, "data.split.validation_ratio", "less than 1"),
     ({"training": {"adam_betas": [0.9]}}, "training.adam_betas", ""),
     ({"model": {"dtype": "int3"}}, "model.dtype", "'int3'")],
)
def test_wrong_types_and_ranges_name_the_path(sections, path, fragment):
    msg = error_of(base(**sections))
    line = next(line for line in msg.splitlines() if path in line)
    assert line.strip().startswith(f"{path}") and fragment in line


def test_missing_required_section():
    msg = error_of({"data": {"train": "x.jsonl"}})
    assert "model: Field required" in msg


def test_freeze_needs_layers_or_modules():
    msg = error_of(base(method={"type": "freeze"}))
    assert "'freeze' needs method.train_last_n_layers and/or method.trainable_modules" in msg
    assert load_config(base(method={"type": "freeze", "train_last_n_layers": 2})).method.type == "freeze"
    assert load_config(base(method={"type": "freeze", "trainable_modules": ["lm_head"]}))


def test_early_stopping_needs_eval_every_and_validation():
    msg = error_of(base(eval={"early_stopping_patience": 3}))
    assert "eval.early_stopping_patience needs eval.every" in msg
    # eval.every alone is not enough: there must be something to evaluate on.
    assert "validation split" in error_of(base(eval={"early_stopping_patience": 3, "every": 10}))
    ok = load_config(base(eval={"early_stopping_patience": 3, "every": 10},
                          data={"split": {"validation_ratio": 0.1}}))
    assert ok.has_validation


def test_fp16_full_finetuning_is_refused():
    msg = error_of(base(method={"type": "full"}, training={"precision": "fp16"}))
    assert "training.precision: fp16 with full fine-tuning" in msg


def test_overrides(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", base())
    cfg = load_config(path, ["training.epochs=2", "method.type=full", "data.split.validation_ratio=0.1",
                             "training.adam_betas=[0.8, 0.9]", "output.name=my-run"])
    assert cfg.training.epochs == 2.0
    assert cfg.method.type == "full"
    assert cfg.data.split.validation_ratio == 0.1
    assert cfg.training.adam_betas == (0.8, 0.9)
    assert cfg.run_name == "my-run"
    # Overrides are validated like the file itself.
    assert "training.learning_rte: unknown key" in error_of(path, ["training.learning_rte=1"])
    assert "training.epochs" in error_of(path, ["training.epochs=lots"])


def test_bad_override_syntax(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", base())
    assert "--set training.epochs: expected section.key=value" in error_of(path, ["training.epochs"])
    assert "'epochs' is not a section" in error_of(path, ["training.epochs=1", "training.epochs.x=2"])


def test_empty_yaml_section_means_defaults(tmp_path):
    # Every key of a section commented out leaves the section null.
    path = write_yaml(tmp_path / "run.yaml",
                      "model:\n  name_or_path: some/model\ndata:\n  train: t.jsonl\neval:\n  # every: 10\n")
    assert load_config(path).eval.every is None
    assert load_config(path, ["eval.every=5"]).eval.every == 5


def test_missing_file_invalid_yaml_and_non_mapping(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")
    bad = write_yaml(tmp_path / "bad.yaml", "model:\n  name_or_path: [unclosed\n")
    assert f"{bad}: not valid YAML" in error_of(bad)
    assert "expected a mapping of sections" in error_of(write_yaml(tmp_path / "list.yaml", "- a\n- b\n"))
    assert "model: Field required" in error_of(write_yaml(tmp_path / "empty.yaml", ""))


def test_relative_data_paths_resolve_against_the_yaml(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.jsonl").write_text("{}\n")
    (folder / "val.jsonl").write_text("{}\n")
    path = write_yaml(folder / "run.yaml", base(data={
        "train": "train.jsonl", "split": {"validation_file": "val.jsonl"}}))
    monkeypatch.chdir(tmp_path)  # the data is not next to the working directory
    cfg = load_config(path)
    assert cfg.data.train == str(folder / "train.jsonl")
    assert cfg.data.split.validation_file == str(folder / "val.jsonl")
    # Lists of files, and hub ids (which exist nowhere locally) are left as they are.
    cfg = load_config(path, ["data.train=[train.jsonl, owner/dataset]"])
    assert cfg.data.train == [str(folder / "train.jsonl"), "owner/dataset"]


def test_relative_path_existing_in_working_directory_wins(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.jsonl").write_text("{}\n")
    (tmp_path / "train.jsonl").write_text("{}\n")
    path = write_yaml(folder / "run.yaml", base(data={"train": "train.jsonl"}))
    monkeypatch.chdir(tmp_path)
    assert load_config(path).data.train == "train.jsonl"


def test_dump_round_trips(tmp_path):
    cfg = load_config(base(training={"epochs": 3}, method={"type": "full"}))
    again = load_config(write_yaml(tmp_path / "dumped.yaml", dump_config(cfg)))
    assert again == cfg


def test_cli_config_command_applies_set(tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    path = write_yaml(tmp_path / "run.yaml", base())
    result = CliRunner().invoke(app, ["config", str(path), "--set", "training.epochs=3"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["training"]["epochs"] == 3.0
    result = CliRunner().invoke(app, ["config", str(path), "--set", "training.learning_rte=1"])
    assert result.exit_code == 2
    assert "did you mean 'learning_rate'" in " ".join(result.output.split())  # rich wraps lines


def test_validation_imports_no_torch(tmp_path):
    """Every method and objective section validates (and refuses) without loading torch."""
    import subprocess
    import sys

    code = """
import sys
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.method_config import SECTIONS as M
from tunesmith.objective_config import SECTIONS as O
ok = refused = 0
for m in M:
    for o in O:
        objective = {"type": o, **({"teacher": "t"} if o == "distill" else {}),
                     **({"rewards": [{"function": "correctness"}]} if o in ("grpo", "rloo", "ppo") else {})}
        method = {"type": m, **({"train_last_n_layers": 1} if m == "freeze" else {})}
        try:
            load_config({"model": {"name_or_path": "x"}, "data": {"train": "y.jsonl"}, "method": method,
                         "objective": objective, "training": {"batch_size": 4}})
            ok += 1
        except ConfigError:
            refused += 1
print(ok, refused, sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "transformers", "peft")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    from tunesmith.methods.matrix import supported_cells

    assert int(out[0]) == len(supported_cells()) and int(out[1]) > 0
    assert out[2:] == ["[]"]


def test_sections_match_the_registries():
    from tunesmith.method_config import SECTIONS as M
    from tunesmith.methods import METHODS
    from tunesmith.objective_config import SECTIONS as O
    from tunesmith.objectives import OBJECTIVES

    assert set(M) == set(METHODS) and set(O) == set(OBJECTIVES)


def test_a_key_of_another_method_names_the_methods_it_belongs_to():
    msg = error_of(base(method={"type": "full", "r": 8}))
    assert ("method.r: unknown key (allowed: type for method.type full); it is a setting of the LoRA family "
            "(method.type lora, dora, rslora, lora_fa, qlora)") in msg
    msg = error_of(base(objective={"type": "sft", "beta": 0.1}))
    assert "objective.beta: unknown key (allowed: type for objective.type sft)" in msg
    assert "it is a setting of objective.type dpo, kto, orpo, simpo, distill" in msg
