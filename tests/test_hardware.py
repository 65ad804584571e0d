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


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"),
                    reason="mallopt is glibc's")
def test_blocks_of_a_few_megabytes_are_reused_not_faulted_in_again():
    """An fp32 activation of a few MB freed and allocated again every step comes back from the heap:
    mmapped (glibc's dynamic threshold otherwise stops near 2 MB), each round faults in all its pages."""
    import resource

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    assert hardware.keep_freed_memory.__wrapped__() is True
    size = 8 << 20  # 2048 pages of 4 KB
    rounds = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert sum(rounds[1:]) < 512, f"minor faults per round of an 8 MB block: {rounds} (2048 if faulted in again)"
