"""Batched generation from token ids: the one helper evaluation and online RL rollouts share.

Prompts are padded on the left for decoder-only models (generation continues from the right
edge) and on the right for encoder-decoders; `model.generate` runs with its KV cache, in eval
mode, without gradients, and the model's train/eval mode is restored afterwards. A DDP-wrapped
model is unwrapped first (its forward would synchronise gradients).

When a batch is runs of equal prompts (an online-RL group's copies), each distinct prompt is run
once and its KV cache repeated for the copies (`_shared_prefill`).

Each completion is cut after its first end-of-sequence token (kept: it is part of what the
policy chose), or marked truncated when it hit `max_new_tokens` without one. Sampling draws
from torch's global generator, so a run that seeds it (and restores its state on resume)
samples the same completions.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class Generated:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # up to and including the first end-of-sequence token
    truncated: list[bool]  # no end-of-sequence token within max_new_tokens


def stop_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a completion: the generation config's eos ids and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad_id] * (longest - len(r))
        ids.append(fill + r if left else r + fill)
        mask.append([0] * len(fill) + [1] * len(r) if left else [1] * len(r) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


class DrawToken(LogitsProcessor):
    """Samples the next token itself and hands greedy search a score row where only that token is finite.

    transformers samples with `torch.multinomial` over the whole vocabulary, which draws one
    exponential variate per vocabulary entry: for SmolLM2 (49,152 tokens) at 32 rows that was ~22 % of a
    CPU rollout (docs/rl.md). Here one uniform per row is inverted through the cumulative
    probabilities of the tokens that survive temperature, top-k and top-p (transformers' order and
    definitions), which is the same distribution from torch's global generator.
    """

    def __init__(self, temperature: float, top_k: int, top_p: float):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive to sample, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        vocab = scores.shape[-1]
        index = None
        if 0 < self.top_k < vocab:
            scores, index = scores.topk(self.top_k, dim=-1)  # sorted, highest first
        elif self.top_p < 1:
            scores, index = scores.sort(dim=-1, descending=True)
        probs = scores.softmax(-1)
        if self.top_p < 1:
            # Keep a token while the probability of the tokens ranked above it is under top_p (the first always).
            before = probs.cumsum(-1) - probs
            probs = probs.masked_fill(before >= self.top_p, 0)
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        # u < total strictly (rand * total can round up to it), so the first token whose cdf passes u
        # exists and has probability: a zero-probability token repeats its predecessor's cdf.
        below = torch.nextafter(total, torch.zeros_like(total))
        u = torch.minimum(torch.rand(total.shape, device=cdf.device) * total, below)
        choice = torch.searchsorted(cdf, u, right=True)
        if index is not None:
            choice = index.gather(-1, choice)
        out = torch.full((scores.shape[0], vocab), float("-inf"), device=scores.device)
        return out.scatter_(-1, choice, 0.0)


def unwrap(model):
    return getattr(model, "module", model)


def _repeats(chunk: list[list[int]]) -> int:
    """r when `chunk` is runs of r equal prompts (an online-RL rollout's groups), else 1."""
    r = 1
    while r < len(chunk) and chunk[r] == chunk[0]:
        r += 1
    if r > 1 and len(chunk) % r == 0 and all(chunk[i] == chunk[i - i % r] for i in range(len(chunk))):
        return r
    return 1


def _shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor, repeats: int):
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt and
    repeated for its copies: a group's G completions then cost one prompt forward, not G.

    Positions follow `generate`'s own rule for left padding, so `generate` continuing from this cache
    computes what it would have computed from scratch.
    """
    from transformers import DynamicCache

    distinct, distinct_mask = ids[::repeats, :-1], mask[::repeats, :-1]
    positions = (distinct_mask.long().cumsum(-1) - 1).masked_fill(distinct_mask == 0, 0)
    cache = DynamicCache(config=model.config)
    model(input_ids=distinct, attention_mask=distinct_mask, position_ids=positions, past_key_values=cache,
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(repeats)
    return cache


NEUTRAL_GENERATION = {
    "num_beams": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "guidance_scale": None,
}


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    merged_adapters: bool = False,
) -> Generated:
    """Completions of each prompt (token ids), in batches of `batch_size`.

    Sampling applies `temperature`, then `top_k` (0: none; None: the model's generation config), then
    `top_p`, and nothing else from the generation config. `merged_adapters` runs fused LoRA layers as
    one matmul against merged weights for the call (`methods.fused_lora.merged_for_inference`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    model = unwrap(model)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    # generate() applies the model's generation config before any processor of ours (a repetition penalty
    # from a Qwen config, banned or suppressed tokens, beams): completions would come from another
    # distribution than the one their log-probs are scored under. Passed here, these neutral values win.
    kwargs: dict = {"do_sample": False, **NEUTRAL_GENERATION}
    if do_sample:
        if top_k is None:  # the model's generation config decides (transformers' default is 50)
            top_k = getattr(getattr(model, "generation_config", None), "top_k", None) or 0
        kwargs["logits_processor"] = LogitsProcessorList([DrawToken(temperature, top_k, top_p)])
    was_training = model.training
    model.eval()
    completions: list[list[int]] = []
    truncated: list[bool] = []
    merge = nullcontext()
    if merged_adapters:
        from .methods.fused_lora import merged_for_inference  # imports peft

        merge = merged_for_inference(model)
    try:
        with merge:
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i:i + batch_size]
                ids, mask = _pad(chunk, pad_id, left=not seq2seq)
                ids, mask = ids.to(model.device), mask.to(model.device)
                repeats = 1 if seq2seq or ids.shape[1] < 2 else _repeats(chunk)
                cache = {"past_key_values": _shared_prefill(model, ids, mask, repeats)} if repeats > 1 else {}
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad_id, **cache, **kwargs)
                new = out if seq2seq else out[:, ids.shape[1]:]
                for row in new.tolist():
                    if seq2seq and row and row[0] == model.config.decoder_start_token_id:
                        row = row[1:]  # the decoder's start token is not generated
                    end = next((j for j, t in enumerate(row) if t in stops), None)
                    completions.append(row[:end + 1] if end is not None else row[:max_new_tokens])
                    truncated.append(end is None)
    finally:
        model.train(was_training)
    return Generated([list(p) for p in prompts], completions, truncated)
