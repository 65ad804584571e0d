"""The bad-input catalog: each case is a folder of user files, a command line, what the user
must read, and why. `tests/test_error_catalog.py` runs every case through the CLI;
`python tests/error_cases.py` rewrites docs/errors.md with the messages the CLI prints now."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

QA = [("what is the capital of france", "paris"), ("what color is the sky", "blue"),
      ("is this movie good", "positive"), ("is this movie bad", "negative")]
ALPACA = "".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA * 3)
PAIRS = "".join(json.dumps({"prompt": q, "chosen": a, "rejected": "no idea"}) + "\n" for q, a in QA * 3)


@dataclass
class Case:
    name: str  # what is wrong, as the docs table says it
    expect: str  # the key part of the message (must appear in the CLI's output)
    files: dict[str, str | bytes] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # merged into the base config (None deletes a key)
    args: list[str] | None = None  # default: train run.yaml
    prepare: Callable[[Path, dict], None] | None = None  # e.g. an earlier run in the folder
    category: str = "data"
    may_add: str | None = None  # files under this folder may appear (a run that started, then failed)


def base_config(model_dir: str) -> dict:
    return {"model": {"name_or_path": model_dir},
            "data": {"train": "train.jsonl", "max_length": 64},
            "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "progress": False,
                         "precision": "fp32", "save_every": 1, "log_every": 1},
            "output": {"dir": "out"}, "eval": {"forgetting": False}}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def lm_head_only_checkpoint(out: Path):
    """A tied tiny Llama as safetensors' save_model writes it: the shared tensor under lm_head.weight only."""
    from conftest import build_llama, build_tokenizer
    from safetensors.torch import save_model

    model = build_llama(out, len(build_tokenizer(out)))
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    return model


def _train_first(folder: Path, cfg: dict) -> None:
    """The run the case's command meets: trained from run.yaml in the case's folder, as the CLI would."""
    import os

    import tunesmith

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        tunesmith.train("run.yaml", echo=lambda m: None)
    finally:
        os.chdir(cwd)


def _corrupt_checkpoint(folder: Path, cfg: dict) -> None:
    _train_first(folder, cfg)
    latest = sorted((folder / "out" / "checkpoints").iterdir())[-1]
    (latest / "trainable.safetensors").write_bytes(b"not safetensors at all")


def _corrupt_metrics(folder: Path, cfg: dict) -> None:
    _train_first(folder, cfg)
    metrics = folder / "out" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")


