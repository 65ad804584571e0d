"""Where metrics go: metrics.jsonl always, TensorBoard when asked for."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


class MetricsLog:
    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "tracking.tensorboard: needs the tensorboard extra "
                    "(pip install 'tunesmith[tensorboard]')"
                ) from exc
            self.writer = SummaryWriter(str(tensorboard_dir))

    def truncate_after(self, step: int) -> None:
        """On resume, drop records the interrupted run wrote after its checkpoint."""
        if not self.path.is_file():
            return
        kept = [
            line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
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
