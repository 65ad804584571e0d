"""Where metrics go: metrics.jsonl always, TensorBoard when asked for."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..files import write_text_atomic


class MetricsLog:
    def __init__(self, path: Path, tensorboard_dir: Path | None = None, purge_step: int | None = None,
                 trackers=None):
        self.path = path
        self.trackers = trackers  # engine.trackers.Trackers: W&B, MLflow, trackio
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "tracking.tensorboard: needs the tensorboard extra "
                    "(pip install 'tunesmith[tensorboard]')"
                ) from exc
            # purge_step: events at or after this step, left by an interrupted run, are hidden.
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=purge_step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records the interrupted run wrote after its checkpoint.

        The end-of-run records ("final" evaluation, "forgetting") go too: the resumed run writes
        its own, and a run resumed from its last checkpoint would otherwise end with two. A last
        line cut short by a kill is dropped; the file is replaced atomically, so a kill during
        this rewrite leaves the old one.
        """
        if not self.path.is_file():
            return
        kept = []
        lines = self.path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1:
                    continue  # a record torn by a kill mid-write: it is rewritten by the resumed run
                from ..errors import TrainingError

                raise TrainingError(f"{self.path} line {i + 1} is not a JSON record ({exc}); the run's metrics "
                                    "were edited or damaged: repair or delete that line, then resume") from None
            if record.get("step", 0) <= step and not record.get("final") and not record.get("forgetting"):
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        from ..faults import armed, die

        line = json.dumps(record) + "\n"
        with self.path.open("a") as f:
            if armed("metrics"):  # a torn write: half a record on disk, then the kill
                f.write(line[: len(line) // 2])
                f.flush()
                die()
            f.write(line)
        if self.trackers is not None:
            self.trackers.log(record)
        if self.writer is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
