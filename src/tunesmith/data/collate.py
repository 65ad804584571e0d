"""Turn rows into padded tensors."""

from __future__ import annotations

import torch

from .templates import IGNORE


class Collator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        packed = "position_ids" in rows[0]
        ids, labels, extra = [], [], []
        for r in rows:
            pad = longest - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_token_id] * pad)
            labels.append(r["labels"] + [IGNORE] * pad)
            if packed:
                # Padding forms its own segment (positions restart), so nothing attends to it.
                extra.append(r["position_ids"] + list(range(pad)))
            else:
                extra.append([1] * len(r["input_ids"]) + [0] * pad)
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        key = "position_ids" if packed else "attention_mask"
        batch[key] = torch.tensor(extra)
        return batch
