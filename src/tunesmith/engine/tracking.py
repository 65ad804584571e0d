"""Where metrics go: metrics.jsonl always, TensorBoard when asked for."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


class MetricsLog:
    def __init__(self, path: Path, tensorboard_dir: Path | None = None, purge_step: int | None = None):
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
            # purge_step: events at or after this step, left by an interrupted run, are hidden.
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=purge_step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records the interrupted run wrote after its checkpoint.

        The end-of-run evaluation ("final") goes too: the resumed run writes its own, and a
        run resumed from its last checkpoint would otherwise end with two.
        """
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("step", 0) <= step and not record.get("final"):
                kept.append(line)
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