CASES: list[Case] = [
    # ---- data files
    Case("JSONL row that is not JSON", "train.jsonl line 2",
         files={"train.jsonl": ALPACA.replace('{"instruction": "what color', '{instruction: what color', 1)}),
    Case("JSON file cut short", "train.json",
         files={"train.json": '[{"instruction": "a", "output": "b"}, {"instr'}, config={"data": {"train": "train.json"}}),
    Case("empty data file", "train.jsonl", files={"train.jsonl": ""}),
    Case("data file of blank lines", "train.jsonl", files={"train.jsonl": "\n\n  \n"}),
    Case("data file missing", "not found", config={"data": {"train": "missing.jsonl"}}),
    Case("data path is a folder", "is a folder; name a data file", files={"data/x.txt": "x"}, config={"data": {"train": "data"}}),
    Case("unsupported file type", ".xlsx", files={"train.xlsx": "PK\x03\x04"}, config={"data": {"train": "train.xlsx"}}),
    Case("CSV row with more fields than the header", "row 2: 4 fields, but the header has 2",
         files={"train.csv": "instruction,output\nwhat is the capital of france,paris\nwhat color,is,the,sky\n"},
         config={"data": {"train": "train.csv"}}),
    Case("CSV with a header only", "train.csv", files={"train.csv": "instruction,output\n"},
         config={"data": {"train": "train.csv"}}),
    Case("columns of no known format", "columns",
         files={"train.jsonl": "".join(json.dumps({"question": q, "reply": a}) + "\n" for q, a in QA)}),
    Case("a required column missing in some rows", "train.jsonl",
         files={"train.jsonl": ALPACA + json.dumps({"instruction": "no output here"}) + "\n"}),
    Case("a field of the wrong type", "field 'output': expected a string",
         files={"train.jsonl": ALPACA + json.dumps({"instruction": "q", "input": "", "output": ["a", "b"]}) + "\n"}),
    Case("two formats mixed in one file", "train.jsonl",
         files={"train.jsonl": ALPACA + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"}),
    Case("chat message with an unknown role", "role",
         files={"train.jsonl": "".join(json.dumps({"messages": [{"role": "wizard", "content": q},
                                                                {"role": "assistant", "content": a}]}) + "\n"
                                       for q, a in QA * 3)}),
    Case("chat message without content", "content",
         files={"train.jsonl": "".join(json.dumps({"messages": [{"role": "user"},
                                                                {"role": "assistant", "content": a}]}) + "\n"
                                       for _, a in QA * 3)}),
    Case("column mapping names a column the file lacks", "prompt_text",
         files={"train.jsonl": ALPACA}, config={"data": {"columns": {"instruction": "prompt_text"}}}),
    Case("bytes that are not UTF-8", "not UTF-8 text", files={"train.jsonl": b'{"instruction": "\xff\xfe", "output": "x"}\n'}),
    Case("every row longer than max_length with truncation: drop", "dropped",
         files={"train.jsonl": ALPACA}, config={"data": {"max_length": 9, "truncation": "drop"}}),
    Case("preference rows without a rejected answer", "columns chosen, rejected",
         files={"train.jsonl": "".join(json.dumps({"prompt": q, "chosen": a}) + "\n" for q, a in QA * 3)},
         config={"objective": {"type": "dpo"}}),
    Case("classification set with a single class", "only ['positive'] ('positive': 12 rows)",
         files={"train.jsonl": "".join(json.dumps({"text": q, "label": "positive"}) + "\n" for q, _ in QA * 3)},
         config={"objective": {"type": "classification"}}),
    Case("validation labels the training set never saw", "validation labels the training data never has: 'neutral' (1 row)",
         files={"train.jsonl": "".join(json.dumps({"text": q, "label": "positive" if i % 2 else "negative"}) + "\n"
                                       for i, (q, _) in enumerate(QA * 3)),
                "val.jsonl": json.dumps({"text": "odd one", "label": "neutral"}) + "\n"},
         config={"objective": {"type": "classification"}, "data": {"split": {"validation_file": "val.jsonl"}}}),
    # ---- config
    Case("config file missing", "not found", args=["train", "nowhere.yaml"], category="config"),
    Case("config that is not YAML", "run.yaml", files={"run.yaml": "model: [unclosed\n  data: x"},
         category="config"),
    Case("config that is a list", "mapping", files={"run.yaml": "- model\n- data\n"}, category="config"),
    Case("unknown top-level section", "trainer", config={"trainer": {"epochs": 1}}, category="config"),
    Case("misspelled key", "learnin_rate", config={"training": {"learnin_rate": 0.1}}, category="config"),
    Case("value of the wrong type", "training.learning_rate", config={"training": {"learning_rate": "fast"}},
         category="config"),
    Case("value out of range", "training.batch_size", config={"training": {"batch_size": 0}}, category="config"),
    Case("unknown method", "method", config={"method": {"type": "lorax"}}, category="config"),
    Case("unknown objective", "objective", config={"objective": {"type": "sftt"}}, category="config"),
    Case("a method key another method owns", "method", config={"method": {"type": "full", "r": 8}},
         category="config"),
    Case("fp16 without a GPU", "fp16 needs a CUDA GPU", config={"training": {"precision": "fp16"}},
         category="config"),
    Case("int8 precision with a method that has no LoRA layers", "int8 works with lora, rslora and lora_fa",
         config={"method": {"type": "full", "r": None, "alpha": None, "dropout": None},
                 "training": {"precision": "int8"}}, category="combination"),
    Case("--set without a value", "--set training.max_steps: expected section.key=value", args=["train", "run.yaml", "--set", "training.max_steps"],
         category="config"),
    Case("--set of an unknown key", "trainin", args=["train", "run.yaml", "--set", "trainin.max_steps=3"],
         category="config"),
    Case("LoRA target modules that match nothing", "target_modules",
         config={"method": {"target_modules": ["no_such_proj"]}}, category="combination"),
    Case("prompt tuning with a classification head", "prompt", config={
        "method": {"type": "prompt_tuning", "r": None, "alpha": None, "dropout": None, "num_virtual_tokens": 4},
        "objective": {"type": "classification"}},
         files={"train.jsonl": "".join(json.dumps({"text": q, "label": a}) + "\n" for q, a in QA * 3)},
         category="combination"),
    Case("a misspelled objective key", "did you mean 'precompute_ref_logps'", config={
        "objective": {"type": "dpo", "precompute_reference": "maybe"}},
         files={"train.jsonl": "".join(json.dumps({"prompt": q, "chosen": a, "rejected": "no"}) + "\n"
                                       for q, a in QA * 3)}, category="combination"),
    # ---- multi-task runs
    Case("a task name used twice", "the task name 'qa' is used twice", config={"data": None, "tasks": [
        {"name": "qa", "data": {"train": "train.jsonl"}}, {"name": "qa", "data": {"train": "train.jsonl"}}]},
         category="multitask"),
    Case("a task whose objective needs a second model", "objective.type 'dpo' cannot be a task", config={
        "data": None, "tasks": [{"name": "qa", "data": {"train": "train.jsonl"}},
                                {"name": "prefs", "data": {"train": "train.jsonl"}, "objective": {"type": "dpo"}}]},
         category="multitask"),
    Case("tasks whose objectives need different model families", "cannot share one model", config={
        "data": None, "tasks": [{"name": "qa", "data": {"train": "train.jsonl"}},
                                {"name": "mlm", "data": {"train": "train.jsonl"}, "objective": {"type": "masked_lm"}}]},
         category="multitask"),
    Case("sampling weights that do not match the tasks", "weights needs a weight on every task; missing on b",
         config={"data": None, "multitask": {"sampling": "weights"}, "tasks": [
             {"name": "a", "data": {"train": "train.jsonl"}, "weight": 2},
             {"name": "b", "data": {"train": "train.jsonl"}}]}, category="multitask"),
    Case("per-task adapters with a method that adds none", "which method.type full cannot: it adds no adapter",
         config={"data": None, "method": {"type": "full", "r": None, "alpha": None, "dropout": None},
                 "multitask": {"shared": False}, "tasks": [
             {"name": "a", "data": {"train": "train.jsonl"}}, {"name": "b", "data": {"train": "train.jsonl"}}]},
         category="multitask"),
    Case("a task's data file missing", "tasks[1] (b): data file not found: missing.jsonl", config={
        "data": None, "tasks": [{"name": "a", "data": {"train": "train.jsonl"}},
                                {"name": "b", "data": {"train": "missing.jsonl"}}]}, category="multitask"),
    Case("the Arrow store for an objective it cannot stream", "data.store: arrow streams rows for objective.type",
         config={"data": {"store": "arrow"}, "objective": {"type": "classification"}}, category="data"),
    # ---- models and paths
    Case("model folder missing", "not found", config={"model": {"name_or_path": "./no-model"}}, category="model"),
    Case("a .gguf file that is not GGUF", "is not a GGUF file", files={"not-really.gguf": "hello, I am text"},
         config={"model": {"name_or_path": "not-really.gguf"}}, category="model"),
    Case("model folder without config.json", "has no config.json", files={"empty-model/readme.txt": "nothing"},
         config={"model": {"name_or_path": "./empty-model"}}, category="model"),
    Case("distillation teacher folder missing", "objective.teacher: folder not found", config={
        "objective": {"type": "distill", "teacher": "./no-teacher"}}, category="model"),
    Case("PPO reward model that is no model folder", "objective.reward_model: ", files={
        "rm/readme.txt": "nothing", "train.jsonl": "".join(json.dumps({"prompt": q}) + "\n" for q, _ in QA * 3)},
         config={"objective": {"type": "ppo", "reward_model": "./rm"}}, category="model"),
    Case("a tied checkpoint saved with only lm_head.weight, for a reward model",
         "has no input embeddings for AutoModelForSequenceClassification", files={"train.jsonl": PAIRS},
         config={"model": {"name_or_path": "./lm-head-only"}, "objective": {"type": "reward"}},
         prepare=lambda folder, cfg: lm_head_only_checkpoint(folder / "lm-head-only"), category="model"),
    Case("model.head_from names a folder without a trained probe", "holds no trained artifact",
         files={"train.jsonl": PAIRS, "probe/readme.txt": "nothing"},
         config={"model": {"head_from": "./probe"}, "objective": {"type": "reward"}}, category="model"),
    Case("export of a run that does not exist", "not found", args=["export", "./no-run"], category="model"),
    Case("serve with a malformed --adapter", "is not NAME=PATH", args=["serve", "./no-run", "--adapter", "x"],
         category="model"),
    Case("serve with an adapter path that does not exist", "--adapter a: not found",
         args=["serve", "./no-run", "--adapter", "a=./missing-adapter"], category="model"),
    Case("packing forced on for classification", "objective.type classification does not pack rows", config={
        "objective": {"type": "classification"}, "data": {"packing": True}},
         files={"train.jsonl": "".join(json.dumps({"text": q, "label": a}) + "\n" for q, a in QA * 3)},
         category="combination"),
    # ---- runs and checkpoints
    Case("output folder that holds a run", "already holds a run", prepare=_train_first, category="run"),
    Case("--resume with no checkpoint", "no checkpoint", args=["train", "run.yaml", "--resume", "latest"],
         category="run"),
    Case("--resume with a changed config", "the config differs from the interrupted run's",
         prepare=_train_first, args=["train", "run.yaml", "--resume", "latest", "--set", "training.learning_rate=0.5"],
         category="run"),
    Case("corrupt checkpoint", "is damaged", prepare=_corrupt_checkpoint,
         args=["train", "run.yaml", "--resume", "latest"], category="run"),
    Case("corrupt metrics.jsonl in a run to resume", "metrics.jsonl line 2 is not a JSON record",
         prepare=_corrupt_metrics,
         args=["train", "run.yaml", "--resume", "latest"], category="run"),
    Case("loss or gradients become NaN/inf", "became", config={
        "training": {"learning_rate": 1e30, "max_grad_norm": None, "scheduler": "constant"},
        "method": {"type": "full", "r": None, "alpha": None, "dropout": None}}, category="run", may_add="out/"),
    Case("output folder under a file", "out-file is a file", files={"out-file": "a file, not a folder"},
         config={"output": {"dir": "out-file/run"}}, category="run"),
    Case("plan for a GPU it does not know", "--gpu: unknown card 'A100'", args=["plan", "run.yaml", "--gpu", "A100"],
         category="plan"),
    Case("sweep over a key the method does not have", "space.method.rank = 2 is not a valid run setting",
         files={"sweep.yaml": "base: run.yaml\nspace:\n  method.rank: [2, 4]\npruner: none\n"},
         config={"data": {"split": {"validation_ratio": 0.25}}}, args=["sweep", "sweep.yaml"], category="sweep"),
    Case("sweep with pruning but no evaluations during training", "the base config has no eval.every",
         files={"sweep.yaml": "base: run.yaml\nspace:\n  training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n"},
         config={"data": {"split": {"validation_ratio": 0.25}}}, args=["sweep", "sweep.yaml"], category="sweep"),
    Case("grid sweep over a continuous range", "sampler grid needs a list or a range with step",
         files={"sweep.yaml": "base: run.yaml\nsampler: grid\nspace:\n  training.learning_rate: {low: 1.0e-4, high: 1.0e-2}\n"},
         args=["sweep", "sweep.yaml"], category="sweep"),
]


def render_docs(rows: list[tuple[Case, str]]) -> str:
    lines = ["# Errors: what each bad input gets", "",
             "Every row is a test (`tests/test_error_catalog.py`): the CLI prints this message (one line, no",
             "traceback), exits with status 2, and leaves every file the user had as it was. The messages",
             "below are the CLI's own output, regenerated with `python tests/error_cases.py`; the test fails",
             "when one of them changes without this page.", "",
             "| # | kind | bad input | command | message |", "|---|---|---|---|---|"]
    for i, (case, message) in enumerate(rows, 1):
        lines.append(f"| {i} " + render_row(case, message))
    return "\n".join(lines) + "\n"


def render_row(case: Case, message: str) -> str:
    """A table row after its number (the test looks rows up by this text)."""
    command = " ".join(case.args or ["train", "run.yaml"])
    shown = message.replace("|", "\\|")
    return f"| {case.category} | {case.name} | `tunesmith {command}` | {shown} |"


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_error_catalog import run_case_standalone

    rows = [(c, run_case_standalone(c)) for c in CASES]
    (Path(__file__).resolve().parents[1] / "docs" / "errors.md").write_text(render_docs(rows))
    print(f"wrote docs/errors.md ({len(rows)} rows)")
