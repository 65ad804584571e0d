"""Training progress off a terminal: one flushed text line per logged step, with an honest ETA."""

from __future__ import annotations

import io
import re
import sys

import pytest

import tunesmith
from tunesmith.engine import progress as progress_mod
from tunesmith.engine.progress import Progress, format_eta

LINE = re.compile(r"step (\d+)/(\d+)  loss \d+\.\d{4}  lr \d\.\d\de[+-]\d\d  \d+ tok/s  ETA (\d+h)?(\d+m)?\d+s")


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_mod, "monotonic", fake)
    return fake


def record(step: int, loss: float = 1.23454, lr: float = 2e-4, tps: float = 412.4) -> dict:
    return {"step": step, "epoch": 0.5, "loss": loss, "lr": lr, "tokens_per_s": tps}


def test_text_mode_prints_one_line_per_update_with_the_eta(clock, capsys):
    assert not sys.stdout.isatty()  # capsys: like CI, nohup or a log file
    p = Progress(True, 100, 0)
    for step in range(1, 20):
        clock.now += 2.4
        p.advance(step, 100)
    clock.now += 2.4
    p.update(record(20), 100)
    # 48 s for 20 steps: 2.4 s a step, 80 steps to go.
    assert capsys.readouterr().out == "step 20/100  loss 1.2345  lr 2.00e-04  412 tok/s  ETA 3m12s\n"

    clock.now += 24.0  # the next 10 steps ran slower: 72 s / 30 steps, 70 steps to go
    p.update(record(30, loss=0.5, lr=1.5e-5, tps=1000.6), 100)
    p.close()
    assert capsys.readouterr().out == "step 30/100  loss 0.5000  lr 1.50e-05  1001 tok/s  ETA 2m48s\n"


def test_a_resumed_run_times_only_its_own_steps(clock, capsys):
    p = Progress(True, 1000, 500)
    clock.now += 30.0
    p.update(record(510), 1000)  # 3 s a step since the resume, 490 to go
    assert capsys.readouterr().out.endswith("  ETA 24m30s\n")
    clock.now += 3.0 * 490
    p.update(record(1000), 1000)
    assert capsys.readouterr().out == "step 1000/1000  loss 1.2345  lr 2.00e-04  412 tok/s  ETA 0s\n"


def test_last_step_eta_is_zero_and_notes_are_lines(clock, capsys):
    p = Progress(True, 4, 0)
    clock.now += 1.0
    p.advance(1, 4)
    assert capsys.readouterr().out == ""  # steps between logged ones print nothing
    p.note("step 2: eval_loss 1.5000")
    clock.now += 3.0
    p.update(record(4), 4)
    p.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["step 2: eval_loss 1.5000", "step 4/4  loss 1.2345  lr 2.00e-04  412 tok/s  ETA 0s"]


def test_each_line_is_flushed(clock, monkeypatch):
    class Log(io.StringIO):
        flushed: list[str] = []

        def flush(self):
            self.flushed.append(self.getvalue())

    log = Log()
    monkeypatch.setattr(sys, "stdout", log)
    p = Progress(True, 10, 0)
    clock.now += 5.0
    p.update(record(5), 10)
    p.note("a note")
    # nohup / a log file: each line is out as soon as it is printed, not at exit.
    assert log.flushed[0].endswith("ETA 5s\n") and log.flushed[-1].endswith("a note\n")


def test_disabled_prints_nothing(clock, capsys):
    p = Progress(False, 10, 0)
    p.update(record(5), 10)
    p.advance(6, 10)
    p.note("not shown")
    p.close()
    assert capsys.readouterr().out == ""


def test_a_terminal_gets_the_rich_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    p = Progress(True, 10, 0)
    try:
        assert p.bar is not None and not p.text
        p.update(record(5), 10)
        p.advance(6, 10)
        assert p.bar.tasks[0].completed == 6
    finally:
        p.close()


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (7.4, "7s"), (59.6, "1m00s"), (192, "3m12s"),
                                           (3600, "1h00m00s"), (3725, "1h02m05s"), (-3, "0s")])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_training_off_a_terminal_logs_text_lines(run_config, capsys):
    cfg = run_config(training={"max_steps": 3, "log_every": 2, "progress": True},
                     data={"split": {"validation_ratio": 0.25}}, eval={"every": 2},
                     output={"save_model": False, "model_card": False})
    cfg["method"] = {"type": "full"}
    tunesmith.train(cfg, echo=lambda m: None)
    out = capsys.readouterr().out.splitlines()
    steps = [LINE.fullmatch(line) for line in out if line.startswith("step ") and "/" in line.split()[1]]
    assert all(steps), out
    # Every log_every steps and the last one.
    assert [(int(m[1]), int(m[2])) for m in steps] == [(2, 3), (3, 3)]
    # The evaluation at step 2 (not the last step) is a line of its own.
    assert [line for line in out if re.fullmatch(r"step 2: eval_loss \d+\.\d{4}.*", line)], out
