"""Experiment trackers beside metrics.jsonl: Weights & Biases (offline by default), MLflow (a
SQLite store in the run folder by default) and trackio (local SQLite). Each is an optional
extra, imported only when its section is in `tracking:`. A tracker gets the run's config at
start, every metrics record (numbers only, at its step), and at the end the final metrics and
the artifact's path. A resumed run continues the same tracker run (ids kept in
`trackers.json` in the run folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import flat_keys
from ..errors import ConfigError
from ..files import write_text_atomic

IDS = "trackers.json"


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _needs(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"tracking.{extra}: needs the {extra} extra (pip install 'tunesmith[{extra}]')") from exc


class WandbTracker:
    def __init__(self, section, run_dir: Path, name: str, config: dict, run_id: str | None):
        wandb = _needs("wandb", "wandb")
        self.run = wandb.init(project=section.project, entity=section.entity, name=section.name or name,
                              tags=section.tags or None, mode=section.mode, dir=str(run_dir), config=config,
                              id=run_id, resume="allow" if run_id else None)
        self.id = self.run.id

    def log(self, record: dict, step: int) -> None:
        self.run.log(_numbers(record), step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.run.finish()


class MlflowTracker:
    def __init__(self, section, run_dir: Path, name: str, config: dict, run_id: str | None):
        import logging

        _needs("mlflow", "mlflow")
        from mlflow.entities import Param

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-migration chatter in the run log
        from mlflow.tracking import MlflowClient

        # MLflow 3.13+ refuses its file store; a SQLite file in the run folder needs no server.
        self.client = MlflowClient(tracking_uri=section.tracking_uri or f"sqlite:///{run_dir.resolve()}/mlflow.db")
        if run_id is None:
            experiment = self.client.get_experiment_by_name(section.experiment)
            exp_id = experiment.experiment_id if experiment else self.client.create_experiment(section.experiment)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            params = [Param(k[:250], str(v)[:6000]) for k, v in flat_keys(config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.id = run_id

    def log(self, record: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _numbers(record).items()]
        if metrics:
            self.client.log_batch(self.id, metrics=metrics)

    def finish(self, summary: dict) -> None:
        for k, v in summary.items():
            if isinstance(v, str):
                self.client.set_tag(self.id, k, v)
        self.client.set_terminated(self.id)


class TrackioTracker:
    def __init__(self, section, run_dir: Path, name: str, config: dict, run_id: str | None):
        self.trackio = _needs("trackio", "trackio")
        self.run = self.trackio.init(project=section.project, name=run_id or name, config=config,
                                     resume="allow" if run_id else "never")
        self.id = run_id or name

    def log(self, record: dict, step: int) -> None:
        self.trackio.log(_numbers(record), step=step)

    def finish(self, summary: dict) -> None:
        self.trackio.finish()


KINDS = {"wandb": WandbTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}
MODULES = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_available(cfg) -> None:
    """Refuse a tracker whose package is missing before anything loads."""
    import importlib.util

    for kind, module in MODULES.items():
        if getattr(cfg.tracking, kind) is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking.{kind}: needs the {kind} extra (pip install 'tunesmith[{kind}]')")


class Trackers:
    """The trackers a run's `tracking:` section asks for (none: every call does nothing)."""

    def __init__(self, items: dict[str, object], run_dir: Path | None = None):
        self.items, self.run_dir = items, run_dir

    @classmethod
    def open(cls, cfg, run_dir: Path, name: str, config: dict, resuming: bool) -> "Trackers":
        ids_file = run_dir / IDS
        ids = json.loads(ids_file.read_text()) if resuming and ids_file.is_file() else {}
        items = {}
        for kind, make in KINDS.items():
            section = getattr(cfg.tracking, kind)
            if section is not None:
                items[kind] = make(section, run_dir, name, config, ids.get(kind))
        if items:
            write_text_atomic(ids_file, json.dumps({k: t.id for k, t in items.items()}, indent=1))
        return cls(items, run_dir)

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for tracker in self.items.values():
            tracker.log(record, step)

    def finish(self, summary: dict) -> None:
        for tracker in self.items.values():
            tracker.finish(summary)
        self.items = {}
