"""Seeded byte and structure mutations of valid JSONL, CSV and YAML inputs, through the CLI
(`data inspect`, `config`, and `train` for a few): the answer is success or a tunesmith error
(exit 2, "error: ..."), never a traceback."""

from __future__ import annotations

import copy
import json
import random

import pytest
import yaml
from typer.testing import CliRunner

from error_cases import ALPACA, base_config

from tunesmith.cli import app

JUNK = [None, 0, -1, 3.5, True, "", "x" * 300, [], {}, [1, "a"], {"k": [None]}, "\u0000", "é\ud7ff"]
CSV = "instruction,input,output\n" + "".join(
    f"{json.loads(line)['instruction']},,{json.loads(line)['output']}\n" for line in ALPACA.splitlines())


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(["flip", "delete", "insert", "truncate", "duplicate"])
        if not data:
            break
        at = rng.randrange(len(data))
        if op == "flip":
            data[at] = rng.randrange(256)
        elif op == "delete":
            del data[at:at + rng.randint(1, 20)]
        elif op == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at:at + rng.randint(1, 40)]
    return bytes(data)


def mutate_structure(obj, rng: random.Random):
    """Replace, drop or retype a random value somewhere in a JSON-like structure."""
    obj = copy.deepcopy(obj)
    containers = [obj]
    target = obj
    for _ in range(rng.randint(1, 3)):
        if isinstance(target, dict) and target:
            key = rng.choice(list(target))
            if isinstance(target[key], (dict, list)) and rng.random() < 0.6:
                target = target[key]
                containers.append(target)
                continue
            choice = rng.random()
            if choice < 0.3:
                del target[key]
            elif choice < 0.4:
                target[key + "_x"] = target.pop(key)  # a renamed key
            else:
                target[key] = rng.choice(JUNK)
            break
        if isinstance(target, list) and target:
            i = rng.randrange(len(target))
            if isinstance(target[i], (dict, list)) and rng.random() < 0.6:
                target = target[i]
                continue
            target[i] = rng.choice(JUNK)
            break
    return obj


def _assert_clean(result, what: str):
    text = " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit), (what, repr(result.exception), text)
    assert "Traceback" not in text, (what, text)
    assert result.exit_code in (0, 2), (what, result.exit_code, text[-500:])
    if result.exit_code == 2:
        assert "error: " in text, (what, text)


def test_mutated_data_files_get_an_answer_or_a_tunesmith_error(tmp_path):
    rng = random.Random(7)
    runner = CliRunner()
    rows = [json.loads(line) for line in ALPACA.splitlines()]
    for i in range(60):
        kind = rng.choice(["jsonl-bytes", "jsonl-structure", "csv-bytes", "json-structure"])
        if kind == "jsonl-bytes":
            path, data = tmp_path / f"{i}.jsonl", mutate_bytes(ALPACA.encode(), rng)
        elif kind == "jsonl-structure":
            mutated = [mutate_structure(r, rng) if rng.random() < 0.3 else r for r in rows]
            path, data = tmp_path / f"{i}.jsonl", "".join(json.dumps(r) + "\n" for r in mutated).encode()
        elif kind == "json-structure":
            path, data = tmp_path / f"{i}.json", json.dumps(mutate_structure(rows, rng)).encode()
        else:
            path, data = tmp_path / f"{i}.csv", mutate_bytes(CSV.encode(), rng)
        path.write_bytes(data)
        _assert_clean(runner.invoke(app, ["data", "inspect", str(path)], terminal_width=300), f"{kind} #{i}")


def test_mutated_configs_get_an_answer_or_a_tunesmith_error(tmp_path, tiny_model_dir):
    rng = random.Random(11)
    runner = CliRunner()
    (tmp_path / "train.jsonl").write_text(ALPACA)
    base = base_config(str(tiny_model_dir))
    for i in range(60):
        path = tmp_path / f"{i}.yaml"
        if rng.random() < 0.5:
            path.write_text(yaml.safe_dump(mutate_structure(base, rng)))
        else:
            path.write_bytes(mutate_bytes(yaml.safe_dump(base).encode(), rng))
        _assert_clean(runner.invoke(app, ["config", str(path)], terminal_width=300), f"config #{i}")


@pytest.mark.parametrize("seed", range(4))
def test_training_on_mutated_data_never_tracebacks(tmp_path, tiny_model_dir, seed):
    rng = random.Random(100 + seed)
    rows = [json.loads(line) for line in ALPACA.splitlines()]
    if seed % 2:
        data = mutate_bytes(ALPACA.encode(), rng)
    else:
        data = "".join(json.dumps(mutate_structure(r, rng) if rng.random() < 0.4 else r) + "\n" for r in rows).encode()
    (tmp_path / "train.jsonl").write_bytes(data)
    cfg = base_config(str(tiny_model_dir))
    cfg["training"]["max_steps"] = 1
    cfg["output"]["dir"] = str(tmp_path / "out")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    _assert_clean(CliRunner().invoke(app, ["train", str(tmp_path / "run.yaml")], terminal_width=300), f"seed {seed}")
