"""Attention for packed rows without a dense mask: SDPA once per packed example.

With packing, transformers finds where examples start from restarting position ids and builds
a dense block-diagonal (rows x L x L) mask, which sends SDPA down its masked path and still
computes every cross-example block only to discard it. Here each example of a row is one causal
SDPA call over its own tokens, so attention costs sum(n_i^2) instead of L^2 and no mask exists.

The same position ids also describe answers that share a prompt (online RL's groups, a DPO
pair): after a prompt and its first answer, each further answer's positions restart at the
prompt's length, and its attention covers the prompt's keys and its own, nothing else
(`shared_prompt_rows` builds such rows; the scoring core uses them).

Registered through transformers' attention and mask interfaces under one name; anything that
is not plain causal self-attention over whole rows (a padding mask, a KV cache, bidirectional
encoders) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

SEGMENTS = "tunesmith_segments"


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per row, (start, end, root, shared) of each example.

    A new example starts wherever positions restart at 0 (root -1, shared 0). A run whose
    positions jump back to s > 0 continues the first s tokens of the latest example that started
    at 0: it attends to them and to itself (root = that example's start, shared = s). That is how
    several answers packed after one shared prompt are scored (`scoring.shared_prompt_rows`). Any
    other jump stays inside its example, as it did before continuations existed.
    """
    bounds = []
    for row in position_ids.cpu():
        jumps = ((row[1:] != row[:-1] + 1).nonzero().flatten() + 1).tolist()
        values = row[jumps].tolist()
        segments = []
        start, shared = 0, 0
        root, root_end = (0 if int(row[0]) == 0 else None), None
        for i, pos in zip(jumps, values):
            if pos != 0:
                if root is None or pos > (root_end if root_end is not None else i) - root:
                    continue
            segments.append((start, i, root if shared else -1, shared))
            if start == root and root_end is None:
                root_end = i
            start = i
            if pos == 0:
                root, root_end, shared = i, None, 0
            else:
                shared = pos
        segments.append((start, row.shape[0], root if shared else -1, shared))
        bounds.append(segments)
    return bounds


_LAST = threading.local()


def _segments_once(position_ids: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """`_segments`, computed once per forward: every layer gets the same position_ids tensor, and on
    an accelerator each computation waits for the device (the positions are read on the host).
    Inference tensors have no version counter to tell an in-place change by, so they are read every time."""
    if position_ids.is_inference():
        return _segments(position_ids)
    last = getattr(_LAST, "entry", None)
    if last is not None and last[0] is position_ids and last[1] == position_ids._version:
        return last[2]
    bounds = _segments(position_ids)
    _LAST.entry = (position_ids, position_ids._version, bounds)
    return bounds


# A few dozen entries cover a step's repeats (online RL's answers cut at the same length); a mask is
# length x (shared + length) bools, so 512 entries of 2,048-token answers could hold GBs of masks.
@functools.lru_cache(maxsize=32)
def _continuation_mask(length: int, shared: int, device: str) -> torch.Tensor:
    """(length, shared + length) bool: every shared prefix token, then causal over the run itself."""
    own = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(length, shared, dtype=torch.bool, device=device), own], dim=1)


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      position_ids: torch.Tensor | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    plain = (attention_mask is None and position_ids is not None and q_len > 1 and key.shape[2] == q_len
             and getattr(module, "is_causal", True) and not kwargs.get("output_attentions")
             and position_ids.shape == (query.shape[0], q_len))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    dtype = query.dtype
    device = query.device.type
    # Under autocast q and k may arrive in fp32 (rotary embeddings promote them) and v in bf16.
    # SDPA is a lower-precision op there, so autocast would cast all three to bf16; on CPU that
    # picks PyTorch's flash backward at its slowest (~3x fp32 for example-sized blocks, measured
    # in docs/benchmarks.md), so on CPU they are cast to fp32 instead, and autocast is kept off.
    common = torch.float32 if device == "cpu" else (
        torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
    if common is not None:
        query, key, value = query.to(common), key.to(common), value.to(common)
    with torch.autocast(device, enabled=False):
        out = _segment_rows(query, key, value, _segments_once(position_ids), dropout, scaling, gqa, dtype)
    return out.transpose(1, 2).contiguous(), None


def _segment_rows(query, key, value, bounds, dropout, scaling, gqa, dtype):
    # split, not slicing: autograd joins split pieces' gradients with one cat, where every slice
    # would get a zero-filled full-size gradient that is then summed (~2 % of a step on CPU).
    rows = []
    for (q_row, k_row, v_row), row in zip(zip(query.split(1), key.split(1), value.split(1)), bounds):
        sizes = [end - start for start, end, _, _ in row]
        parts = []
        for q, k, v, (_, _, root, shared), length in zip(q_row.split(sizes, 2), k_row.split(sizes, 2),
                                                          v_row.split(sizes, 2), row, sizes):
            if shared:
                k = torch.cat([k_row[:, :, root : root + shared], k], dim=2)
                v = torch.cat([v_row[:, :, root : root + shared], v], dim=2)
                mask = _continuation_mask(length, shared, str(q.device))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                     enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                                     enable_gqa=gqa)
            parts.append(out.to(dtype))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def segment_mask(*args, attention_mask=None, **kwargs):
    """No mask at all for unpadded rows (packed or not); transformers' SDPA mask when there is padding."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENTS, segment_attention)
    AttentionMaskInterface.register(SEGMENTS, segment_mask)
    return SEGMENTS


def use_segment_attention(model) -> bool:
    """Switch a decoder that runs transformers' SDPA to per-example attention; True when it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or config.is_encoder_decoder:
        return False
    model.set_attn_implementation(register())
    return True


