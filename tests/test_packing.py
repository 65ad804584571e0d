"""Packing must be invisible to the loss: a packed example scores exactly as it does alone."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.collate import Collator
from tunesmith.data.packing import pack, unpacked_rows
from tunesmith.data.templates import IGNORE, Encoded
from tunesmith.objectives import OBJECTIVES, StepContext

SFT = OBJECTIVES["sft"]()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def pad_id(tiny_tokenizer) -> int:
    return tiny_tokenizer.pad_token_id


def _example(seed: int, n: int, n_prompt: int) -> Encoded:
    """A synthetic example: n tokens, the first n_prompt masked like a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (n,), generator=g).tolist()
    return Encoded(ids, [IGNORE] * n_prompt + ids[n_prompt:])


EXAMPLES = [_example(0, 9, 3), _example(1, 17, 5), _example(2, 5, 1)]


def _loss(model, batch) -> tuple[float, int]:
    with torch.no_grad():
        out = SFT.loss(StepContext(model), batch)
    return out.loss_sum.item(), out.n_tokens


def _alone(model, pad_id, ex: Encoded) -> tuple[float, int]:
    return _loss(model, Collator(pad_id)(unpacked_rows([ex])))


def _segments(row: dict) -> list[tuple[int, int]]:
    """(start, end) of each packed example, read back from the restarting position ids."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return list(zip(starts[:-1], starts[1:]))


def test_pack_puts_all_examples_in_one_row_with_restarting_positions():
    rows = pack(EXAMPLES, max_length=64)
    assert len(rows) == 1
    row = rows[0]
    assert row["input_ids"] == sum((e.input_ids for e in EXAMPLES), [])
    assert _segments(row) == [(0, 9), (9, 26), (26, 31)]
    # Each example's first token is never predicted from the previous example.
    for start, _ in _segments(row):
        assert row["labels"][start] == IGNORE


def test_pack_respects_max_length():
    rows = pack(EXAMPLES, max_length=20)
    assert all(len(r["input_ids"]) <= 20 for r in rows)
    assert sorted(len(r["input_ids"]) for r in rows) == [14, 17]  # 17 alone; 9 + 5 together


def test_packed_loss_equals_per_example_loss(model, pad_id):
    row = pack(EXAMPLES, max_length=64)[0]
    batch = Collator(pad_id)([row])
    assert "attention_mask" not in batch  # the mask comes from the position ids
    total, n_total = _loss(model, batch)

    alone = [_alone(model, pad_id, ex) for ex in EXAMPLES]
    assert n_total == sum(n for _, n in alone)
    assert total == pytest.approx(sum(s for s, _ in alone), abs=1e-4)

    # Per example: score each segment of the packed row on its own labels.
    for (start, end), (expected, n) in zip(_segments(row), alone):
        labels = torch.full_like(batch["labels"], IGNORE)
        labels[0, start:end] = batch["labels"][0, start:end]
        got, n_got = _loss(model, {**batch, "labels": labels})
        assert n_got == n
        assert got == pytest.approx(expected, abs=1e-5)


def test_no_cross_contamination_inside_packed_row(model, pad_id):
    row = pack(EXAMPLES, max_length=64)[0]
    changed = dict(row, input_ids=list(row["input_ids"]))
    start, end = _segments(row)[0]
    changed["input_ids"][start:end] = [(t + 7) % 300 + 10 for t in row["input_ids"][start:end]]
    collate = Collator(pad_id)

    def logits(r: dict) -> torch.Tensor:
        inputs = {k: v for k, v in collate([r]).items() if k != "labels"}
        # As in the objective: with a KV cache transformers ignores the packed position ids.
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits

    a, b = logits(row), logits(changed)
    # Example 1 itself does change (guards against a vacuous test)...
    assert not torch.allclose(a[0, start:end], b[0, start:end])
    # ...but examples 2 and 3 see nothing of it.
    torch.testing.assert_close(a[0, end:], b[0, end:], rtol=0, atol=1e-5)


def test_padding_does_not_change_the_loss_unpacked(model, pad_id):
    collate = Collator(pad_id)
    batch = collate(unpacked_rows(EXAMPLES))
    assert batch["input_ids"].shape == (3, 17)
    assert (batch["attention_mask"].sum(1) == torch.tensor([9, 17, 5])).all()
    padded, n = _loss(model, batch)
    alone = [_alone(model, pad_id, ex) for ex in EXAMPLES]
    assert n == sum(k for _, k in alone)
    assert padded == pytest.approx(sum(s for s, _ in alone), abs=1e-4)


def test_padding_does_not_change_the_loss_packed(model, pad_id):
    rows = pack(EXAMPLES, max_length=20)  # two rows of different length: one gets padded
    collate = Collator(pad_id)
    together, n = _loss(model, collate(rows))
    separately = [_loss(model, collate([r])) for r in rows]
    assert n == sum(k for _, k in separately)
    assert together == pytest.approx(sum(s for s, _ in separately), abs=1e-4)
