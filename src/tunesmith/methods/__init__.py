"""The method registry: which weights learn. One module per method, one line here."""

from __future__ import annotations

from .base import Method, trainable_summary
from .freeze import Freeze
from .full import Full
from .lora import Lora

METHODS: dict[str, Method] = {m.name: m for m in (Full(), Freeze(), Lora())}

__all__ = ["METHODS", "Method", "trainable_summary"]
