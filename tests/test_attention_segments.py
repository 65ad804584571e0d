"""Per-example attention for packed rows: same numbers as transformers' block mask, no mask built."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import sdpa_llama
from tunesmith.attention import SEGMENTS, use_segment_attention


@pytest.fixture
def pair():
    ref = sdpa_llama()
    ours = sdpa_llama()
    ours.load_state_dict(ref.state_dict())
    assert use_segment_attention(ours) and ours.config._attn_implementation == SEGMENTS
    return ref, ours


def test_packed_row_matches_transformers_block_mask_with_gradients(pair):
    ref, ours = pair
    ids = torch.randint(0, 100, (1, 24))
    pos = torch.tensor([list(range(5)) + list(range(12)) + list(range(7))])
    grads = []
    for model in (ref, ours):
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        (logits * torch.linspace(-1, 1, 100)).sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-5)


def test_examples_of_packed_rows_see_only_themselves_at_any_batch_size(pair):
    _, ours = pair
    ours.eval()
    ids = torch.randint(0, 100, (2, 16))
    pos = torch.tensor([list(range(6)) + list(range(10)), list(range(3)) + list(range(13))])
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = [ours(input_ids=ids[0:1, :6]).logits, ours(input_ids=ids[0:1, 6:]).logits,
                 ours(input_ids=ids[1:2, :3]).logits, ours(input_ids=ids[1:2, 3:]).logits]
    for got, want in zip((packed[0:1, :6], packed[0:1, 6:], packed[1:2, :3], packed[1:2, 3:]), alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padding_mask_and_generation_use_transformers_sdpa(pair):
    ref, ours = pair
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as in batched generation
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[0, 4:],
                                   ref(input_ids=ids, attention_mask=mask).logits[0, 4:], rtol=1e-5, atol=1e-5)
        a = ref.generate(ids[1:], max_new_tokens=5, do_sample=False)
        b = ours.generate(ids[1:], max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_saved_model_loads_with_plain_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    _, ours = pair
    ours.save_pretrained(tmp_path)
    assert SEGMENTS not in (tmp_path / "config.json").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path)  # no custom attention name needed


def test_training_runs_use_segment_attention(run_config):
    import tunesmith
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model

    cfg = run_config()
    model = load_model(ModelConfig(name_or_path=cfg["model"]["name_or_path"]), torch.float32)
    assert model.config._attn_implementation == SEGMENTS
    explicit = load_model(ModelConfig(name_or_path=cfg["model"]["name_or_path"], attn_implementation="eager"),
                          torch.float32)
    assert explicit.config._attn_implementation == "eager"
    assert json.loads(json.dumps(tunesmith.train(cfg, echo=lambda m: None).metrics))["loss"] > 0


def test_continuation_runs_see_their_shared_prompt_and_themselves_only(pair):
    """[prompt, a1, a2 at the prompt's length, a3 likewise][prompt', b1, b2]: each answer's logits and the
    gradients of a loss on them equal those of prompt + answer run as its own row (the dense reference)."""
    ref, ours = pair
    torch.manual_seed(1)
    prompts = [torch.randint(0, 100, (5,)), torch.randint(0, 100, (4,))]
    answers = [[torch.randint(0, 100, (n,)) for n in (4, 3, 6)], [torch.randint(0, 100, (n,)) for n in (1, 2)]]
    tokens, positions, spans = [], [], []
    for prompt, group in zip(prompts, answers):
        tokens.append(prompt)
        positions += range(len(prompt))
        for answer in group:
            start = sum(len(t) for t in tokens)
            tokens.append(answer)
            positions += range(len(prompt), len(prompt) + len(answer))
            spans.append((start, len(answer)))
    ids = torch.cat(tokens)[None]
    pos = torch.tensor([positions])
    weights = torch.linspace(-1, 1, 100)

    packed = ours(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    got = [packed[start:start + n] for start, n in spans]
    (sum((g * weights).sum() for g in got)).backward()
    got_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}

    alone = []
    for prompt, group in zip(prompts, answers):
        for answer in group:
            logits = ref(input_ids=torch.cat([prompt, answer])[None], use_cache=False).logits[0, len(prompt):]
            alone.append(logits)
    (sum((a * weights).sum() for a in alone)).backward()
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-5)


def test_segments_read_restarts_and_continuations():
    from tunesmith.attention import _segments

    # Packed examples as before: positions restart at 0.
    assert _segments(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [[(0, 3, -1, 0), (3, 5, -1, 0), (5, 9, -1, 0)]]
    # Two continuations of a 3-token prompt (the first answer follows it), then a new example.
    assert _segments(torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5, 3, 0, 1]])) == [
        [(0, 5, -1, 0), (5, 8, 0, 3), (8, 9, 0, 3), (9, 11, -1, 0)]]
    # A jump past anything its example has seen is not a continuation (stays inside, as before).
    assert _segments(torch.tensor([[0, 1, 5, 6, 0, 1]])) == [[(0, 4, -1, 0), (4, 6, -1, 0)]]


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
def test_cpu_bf16_autocast_runs_the_attention_kernel_in_fp32(pair, monkeypatch, weights):
    """q, k, v reach PyTorch's CPU flash kernel in fp32 under bf16 autocast, whatever mix they arrive in.

    Under bf16 autocast `scaled_dot_product_attention` is a lower-precision op: without the
    autocast guard the kernel ran in bf16, whose backward is ~3x slower (docs/benchmarks.md).
    Over fp32 weights q and k arrive in fp32 (rotary embeddings promote them) and v in bf16.
    """
    import tunesmith.attention as attention

    _, ours = pair
    seen = []
    real = attention.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        out = real(q, k, v, **kwargs)
        seen.append((q.dtype, out.dtype))
        return out

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 100, (1, 12))
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ours.to(weights)(input_ids=ids, position_ids=pos, use_cache=False).logits
    logits.float().sum().backward()
    assert seen and all(q == torch.float32 and out == torch.float32 for q, out in seen)
    assert logits.dtype == torch.bfloat16


def test_segments_are_read_once_per_forward_and_again_when_positions_change(pair, monkeypatch):
    # On a GPU every read of the positions waits for the device; the layers share one position_ids tensor.
    import tunesmith.attention as attention

    _, ours = pair
    calls = []
    real = attention._segments
    monkeypatch.setattr(attention, "_segments", lambda pos: calls.append(pos.tolist()) or real(pos))
    ids = torch.randint(0, 100, (1, 12))
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        first = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert len(calls) == 1 and ours.config.num_hidden_layers > 1
        pos[0, 5:] = torch.arange(5, 12)  # in place: now one 12-token example
        whole = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert len(calls) == 2 and calls[1] == [list(range(12))]
        alone = ours(input_ids=ids).logits
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole[:, 5:], first[:, 5:], atol=1e-3)


def test_packed_rows_run_under_inference_mode(pair):
    # Inference tensors carry no version counter; their segments are read on every layer.
    _, ours = pair
    ids = torch.randint(0, 100, (1, 12))
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        want = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
    with torch.inference_mode():
        got = ours(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits
    torch.testing.assert_close(got, want)
