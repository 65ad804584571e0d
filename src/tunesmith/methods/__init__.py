"""The method registry: which weights learn. One module per method family, one line here."""

from __future__ import annotations

from .adapter import BottleneckAdapter
from .base import Method, MethodContext, trainable_summary
from .bitfit import BitFit
from .freeze import Freeze
from .full import Full
from .ia3 import IA3
from .linear_probe import LinearProbe
from .lora import Dora, Lora, LoraFA, RsLora
from .prompt import PrefixTuning, PromptTuning, PTuning
from .qlora import QLora

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Full(), Freeze(), LinearProbe(), Lora(), Dora(), RsLora(), LoraFA(), QLora(), PrefixTuning(), PromptTuning(), PTuning(), IA3(),
        BitFit(), BottleneckAdapter(),
    )
}

__all__ = ["METHODS", "Method", "MethodContext", "trainable_summary"]
