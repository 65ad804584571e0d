"""Attention for packed rows without a dense mask: SDPA once per packed example.

With packing, transformers finds where examples start from restarting position ids and builds
a dense block-diagonal (rows x L x L) mask, which sends SDPA down its masked path and still
computes every cross-example block only to discard it. Here each example of a row is one causal
SDPA call over its own tokens, so attention costs sum(n_i^2) instead of L^2 and no mask exists.

Registered through transformers' attention and mask interfaces under one name; anything that
is not plain causal self-attention over whole rows (a padding mask, a KV cache, bidirectional
encoders) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEGMENTS = "tunesmith_segments"


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, (start, end) of each example: a new one starts wherever positions restart at 0."""
    starts = position_ids == 0
    starts[:, 0] = True
    bounds = []
    length = position_ids.shape[1]
    for row in starts.cpu():
        idx = row.nonzero().flatten().tolist()
        bounds.append(list(zip(idx, idx[1:] + [length])))
    return bounds


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
    if query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        # PyTorch's CPU flash-attention backward is 1.5-2x slower in bf16 than in fp32 for
        # example-sized blocks (measured in docs/benchmarks.md); q, k, v are small to cast.
        query, key, value = query.float(), key.float(), value.float()
    rows = []
    for b, row in enumerate(_segments(position_ids)):
        parts = [F.scaled_dot_product_attention(
            query[b : b + 1, :, start:end], key[b : b + 1, :, start:end], value[b : b + 1, :, start:end],
            dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa).to(dtype) for start, end in row]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


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
