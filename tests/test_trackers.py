"""Experiment trackers, each offline: what a run logs to MLflow (SQLite in the run folder), W&B
(offline mode) and trackio (local SQLite) is what metrics.jsonl holds, with the config and the
artifact's path; a resumed run continues the same tracker run; a missing extra is refused early."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tunesmith
from tunesmith.engine.tracking import read_metrics
from tunesmith.errors import ConfigError


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_mlflow_gets_params_metrics_and_the_artifact_and_a_resume_continues_its_run(run_config, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = run_config(training={"max_steps": 3, "save_every": 1, "log_every": 1, "scheduler": "constant"},
                     tracking={"mlflow": True})
    first = tunesmith.train(cfg, echo=lambda m: None)
    run_id = json.loads((first.run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{first.run_dir.resolve()}/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.params["training.learning_rate"] == "0.01" and run.data.params["method.type"] == "lora"
    assert run.data.tags["artifact_path"] == str(first.artifact_dir) and run.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert logged == pytest.approx(_losses(first.run_dir))

    cfg["training"]["max_steps"] = 4
    tunesmith.train(cfg, resume=True, echo=lambda m: None)
    assert json.loads((first.run_dir / "trackers.json").read_text())["mlflow"] == run_id
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert logged == pytest.approx(_losses(first.run_dir)) and max(logged) == 4


def _wandb_records(run_folder: Path):
    """The records of an offline run's .wandb file (wandb 0.31 has no Python reader for it): a
    7-byte header, then 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _has_exit_record(run_folder: Path) -> bool:
    from google.protobuf.message import DecodeError

    logs = list(run_folder.glob("run-*.wandb"))
    if not logs or logs[0].stat().st_size < 7:
        return False
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(run_folder))
    except (DecodeError, struct.error):  # a record still being written
        return False


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_holds_the_metrics_and_final_results(run_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = run_config(data={"split": {"validation_ratio": 0.25}},
                     training={"max_steps": 2, "log_every": 1}, tracking={"wandb": {"project": "tests"}})
    result = tunesmith.train(cfg, echo=lambda m: None)
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb's service process writes the transaction log after run.finish() returns (under load the
    # file held only its 7-byte header when train returned and 19 records 3 s later): wait for the
    # run's exit record, which is written last.
    deadline = time.monotonic() + 60
    while not _has_exit_record(runs[0]):
        assert time.monotonic() < deadline, "the offline run's .wandb file never got its exit record"
        time.sleep(0.2)
    history, summary = {}, {}
    for record in _wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = _items(record.history.item)
            if "loss" in row:
                history[row["_step"]] = row["loss"]
        elif kind == "summary":
            summary |= _items(record.summary.update)
    assert history == pytest.approx(_losses(result.run_dir))
    assert summary["final/eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    assert summary["artifact_path"] == str(result.artifact_dir)


def test_trackio_logs_locally_through_the_cli(run_config, tmp_path):
    pytest.importorskip("trackio")
    cfg = run_config(training={"max_steps": 2, "log_every": 1}, tracking={"trackio": {"project": "tests"}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    proc = subprocess.run([sys.executable, "-c", "from tunesmith.cli import app; app()", "train", str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_dir = Path(cfg["output"]["dir"])
    name = json.loads((run_dir / "trackers.json").read_text())["trackio"]
    read = subprocess.run([sys.executable, "-c", "import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
                           "print(json.dumps(SQLiteStorage.get_logs('tests', sys.argv[1]), default=str))", name],
                          capture_output=True, text=True, env=env, timeout=120)
    logs = json.loads(read.stdout.strip().splitlines()[-1])
    got = {r["step"]: r["loss"] for r in logs if "loss" in r}
    assert got == pytest.approx(_losses(run_dir))


def test_a_missing_tracker_package_is_refused_before_anything_loads(run_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.wandb: needs the wandb extra \(pip install 'tunesmith\[wandb\]'\)"):
        tunesmith.train(run_config(tracking={"wandb": True}), echo=lambda m: None)
