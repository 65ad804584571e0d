"""What the machine can do fast, measured rather than assumed."""

from __future__ import annotations

import functools
import os
import time

import torch


def device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.cache
def bf16_is_fast() -> bool:
    """True when bf16 matmuls beat fp32 on this device.

    On CUDA this is the hardware flag. On CPUs it depends on AVX512-BF16/AMX, which torch does
    not expose reliably, so a few-millisecond matmul race decides: on AVX2-only CPUs bf16 runs
    through a slow emulation path (measured 10-500x slower than fp32 on our CI machine).
    """
    dev = device_type()
    if dev == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev != "cpu":
        return False
    # Large enough that kernel choice, not call overhead, decides; best of several repeats,
    # because a busy neighbour on a shared machine can stall any single one. An emulated bf16
    # matmul is hundreds of times slower, so one slow bf16 call ends the race early.
    a32 = torch.randn(512, 512)
    a32 @ a32
    fp32 = min(_seconds(lambda: a32 @ a32) for _ in range(5))
    a16 = a32.to(torch.bfloat16)
    if _seconds(lambda: a16 @ a16) > 20 * fp32:
        return False
    return min(_seconds(lambda: a16 @ a16) for _ in range(5)) < fp32


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

def matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(x, weight)` runs in: autocast's when it is on, else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ensure_threads() -> str:
    """Use every core this process may run on, unless the user pinned a thread count.

    A library that lowers torch's intra-op threads (or a fork-safety guard) would otherwise
    leave a CPU training run on one core without a word. Returns a line for the run log.
    """
    cores = usable_cores()
    pinned = next((v for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(v)), None)
    if device_type() == "cpu" and not pinned and torch.get_num_threads() < cores:
        torch.set_num_threads(cores)
    note = f" ({pinned}={os.environ[pinned]})" if pinned else ""
    return f"{torch.get_num_threads()} CPU threads on {cores} usable cores{note}"


# glibc mallopt parameter (malloc.h) and the free heap kept instead of trimmed.
_M_TRIM_THRESHOLD = -1
_TRIM_THRESHOLD = 1 << 30
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed heap memory for reuse instead of handing it back to the kernel.

    By default glibc trims the top of the heap as soon as more than twice its (dynamic) mmap
    threshold is free, so a training step that frees its activations faults them in again, page
    by page, on the next step; on a VM those faults cost more than the element-wise ops that
    touch the pages (docs/benchmarks.md). Here up to 1 GB of free heap is kept. Setting the trim
    threshold also stops glibc's dynamic mmap threshold where it stands (mallopt(3)): after
    tunesmith's imports alone 1 MB blocks came from the heap and 2 MB ones were mmapped, and an
    mmapped block is returned on free and faulted in again, page by page, on its next use. An fp32
    step's activations are mostly above that (3 MB for one 512-token row through SmolLM2's MLP): its
    element-wise ops ran 4-6x slower than bf16's on the same tensors. So blocks up to 32 MB come
    from the heap too (fp32 LoRA step 3.1 -> 2.1-2.5 s, bf16 unchanged; docs/benchmarks.md). Freed heap
    can strand between live blocks; `HeapGuard` hands it back past a slack. Off with
    TUNESMITH_MALLOC=default; a no-op off glibc. True when applied.
    """
    if os.environ.get("TUNESMITH_MALLOC", "").lower() == "default" or device_type() != "cpu":
        return False
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim():
    """glibc's malloc_trim on a CPU run (None off glibc, on GPU, or with TUNESMITH_MALLOC=default)."""
    if device_type() != "cpu" or os.environ.get("TUNESMITH_MALLOC", "").lower() == "default":
        return None
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Hand the heap glibc keeps free back to the kernel now (a no-op where HeapGuard would not trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class HeapGuard:
    """Hands glibc's free heap back to the kernel when the process has grown past its settled size.

    Freed tensor memory that glibc keeps (keep_freed_memory, and free chunks stranded between
    live ones) is reused by the next step, but some step shapes strand it faster than it is
    reused: a QLoRA step of SmolLM2 through bitsandbytes' CPU kernels left 1.5-3 GB more resident
    after every step with no live tensor growing, so a CPU QLoRA run grew until it was killed;
    `malloc_trim(0)` returns it (measured in docs/reliability.md). The guard takes the resident
    size after the first optimizer step as the settled level and trims only when a later
    micro-batch or step ends more than `slack` above it, so runs whose heap is stable pay nothing.
    Micro-batches are checked too because rows of varying length (DPO's packed pairs) strand
    memory within one accumulation window: a LoRA DPO run of SmolLM2 peaked 170 MB lower
    (docs/alignment.md).
    """

    def __init__(self, slack: int = 512 << 20):
        self.slack, self.settled, self.trims = slack, None, 0
        self._trim = _malloc_trim()

    def after_micro_batch(self) -> None:
        if self._trim is not None and self.settled is not None:
            self._trim_past_slack()

    def after_step(self) -> None:
        if self._trim is None:
            return
        if self.settled is None:
            self.settled = rss_bytes()
        else:
            self._trim_past_slack()

    def _trim_past_slack(self) -> None:
        if rss_bytes() > self.settled + self.slack:
            self._trim(0)
            self.trims += 1
