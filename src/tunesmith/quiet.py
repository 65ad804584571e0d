"""Keep third-party noise off the console, so a run prints tunesmith's own lines.

Three kinds of noise, each silenced here and nowhere else, through logger levels, logger
filters and warnings filters (no library function is patched):

- bitsandbytes logs a CPU-kernel warning ("Failed to load CPU gemm_4bit_forward from
  kernels-community ...", bitsandbytes/backends/cpu/ops.py, `logging.getLogger(__name__)`)
  when it is imported, and peft imports it whenever it is installed. Only a QLoRA run asked
  for bitsandbytes; every other run hides its messages below ERROR.
- transformers logs a "load report" table (transformers/utils/loading_report.py, through
  the `transformers.modeling_utils` logger) about weights a checkpoint lacks; tunesmith adds
  task heads on purpose and says so in one line of its own (`models.load_model`).
- A few FutureWarnings / DeprecationWarnings that libraries raise about each other's APIs,
  listed in LIBRARY_WARNINGS, matched by category, module and message.
- transformers' "Loading weights" progress bar, drawn on every model load (a second or less
  from a local folder); `no_progress_bars` turns transformers' bars off for the load and
  restores them after. The one-time GGUF conversion keeps its bar: it takes long enough to
  be worth watching.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

BITSANDBYTES_LOGGER = "bitsandbytes"
LOAD_REPORT_LOGGER = "transformers.modeling_utils"

# (category, module the warning is attributed to, start of its message). Each entry is one
# warning seen in a normal training run, raised inside a library because of another library.
LIBRARY_WARNINGS: list[tuple[type[Warning], str, str]] = [
    # peft (0.21) reads PreTrainedModel.is_gradient_checkpointing, which transformers 5.x deprecates.
    (FutureWarning, r"transformers\.modeling_utils$", r"`is_gradient_checkpointing` is deprecated"),
    # torch.utils.mkldnn uses torch.jit.script_method; peft imports it through torch.fx.
    (DeprecationWarning, r"torch\.jit\._script$", r"`torch\.jit\.script_method` is deprecated"),
]

_UNSET = object()
_bnb_level: object = _UNSET  # the bitsandbytes logger's level before tunesmith changed it


def quiet_libraries(qlora: bool = False) -> None:
    """Set library loggers and warnings filters for a run; call before peft is imported.

    Cheap and idempotent: called on every model load. `qlora` keeps bitsandbytes' own
    messages (the user asked for it), restoring whatever level its logger had before.
    """
    global _bnb_level
    bnb = logging.getLogger(BITSANDBYTES_LOGGER)
    if qlora:
        if _bnb_level is not _UNSET:
            bnb.setLevel(_bnb_level)  # type: ignore[arg-type]
            _bnb_level = _UNSET
    else:
        if _bnb_level is _UNSET:
            _bnb_level = bnb.level
        bnb.setLevel(logging.ERROR)
    for category, module, message in LIBRARY_WARNINGS:
        # filterwarnings drops an identical earlier entry, so repeated calls do not pile up.
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _is_load_report(record: logging.LogRecord) -> bool:
    return record.funcName == "log_state_dict_report" or "LOAD REPORT" in record.getMessage()


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' load report; keeps one that a load error will point to."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_load_report(record):
            return True
        text = record.getMessage()
        # transformers raises right after a report with mismatched shapes or failed
        # conversions, and its error says "look at the above report": let that one through.
        if "MISMATCH" in text or "CONVERSION" in text:
            return True
        self.held.append(record)
        return False


@contextmanager
def held_load_report() -> Iterator[None]:
    """Within the block, transformers' load report is not printed; if the block fails, it is."""
    logger = logging.getLogger(LOAD_REPORT_LOGGER)
    hold = _HoldLoadReport()
    logger.addFilter(hold)
    try:
        yield
    except BaseException:
        logger.removeFilter(hold)
        for record in hold.held:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(hold)


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off within the block, restored to what they were after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
