"""The generation engine behind the server and `tunesmith chat`: one worker thread owns the
model; requests wait in a bounded queue and the worker decodes them in batches.

Batching: whatever is waiting when the worker is free (up to `max_batch_size`) becomes one
batch: prompts left-padded, one prefill, then one forward per token for all rows together with
the KV cache. A finished row leaves the batch at once (its cache rows are dropped), so the
batch only pays for rows still generating. Each row keeps its own sampling settings, seed,
token limit, stop sequences and adapter: LoRA adapters share a batch through peft's per-row
`adapter_names`; other adapter kinds are batched per adapter."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generation import stop_token_ids
from .text import TextStream

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


@dataclass
class Event:
    kind: str  # "text" (a delta), "done" (finish_reason set) or "error"
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Job:
    """One completion to produce (a request with n choices is n jobs)."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    adapter: str = BASE
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, model, tokenizer, *, mixed_adapters: bool = True, max_batch_size: int = 32,
                 max_queue: int = 256, load_adapter: Callable[[str], object] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mixed_adapters = mixed_adapters
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._load_adapter = load_adapter
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._generator = torch.Generator().manual_seed(int(time.time_ns()) & 0xFFFFFFFF)
        self._stops = stop_token_ids(model, tokenizer)
        self.busy_rows = 0
        self.batches = 0  # batches decoded so far, and the most rows one of them held
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="tunesmith-generate", daemon=True)
        self._thread.start()

    # -- producer side (any thread) -------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        with self._cv:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} completions are already waiting (limit {self.max_queue})")
            self._waiting.extend(jobs)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # -- worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._waiting:
                        job.emit(Event("error", text="the server is shutting down"))
                    return
                batch = self._take()
            try:
                self._run(batch)
            except Exception as exc:  # a failed batch answers its requests; the server lives on
                for job in batch:
                    job.emit(Event("error", text=f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                self.busy_rows = 0

    def _take(self) -> list[Job]:
        """Oldest first; without mixed adapters only jobs for the oldest job's adapter."""
        key = self._waiting[0].adapter
        batch, rest = [], collections.deque()
        while self._waiting and len(batch) < self.max_batch_size:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                continue
            (batch if self.mixed_adapters or job.adapter == key else rest).append(job)
        rest.extend(self._waiting)
        self._waiting = rest
        return batch

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        for name in {j.adapter for j in jobs} - {BASE}:
            if self._load_adapter is not None:
                self.model = self._load_adapter(name)  # a deferred adapter may wrap the model
        model, device = self.model, _device(self.model)
        self.busy_rows = len(jobs)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        longest = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[pad] * (longest - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=device)
        mask = torch.tensor([[0] * (longest - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        streams = [TextStream(self.tokenizer, j.stop) for j in jobs]
        generators = [torch.Generator().manual_seed(j.seed) if j.seed is not None else self._generator for j in jobs]
        counts = [0] * len(jobs)
        rows = list(range(len(jobs)))  # indices into jobs of the rows still in the batch
        with self._adapter_context(jobs) as extra:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **extra(rows))
            cache, logits, next_pos = out.past_key_values, out.logits[:, -1].float(), positions[:, -1] + 1
            while True:
                tokens = _choose(logits, [jobs[r] for r in rows], [generators[r] for r in rows])
                keep = []
                for i, r in enumerate(rows):
                    job, token = jobs[r], int(tokens[i])
                    counts[r] += 1
                    if job.cancelled.is_set():
                        continue
                    if token in self._stops:
                        self._finish(job, streams[r], "stop", counts[r])
                        continue
                    delta = streams[r].push(token)
                    if delta:
                        job.emit(Event("text", text=delta))
                    if streams[r].stopped:
                        self._finish(job, streams[r], "stop", counts[r])
                    elif counts[r] >= job.max_tokens:
                        self._finish(job, streams[r], "length", counts[r])
                    else:
                        keep.append(i)
                if not keep:
                    return
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, tokens, next_pos = mask[index], tokens[index], next_pos[index]
                    rows = [rows[i] for i in keep]
                self.busy_rows = len(rows)
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                out = model(input_ids=tokens[:, None].to(device), attention_mask=mask,
                            position_ids=next_pos[:, None], past_key_values=cache, use_cache=True, **extra(rows))
                cache, logits, next_pos = out.past_key_values, out.logits[:, -1].float(), next_pos + 1

    @staticmethod
    def _finish(job: Job, stream: TextStream, reason: str, count: int) -> None:
        rest = stream.flush()
        if rest:
            job.emit(Event("text", text=rest))
        job.emit(Event("done", finish_reason=reason, completion_tokens=count))

    def _adapter_context(self, jobs: list[Job]):
        """A context yielding f(rows) -> extra forward kwargs choosing each row's adapter."""
        import contextlib

        names = [j.adapter for j in jobs]
        model = self.model
        if not hasattr(model, "peft_config"):
            return contextlib.nullcontext(lambda rows: {})
        if self.mixed_adapters:
            return contextlib.nullcontext(lambda rows: {"adapter_names": [names[r] for r in rows]})
        # One adapter per batch (_take guarantees it): switch to it, or turn adapters off for the base.
        if names[0] == BASE:
            manager = model.disable_adapter()

            @contextlib.contextmanager
            def off():
                with manager:
                    yield lambda rows: {}
            return off()
        model.set_adapter(names[0])
        return contextlib.nullcontext(lambda rows: {})


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _choose(logits: torch.Tensor, jobs: list[Job], generators: list[torch.Generator]) -> torch.Tensor:
    """Each row's next token under its own temperature (0 = greedy), top_p and generator."""
    greedy = logits.argmax(-1)
    out = greedy.clone()
    for i, job in enumerate(jobs):
        if job.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / job.temperature, dim=-1)
        if job.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cut = sorted_p.cumsum(0) - sorted_p > job.top_p  # keep the smallest head reaching top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out
