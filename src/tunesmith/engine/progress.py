"""Training progress: a rich bar on a terminal, plain text lines anywhere else.

A bar redrawn in place turns into control characters and one huge line in a log file (CI,
nohup, `> train.log`), so when stdout is not a terminal each logged step prints one line,
flushed, e.g. `step 20/100  loss 1.2345  lr 2.00e-04  412 tok/s  ETA 3m12s`.
"""

from __future__ import annotations

import sys
from time import monotonic


def format_eta(seconds: float) -> str:
    """3725 -> '1h02m05s', 192 -> '3m12s', 7 -> '7s'."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class Progress:
    """Progress of the training loop; silent when disabled.

    `update` is called with each logged record (every `training.log_every` steps and at the
    last step), `advance` after every other step, `note` for an evaluation line, `close` at
    the end. On a terminal: a rich progress bar with loss, lr, tokens/s and ETA. Otherwise:
    one line per `update`, the ETA from the wall time per step since this session started
    (`start` is the step it resumed from).
    """

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        self.text = False
        if not enabled:
            return
        if not sys.stdout.isatty():
            self.text = True
            self.start_step, self.started = start, monotonic()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def eta(self, step: int, total: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        return format_eta((monotonic() - self.started) / done * max(total - step, 0))

    def update(self, record: dict, total: int) -> None:
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
        if self.text:
            step = record["step"]
            print(f"step {step}/{total}  {info}  ETA {self.eta(step, total)}", flush=True)
        elif self.bar is not None:
            self.bar.update(self.task, completed=record["step"], info=info)

    def advance(self, step: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def note(self, text: str) -> None:
        if self.text:
            print(text, flush=True)
        elif self.bar is not None:
            self.bar.console.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
