"""Which rows each micro-batch of an epoch holds: a pure function of (seed, epoch).

The loop stores only the epoch and the position in it, so a resumed run redraws the same
batches: nothing about the order lives in a generator's state.
"""

from __future__ import annotations

import math

import torch


def _permutation(n: int, *seed_parts: int) -> list[int]:
    # One generator per (seed, epoch, ...) tuple: the hash is stable across processes and runs.
    seed = 0
    for part in seed_parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Row indices of every micro-batch of one epoch; the same for a given (seed, epoch)."""
    if shuffle:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n_rows))
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def task_probabilities(sizes: list[int], sampling: str, temperature: float = 2.0,
                       weights: list[float] | None = None) -> list[float]:
    """How often each task is drawn: proportional to its rows, to rows^(1/T), equally, or by weight."""
    if sampling == "proportional":
        raw = [float(n) for n in sizes]
    elif sampling == "temperature":
        raw = [float(n) ** (1.0 / temperature) for n in sizes]
    elif sampling == "equal":
        raw = [1.0] * len(sizes)
    elif sampling == "weights":
        if weights is None or len(weights) != len(sizes):
            raise ValueError(f"sampling 'weights' needs one weight per task ({len(sizes)}), got {weights}")
        raw = [float(w) for w in weights]
    else:
        raise ValueError(f"unknown sampling '{sampling}'")
    total = sum(raw)
    return [r / total for r in raw]


def _allocate(n: int, probabilities: list[float]) -> list[int]:
    """n draws split by probability, largest remainders first (the counts sum to n exactly)."""
    exact = [n * p for p in probabilities]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def epoch_length(spans: list[tuple[int, int]], batch_size: int) -> int:
    """Micro-batches of a multi-task epoch: every task's rows cut into batches once, whatever the sampling."""
    return sum(math.ceil((end - start) / batch_size) for start, end in spans)


def task_batches(spans: list[tuple[int, int]], batch_size: int, seed: int, epoch: int, sampling: str,
                 temperature: float = 2.0, weights: list[float] | None = None,
                 shuffle: bool = True) -> list[list[int]]:
    """The micro-batches of one multi-task epoch; each holds rows of one task only.

    `spans[t]` is the index range of task t's rows. An epoch has as many micro-batches as every
    task's rows cut into batches once. `proportional` uses each task's batches exactly once, in a
    seeded order; `temperature`, `weights` and `equal` give task t its share of the epoch's batches
    (largest remainder), cycling through fresh shuffles of a small task's rows and stopping part way
    through a large one's; `equal` takes the tasks round-robin, the others in a seeded order.
    """
    sizes = [end - start for start, end in spans]
    per_task = [math.ceil(n / batch_size) for n in sizes]
    counts = per_task if sampling == "proportional" else _allocate(epoch_length(spans, batch_size), task_probabilities(
        sizes, sampling, temperature, weights))

    def batches_of(t: int, cycle: int) -> list[list[int]]:
        start, end = spans[t]
        order = _permutation(sizes[t], seed, epoch, t, cycle) if shuffle else list(range(sizes[t]))
        return [[start + i for i in order[j: j + batch_size]] for j in range(0, sizes[t], batch_size)]

    drawn: list[list[list[int]]] = []
    for t, count in enumerate(counts):
        mine: list[list[int]] = []
        cycle = 0
        while len(mine) < count:
            mine += batches_of(t, cycle)
            cycle += 1
        drawn.append(mine[:count])
    if sampling == "equal":  # round-robin over the tasks that still have batches this epoch
        sequence, left = [], list(counts)
        while any(left):
            for t in range(len(counts)):
                if left[t]:
                    sequence.append(t)
                    left[t] -= 1
    else:
        sequence = [t for t, count in enumerate(counts) for _ in range(count)]
        if shuffle:
            sequence = [sequence[i] for i in _permutation(len(sequence), seed, epoch, -1)]
    taken = [0] * len(counts)
    out = []
    for t in sequence:
        out.append(drawn[t][taken[t]])
        taken[t] += 1
    return out
