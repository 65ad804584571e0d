"""The generation engine behind the server and `tunesmith chat`: one worker thread owns the
model; requests wait in a bounded queue and the worker decodes them in batches.

Batching is step-level (continuous): whatever is waiting when the worker is free (up to
`max_batch_size`) starts a batch: prompts left-padded, one prefill, then one forward per token
for all rows together with the KV cache. Between two decode steps, requests that arrived
meanwhile join the running batch: their prompts are prefilled on their own, and their cache rows
and attention masks are left-padded to the batch's length and stacked onto it, so a new request
waits one step, not for the whole batch to finish. A finished row leaves the batch at once (its
cache rows are dropped; columns no row attends to any more are cut). Each row keeps its own
sampling settings, seed, token limit, stop sequences and adapter: LoRA adapters share a batch
through peft's per-row `adapter_names`; other adapter kinds are batched per adapter (a request
for another adapter waits for the next batch). Models whose cache is not a plain growing one
(sliding-window layers) admit nothing mid-batch."""

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
            live = _Live(self.tokenizer, self._generator)
            try:
                self._run(batch, live)
            except Exception as exc:  # a failed batch answers its unfinished requests; the server lives on
                for job in [live.jobs[r] for r in live.rows] if live.jobs else batch:
                    job.emit(_failed(exc))
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
    def _run(self, jobs: list[Job], live: "_Live") -> None:
        jobs = self._with_adapters(jobs)
        if not jobs:
            return
        self.batches += 1
        with self._adapter_context(jobs[0].adapter) as extra:
            live.join(*self._prefill(jobs, extra))
            while True:
                joining = self._admit(live, jobs[0].adapter)
                joining = self._with_adapters(joining)  # between two steps: the batch's cache stays valid
                if joining:
                    try:
                        prefilled = self._prefill(joining, extra)
                    except Exception as exc:  # only the newcomers fail; the running rows go on
                        for job in joining:
                            job.emit(_failed(exc))
                    else:
                        live.join(*prefilled)
                self.busy_rows = len(live.rows)
                self.largest_batch = max(self.largest_batch, len(live.rows))
                tokens = _choose(live.logits, [live.jobs[r] for r in live.rows],
                                 [live.generators[r] for r in live.rows])
                keep = [i for i, r in enumerate(live.rows) if self._emit(live, r, int(tokens[i]))]
                if not keep:
                    return
                live.select(keep, tokens)
                out = self.model(input_ids=live.tokens[:, None], attention_mask=live.mask,
                                 position_ids=live.next_pos[:, None], past_key_values=live.cache, use_cache=True,
                                 **extra([live.jobs[r] for r in live.rows]))
                live.cache, live.logits, live.next_pos = out.past_key_values, out.logits[:, -1].float(), live.next_pos + 1

    def _with_adapters(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose adapters are loaded (a deferred one is loaded now, and may wrap the model); a job
        whose adapter fails to load gets the error alone, and the others of its batch go on."""
        failed = {}
        for name in {j.adapter for j in jobs} - {BASE}:
            if self._load_adapter is None:
                continue
            try:
                self.model = self._load_adapter(name)
            except Exception as exc:
                failed[name] = exc
        for job in jobs:
            if job.adapter in failed:
                job.emit(_failed(failed[job.adapter]))
        return [j for j in jobs if j.adapter not in failed]

    def _prefill(self, jobs: list[Job], extra) -> tuple:
        """One forward over the jobs' left-padded prompts: (jobs, cache, mask, next positions, last logits)."""
        device = _device(self.model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        longest = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[pad] * (longest - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=device)
        mask = torch.tensor([[0] * (longest - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **extra(jobs))
        return jobs, out.past_key_values, mask, positions[:, -1] + 1, out.logits[:, -1].float()

    def _admit(self, live: "_Live", adapter: str) -> list[Job]:
        """Waiting jobs that can join the running batch now (room left, an adapter this batch can carry)."""
        room = self.max_batch_size - len(live.rows)
        if room <= 0 or not self._waiting or self._closed or not live.can_grow():
            return []
        with self._cv:
            joining, rest = [], collections.deque()
            while self._waiting and len(joining) < room:
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    continue
                fits = job.adapter == adapter or (self.mixed_adapters and hasattr(self.model, "peft_config"))
                (joining if fits else rest).append(job)
            rest.extend(self._waiting)
            self._waiting = rest
        return joining

    def _emit(self, live: "_Live", r: int, token: int) -> bool:
        """Hand row r its token; True while it goes on generating."""
        job, stream = live.jobs[r], live.streams[r]
        live.counts[r] += 1
        if job.cancelled.is_set():
            return False
        if token in self._stops:
            self._finish(job, stream, "stop", live.counts[r])
            return False
        delta = stream.push(token)
        if delta:
            job.emit(Event("text", text=delta))
        if stream.stopped:
            self._finish(job, stream, "stop", live.counts[r])
        elif live.counts[r] >= job.max_tokens:
            self._finish(job, stream, "length", live.counts[r])
        else:
            return True
        return False

    @staticmethod
    def _finish(job: Job, stream: TextStream, reason: str, count: int) -> None:
        rest = stream.flush()
        if rest:
            job.emit(Event("text", text=rest))
        job.emit(Event("done", finish_reason=reason, completion_tokens=count))

    def _adapter_context(self, adapter: str):
        """A context yielding f(jobs) -> extra forward kwargs choosing each row's adapter; `adapter` is the
        batch's first job's (the only one a batch holds without mixed adapters)."""
        import contextlib

        if self.mixed_adapters:
            # Read per forward: an adapter loaded mid-batch may have wrapped the model.
            return contextlib.nullcontext(
                lambda jobs: {"adapter_names": [j.adapter for j in jobs]} if hasattr(self.model, "peft_config")
                else {})
        model = self.model
        if not hasattr(model, "peft_config"):
            return contextlib.nullcontext(lambda jobs: {})
        # One adapter per batch (_take and _admit guarantee it): switch to it, or turn adapters off for the base.
        if adapter == BASE:
            manager = model.disable_adapter()

            @contextlib.contextmanager
            def off():
                with manager:
                    yield lambda jobs: {}
            return off()
        model.set_adapter(adapter)
        return contextlib.nullcontext(lambda jobs: {})


class _Live:
    """The rows of a running batch: their jobs, text streams, generators and token counts (indexed by row
    number, a job's for the batch's life), and for the rows still generating (`rows`, in batch order) the
    KV cache, attention mask, next positions and the logits their next tokens are drawn from."""

    def __init__(self, tokenizer, shared: torch.Generator):
        self.tokenizer, self.shared = tokenizer, shared
        self.jobs: list[Job] = []
        self.streams: list[TextStream] = []
        self.generators: list[torch.Generator] = []
        self.counts: list[int] = []
        self.rows: list[int] = []
        self.cache = self.mask = self.next_pos = self.logits = self.tokens = None

    def can_grow(self) -> bool:
        """Whether rows can be stacked onto the cache (every layer a plain growing one)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def join(self, jobs: list[Job], cache, mask: torch.Tensor, next_pos: torch.Tensor, logits: torch.Tensor) -> None:
        """Add prefilled jobs: both caches and masks left-padded to the longer length, then stacked."""
        first = len(self.jobs)
        for job in jobs:
            self.jobs.append(job)
            self.streams.append(TextStream(self.tokenizer, job.stop))
            self.generators.append(torch.Generator().manual_seed(job.seed) if job.seed is not None else self.shared)
            self.counts.append(0)
        new_rows = list(range(first, len(self.jobs)))
        if self.cache is None:
            self.cache, self.mask, self.next_pos, self.logits, self.rows = cache, mask, next_pos, logits, new_rows
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length, -2), _left_pad(theirs.keys, length, -2)])
            mine.values = torch.cat([_left_pad(mine.values, length, -2), _left_pad(theirs.values, length, -2)])
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.logits = torch.cat([self.logits, logits])
        self.rows += new_rows

    def select(self, keep: list[int], tokens: torch.Tensor) -> None:
        """Keep the rows at these batch positions, their chosen tokens next; cut columns no row attends to."""
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_pos, tokens = self.mask[index], self.next_pos[index], tokens[index]
            self.rows = [self.rows[i] for i in keep]
            unused = int(self.mask.any(0).int().argmax())  # leading padding every remaining row skips
            if unused > 0 and self.can_grow():
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
                self.mask = self.mask[:, unused:]
        self.tokens = tokens.to(self.mask.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)


def _failed(exc: Exception) -> Event:
    return Event("error", text=f"generation failed: {type(exc).__name__}: {exc}")


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `length` (masked positions: their values never count)."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


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
        # The generators live on the CPU (a seeded request samples the same tokens on any device), so
        # the probabilities go there: multinomial refuses a generator on another device than its input.
        out[i] = torch.multinomial(probs.float().cpu(), 1, generator=generators[i])[0]
    return out
