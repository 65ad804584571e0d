"""The scoring core: fused LM head + cross-entropy against the plain logits path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import sdpa_llama
from tunesmith import attention, scoring
from tunesmith.data.templates import IGNORE
from tunesmith.scoring import labelled_nll, linear_cross_entropy


def _plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")


@pytest.mark.parametrize("weight_trains", [False, True])
def test_fused_head_matches_plain_in_fp32_with_gradients(monkeypatch, weight_trains):
    # Chunks of 7 rows over 30: the last chunk is partial.
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 7 * 50)
    torch.manual_seed(0)
    h = torch.randn(30, 16, dtype=torch.float64).float()
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (30,))
    upstream = torch.rand(30) * 3 - 1  # per-token gradients, not just a sum
    results = []
    for fn in (_plain, linear_cross_entropy):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(weight_trains)
        nll = fn(hh, ww, y)
        (nll * upstream).sum().backward()
        results.append((nll.detach(), hh.grad, ww.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-5, atol=1e-6)
    else:
        assert results[1][2] is None


def test_fused_head_under_bf16_autocast_matches_autocast_plain_path():
    torch.manual_seed(1)
    h = torch.randn(40, 32)
    w = (torch.randn(300, 32) * 0.3).bfloat16()  # frozen bf16 head, as with bf16 weights
    y = torch.randint(0, 300, (40,))
    results = []
    for fn in (_plain, linear_cross_entropy):
        hh = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = fn(hh, w, y)
        assert nll.dtype == torch.float32
        nll.sum().backward()
        results.append((nll.detach(), hh.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-2, atol=2e-3)


def test_fused_head_without_gradients_keeps_no_buffers():
    h, w, y = torch.randn(5, 8), torch.randn(20, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        nll = linear_cross_entropy(h, w, y)
    assert nll.grad_fn is None
    torch.testing.assert_close(nll, _plain(h, w, y))
    assert linear_cross_entropy(h[:0], w, y[:0]).shape == (0,)


def test_labelled_nll_of_a_model_matches_full_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(4, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE
    labels[1, 9:] = IGNORE
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    nll = labelled_nll(model, {"input_ids": ids, "attention_mask": mask}, labels)
    nll.sum().backward()
    fused_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none",
                          ignore_index=IGNORE)[targets.reshape(-1) != IGNORE]
    ref.sum().backward()
    assert nll.shape == ref.shape == (int((targets != IGNORE).sum()),)
    torch.testing.assert_close(nll.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    # Tied embeddings: the head's gradient and the input embedding's meet in one tensor.
    torch.testing.assert_close(fused_grad, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_no_labelled_token_still_backpropagates(tiny_model_dir, monkeypatch, fused):
    """A micro-batch whose completions are all masked (GRPO's mask_truncated_completions) scores no
    token; the empty result must stay on the graph on both paths, or backward fails for want of a grad_fn."""
    from transformers import AutoModelForCausalLM

    from tunesmith import scoring

    if not fused:  # what DDP wrappers, logit soft-capping or prompt tuning take
        monkeypatch.setattr(scoring, "head_and_backbone", lambda model: None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(4, model.config.vocab_size, (2, 6))
    nll, ent, _ = scoring.labelled_scores(model, {"input_ids": ids}, torch.full_like(ids, IGNORE), entropy=True)
    assert nll.shape == ent.shape == (0,) and nll.requires_grad
    (nll.sum() * 2).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_temperature_and_entropy_match_on_the_fused_and_plain_paths(tiny_model_dir, monkeypatch):
    """Online RL scores tokens under softmax(logits / T): both paths give the same log-probs, gradients and
    entropies, and they equal a direct computation from the full logits."""
    from transformers import AutoModelForCausalLM

    from tunesmith.scoring import labelled_nll_and_entropy

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[1, 7:] = IGNORE
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    logits = model(**inputs).logits[:, :-1].float() / 0.7
    mask = labels[:, 1:] != IGNORE
    logp = torch.log_softmax(logits, -1)
    expected_nll = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)[mask]
    expected_entropy = -(logp.exp() * logp).sum(-1)[mask]
    grads = []
    for fused in (True, False):
        model.zero_grad()
        if not fused:  # the plain logits path, as for heads the fused function cannot take
            monkeypatch.setattr(scoring, "head_and_backbone", lambda m: None)
        nll, entropy = labelled_nll_and_entropy(model, inputs, labels, temperature=0.7, entropy=True)
        torch.testing.assert_close(nll.detach(), expected_nll.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, expected_entropy.detach(), rtol=1e-5, atol=1e-5)
        assert not entropy.requires_grad
        nll.sum().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def _rows_with_shared_prompts():
    """Right-padded prompt + answer rows: three answers to prompt A, one to B, one to A after it, one with
    nothing labelled (a masked truncated completion)."""
    torch.manual_seed(3)
    a, b = torch.randint(5, 100, (6,)).tolist(), torch.randint(5, 100, (4,)).tolist()
    rows = [(a, 5), (a, 2), (a, 7), (b, 3), (a, 1), (b, 0)]
    width = max(len(p) + n + 1 for p, n in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (prompt, n) in enumerate(rows):
        seq = prompt + torch.randint(5, 100, (max(n, 2),)).tolist()
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(prompt):len(prompt) + n] = ids[i, len(prompt):len(prompt) + n]
    return {"input_ids": ids, "attention_mask": mask}, labels


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    from tunesmith.attention import use_segment_attention

    model = sdpa_llama()
    assert use_segment_attention(model)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def test_shared_prompts_score_like_separate_rows_with_gradients(monkeypatch):
    model = _lora_llama()
    inputs, labels = _rows_with_shared_prompts()
    packed = []

    def spy(*args):
        packed.append(attention.shared_prompt_rows(*args))
        return packed[-1]

    monkeypatch.setattr(scoring, "shared_prompt_rows", spy)
    upstream = torch.linspace(-1, 2, int((labels[:, 1:] != IGNORE).sum()))
    results = []
    for share in (False, True):
        model.zero_grad()
        nll, ent, states = scoring.labelled_scores(model, inputs, labels, temperature=0.7, entropy=True, hidden=True,
                                                   share_prompts=share)
        ((nll * upstream).sum() + states.pow(2).mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((nll.detach(), ent, states.detach(), grads))
    assert len(packed) == 1 and packed[0] is not None  # the shared layout ran (share_prompts=False never asks)
    for got, want in zip(results[1][:3], results[0][:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert results[0][3] and results[0][3].keys() == results[1][3].keys()
    for name, g in results[0][3].items():
        torch.testing.assert_close(results[1][3][name], g, rtol=1e-4, atol=1e-6)


def test_shared_prompt_rows_runs_each_prompt_once_and_refuses_other_shapes():
    from tunesmith.attention import shared_prompt_rows

    inputs, labels = _rows_with_shared_prompts()
    packed, index = shared_prompt_rows(inputs, labels)
    assert packed["input_ids"].shape[1] == 6 + (5 + 2 + 7 + 1) + 4 + 3  # two prompts, every labelled answer
    assert len(index) == int((labels[:, 1:] != IGNORE).sum())
    gap = labels.clone()
    gap[0, 8] = IGNORE  # a hole inside a labelled run: not prompt + one answer
    assert shared_prompt_rows(inputs, gap) is None
    left = {**inputs, "attention_mask": inputs["attention_mask"].flip(1)}
    assert shared_prompt_rows(left, labels) is None  # left padding
    assert shared_prompt_rows({**inputs, "token_type_ids": inputs["input_ids"]}, labels) is None


@pytest.mark.parametrize(("device", "vocab", "rows_per_chunk"),
                         [("cpu", 128256, 65), ("cpu", 49152, 170), ("cuda", 128256, 1024), ("cuda", 49152, 2688),
                          ("cuda:1", 8_000_000, 64)])
def test_head_chunks_are_sized_for_the_device(device, vocab, rows_per_chunk):
    # CPU chunks stay within glibc's heap-served blocks; an accelerator's are ~2**27 logits in whole 64-row tiles.
    chunks = scoring._chunks(5000, vocab, device)
    assert chunks[0] == slice(0, rows_per_chunk)
    assert [c.start for c in chunks] == list(range(0, 5000, rows_per_chunk)) and chunks[-1].stop == 5000
