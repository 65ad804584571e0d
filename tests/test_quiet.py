"""A training run prints tunesmith's own lines, not third-party noise.

The noise this keeps away: bitsandbytes' CPU-kernel warning (logged when peft imports it),
transformers' load report about the task head tunesmith adds itself, and FutureWarnings /
DeprecationWarnings raised inside libraries.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

import tunesmith
from conftest import write_jsonl
from tunesmith import quiet
from tunesmith.config import ModelConfig
from tunesmith.models import load_model

SENTENCES = [("the movie was good and great", "positive"), ("a bad and terrible movie", "negative"),
             ("what a great day", "positive"), ("this is terrible", "negative")]
NOISE = ("bitsandbytes", "kernels-community", "gemm_4bit", "FutureWarning", "DeprecationWarning",
         "newly initialized", "LOAD REPORT", "MISSING", "UNEXPECTED", "TRAIN this model", "Loading weights")
TUNESMITH_DIRS = (str(Path(tunesmith.__file__).parent), str(Path(__file__).parent))


def run(model_dir: Path, data: Path, tmp_path: Path, objective: str, seed: int = 7) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "max_length": 32},
        "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"type": objective},
        "training": {"max_steps": 2, "batch_size": 4, "progress": False, "log_every": 1,
                     "precision": "fp32", "seed": seed},
        "eval": {"forgetting": False},
        "output": {"dir": str(tmp_path / "run"), "model_card": False},
    }


def train_and_capture(cfg: dict, capfd, caplog) -> tuple[list[str], str, list]:
    """The echoed lines, what reached stdout/stderr or the log capture, and library warnings."""
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        # Everything shows unless tunesmith's own filters (installed during the run) hide it.
        warnings.simplefilter("always")
        tunesmith.train(cfg, echo=lines.append)
    out, err = capfd.readouterr()
    # Under pytest a logger without handlers of its own reaches pytest's log capture instead
    # of stderr (bitsandbytes has none; in a plain run its records go to stderr).
    logged = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records)
    third_party = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                   and not w.filename.startswith(TUNESMITH_DIRS)]
    return lines, out + err + logged, third_party


def test_classification_run_shows_the_head_notice_and_no_library_noise(tiny_bert_dir, tmp_path, capfd, caplog):
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": s, "label": y} for s, y in SENTENCES])
    lines, printed, third_party = train_and_capture(run(tiny_bert_dir, data, tmp_path, "classification"),
                                                    capfd, caplog)
    for noise in NOISE:
        assert noise not in printed, f"{noise!r} reached the console:\n{printed}"
    assert third_party == [], [f"{w.category.__name__} {w.filename}: {w.message}" for w in third_party]

    notices = [line for line in lines if line.startswith("model:")]
    assert len(notices) == 1, lines
    # The fresh head and the pooler the MLM checkpoint never had; the MLM head it drops.
    assert notices[0] == ("model: new task head classifier (2 labels) initialised from seed 7; "
                          "also new: bert.pooler.dense; unused from the checkpoint: cls.predictions")


def test_causal_lm_run_has_nothing_new_to_report(tiny_model_dir, alpaca_file, tmp_path, capfd, caplog):
    lines, printed, third_party = train_and_capture(run(tiny_model_dir, alpaca_file, tmp_path, "sft"),
                                                    capfd, caplog)
    for noise in NOISE:
        assert noise not in printed, f"{noise!r} reached the console:\n{printed}"
    assert third_party == []
    assert not [line for line in lines if line.startswith("model:")], lines
    assert lines[0].startswith("data: ") and lines[1].startswith("method lora: ")


def test_load_progress_bar_is_hidden_and_restored(tiny_model_dir, capfd):
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.float32, echo=lambda _: None)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is back


def test_decoder_head_notice_names_its_labels(tiny_model_dir, tmp_path):
    lines: list[str] = []
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.float32,
                       auto_class="AutoModelForSequenceClassification", init_seed=3, num_labels=3,
                       echo=lines.append)
    assert isinstance(model, torch.nn.Module)  # not the (model, loading info) pair
    assert lines == ["model: new task head score (3 labels) initialised from seed 3"]


def test_a_failing_load_still_shows_transformers_report(tiny_bert_dir, caplog):
    # A shape mismatch makes transformers raise "look at the above report": it must be there.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load_model(ModelConfig(name_or_path=str(tiny_bert_dir)), torch.float32,
                   auto_class="AutoModelForMaskedLM", vocab_size=17, echo=lambda m: None)
    # transformers' records propagate to pytest's log capture (its own stderr handler writes
    # to the stream pytest had installed when transformers was imported, out of capfd's reach).
    assert "LOAD REPORT" in caplog.text and "MISMATCH" in caplog.text


def test_a_load_that_fails_after_the_report_shows_the_held_report(caplog):
    # The report is held back only while the load may still succeed.
    report = logging.getLogger(quiet.LOAD_REPORT_LOGGER)
    with pytest.raises(OSError), quiet.held_load_report():
        report.warning("BertModel LOAD REPORT from: x\nclassifier.weight | MISSING")
        assert "LOAD REPORT" not in caplog.text
        raise OSError("disk gone")
    assert "LOAD REPORT" in caplog.text


def test_bitsandbytes_warnings_are_hidden_unless_the_run_is_qlora(caplog):
    # bitsandbytes logs its CPU-kernel message through logging.getLogger(__name__) in
    # bitsandbytes/backends/cpu/ops.py, once per process when it is imported: the training
    # tests above see the real one only when nothing imported peft before them. This checks
    # the logger, whatever the order.
    message = "Failed to load CPU gemm_4bit_forward from kernels-community"
    emitter = logging.getLogger("bitsandbytes.backends.cpu.ops")
    quiet.quiet_libraries(qlora=True)  # back to the level bitsandbytes' logger had before tunesmith
    before = logging.getLogger("bitsandbytes").level
    try:
        quiet.quiet_libraries(qlora=False)
        emitter.warning(message)
        emitter.error("a real bitsandbytes error")
        assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes error"]
        caplog.clear()
        quiet.quiet_libraries(qlora=True)  # the user asked for bitsandbytes: its messages show
        emitter.warning(message)
        assert [r.getMessage() for r in caplog.records] == [message]
    finally:
        quiet.quiet_libraries(qlora=True)
    assert logging.getLogger("bitsandbytes").level == before


@pytest.mark.parametrize("category, module, message, hidden", [
    # Raised in transformers when peft reads the deprecated alias (peft 0.21, transformers 5.x).
    (FutureWarning, "transformers.modeling_utils",
     "`is_gradient_checkpointing` is deprecated and will be removed in v6.", True),
    # torch.utils.mkldnn, imported while peft imports torch.fx.experimental.optimization.
    (DeprecationWarning, "torch.jit._script", "`torch.jit.script_method` is deprecated.", True),
    # Only those: the same kind of warning from elsewhere, or another one, still shows.
    (FutureWarning, "transformers.modeling_utils", "`foo` is deprecated", False),
    (FutureWarning, "tunesmith.api", "`is_gradient_checkpointing` is deprecated", False),
    (UserWarning, "torch.jit._script", "`torch.jit.script_method` is deprecated.", False),
])
def test_library_warning_filters_are_narrow(category, module, message, hidden):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.quiet_libraries()
        warnings.warn_explicit(message, category, filename=f"/x/{module.replace('.', '/')}.py", lineno=1,
                               module=module)
    assert (caught == []) == hidden