def segments_active(model) -> bool:
    """True when `model` (or the backbone it wraps) runs `segment_attention`."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == SEGMENTS


def shared_prompt_rows(inputs: dict[str, torch.Tensor], labels: torch.Tensor
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Right-padded rows of prompt + answer as one packed row in which each distinct prompt appears once.

    Online RL scores G answers per prompt and DPO two; as separate rows every prompt is run G
    times. Here a prompt's first answer follows it and every further answer continues at the
    prompt's length (a continuation run of `_segments`), so each answer sees exactly its own prompt
    and itself, as in its own row. The prompt of a row is everything before its first labelled
    token; its labelled tokens must form one run (IGNORE elsewhere).

    Returns (input_ids and position_ids of shape (1, N), index): index[k] is the packed position
    whose hidden state predicts the k-th labelled token of labels[:, 1:] in row-major order (what
    `labels[:, 1:] != IGNORE` selects). None when the rows do not have that shape or the inputs
    carry more than ids and a right-padding mask: the caller scores the rows as they are.
    """
    from .data.templates import IGNORE

    if set(inputs) - {"input_ids", "attention_mask"}:
        return None
    ids, lab = inputs["input_ids"].cpu(), labels.cpu()
    width = ids.shape[1]
    mask = inputs.get("attention_mask")
    lengths = mask.sum(1).cpu() if mask is not None else torch.full((ids.shape[0],), width)
    if mask is not None and not torch.equal(mask.cpu().bool(), torch.arange(width) < lengths[:, None]):
        return None  # not right-padded
    counted = lab[:, 1:] != IGNORE
    groups: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
    for b in range(ids.shape[0]):
        cols = counted[b].nonzero().flatten()
        if not len(cols):
            continue
        first, last = int(cols[0]) + 1, int(cols[-1]) + 1
        if last - first + 1 != len(cols) or last >= int(lengths[b]):
            return None
        groups.setdefault(tuple(ids[b, :first].tolist()), []).append((b, first, last))
    if not groups:
        return None
    tokens: list[int] = []
    positions: list[int] = []
    picks: dict[int, list[int]] = {}
    for prompt, members in groups.items():
        root, p = len(tokens), len(prompt)
        tokens += prompt
        positions += range(p)
        for b, first, last in members:
            at = len(tokens)
            tokens += ids[b, first:last + 1].tolist()
            positions += range(p, p + last + 1 - first)
            picks[b] = [root + p - 1, *range(at, at + last - first)]
    device = inputs["input_ids"].device
    index = torch.tensor([i for b in sorted(picks) for i in picks[b]], dtype=torch.long, device=device)
    packed = {"input_ids": torch.tensor([tokens], dtype=torch.long, device=device),
              "position_ids": torch.tensor([positions], dtype=torch.long, device=device)}
    return packed, index
