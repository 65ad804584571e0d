"""Thread count and allocator settings a CPU training run makes for itself."""

from __future__ import annotations

import ctypes.util
import sys

import pytest
import torch

from tunesmith import hardware


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_lowered_thread_count_is_raised_to_every_usable_core(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 3)
    torch.set_num_threads(1)  # what a fork-safety guard or another library may leave behind
    line = hardware.ensure_threads()
    assert torch.get_num_threads() == 3
    assert line == "3 CPU threads on 3 usable cores"


def test_a_pinned_thread_count_is_left_alone_and_named(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(hardware, "usable_cores", lambda: 4)
    torch.set_num_threads(1)
    assert hardware.ensure_threads() == "1 CPU threads on 4 usable cores (OMP_NUM_THREADS=1)"
    assert torch.get_num_threads() == 1


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"),
                    reason="mallopt is glibc's")
def test_allocator_keeps_freed_memory_unless_told_not_to(monkeypatch):
    keep = hardware.keep_freed_memory.__wrapped__  # uncached, so each call decides again
    monkeypatch.setenv("TUNESMITH_MALLOC", "default")
    assert keep() is False
    monkeypatch.delenv("TUNESMITH_MALLOC")
    assert keep() is True
