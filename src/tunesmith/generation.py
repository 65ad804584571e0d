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

from dataclasses import dataclass

import torch


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
) -> Generated:
    """Completions of each prompt (token ids), in batches of `batch_size`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    model = unwrap(model)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    kwargs: dict = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
        if top_k is not None:  # None: the model's generation config decides (transformers' default is 50)
            kwargs["top_k"] = top_k
    was_training = model.training
    model.eval()
    completions: list[list[int]] = []
    truncated: list[bool] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            ids, mask = _pad(chunk, pad_id, left=not seq2seq)
            ids, mask = ids.to(model.device), mask.to(model.device)
            repeats = 1 if seq2seq or ids.shape[1] < 2 else _repeats(chunk)
            cache = {"past_key_values": _shared_prefill(model, ids, mask, repeats)} if repeats > 1 else {}
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 **cache, **kwargs)
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
