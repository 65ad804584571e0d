"""The heap guard trims glibc's free heap only when a step ends well above the first step's size."""

from tunesmith import hardware
from tunesmith.hardware import HeapGuard

MB = 1 << 20


def test_heap_guard_trims_only_past_the_slack(monkeypatch):
    sizes = iter([1000 * MB, 1400 * MB, 1600 * MB, 1300 * MB])  # after steps 1..4
    monkeypatch.setattr(hardware, "rss_bytes", lambda: next(sizes))
    guard = HeapGuard(slack=512 * MB)
    trims = []
    guard._trim = lambda pad: trims.append(pad)  # glibc's malloc_trim stands here
    for _ in range(4):
        guard.after_step()
    assert guard.settled == 1000 * MB
    assert trims == [0] and guard.trims == 1  # only step 3 ended more than 512 MB above step 1


def test_heap_guard_checks_micro_batches_once_settled(monkeypatch):
    """Within an accumulation window the guard trims too, but only against the first optimizer step's size."""
    sizes = iter([900 * MB, 1000 * MB, 1200 * MB, 1600 * MB, 1100 * MB])
    monkeypatch.setattr(hardware, "rss_bytes", lambda: next(sizes))
    guard = HeapGuard(slack=512 * MB)
    trims = []
    guard._trim = lambda pad: trims.append(pad)
    guard.after_micro_batch()  # before the first step: not settled, no reading taken
    guard.after_step()  # settles at 900 MB
    guard.after_micro_batch()  # 1000: inside the slack
    guard.after_micro_batch()  # 1200: inside
    guard.after_micro_batch()  # 1600: past 900 + 512
    guard.after_step()  # 1100: inside
    assert guard.settled == 900 * MB and trims == [0] and guard.trims == 1


def test_heap_guard_is_off_when_asked(monkeypatch):
    monkeypatch.setenv("TUNESMITH_MALLOC", "default")
    assert HeapGuard()._trim is None
