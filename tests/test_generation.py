"""The generation helper: completions cut after their end token, truncation marked, padding that changes
nothing, the model's mode restored, seeded sampling reproducible."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tunesmith.generation import generate_ids


class ScriptedModel(torch.nn.Module):
    """A stand-in whose generate appends scripted tokens, so the cutting rules are checked exactly."""

    def __init__(self, continuations: list[list[int]]):
        super().__init__()
        self.continuations = continuations
        self.config = SimpleNamespace(is_encoder_decoder=False)
        self.generation_config = SimpleNamespace(eos_token_id=[7, 8])
        self.device = torch.device("cpu")
        self.seen: dict = {}

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        self.seen = {"input_ids": input_ids, "attention_mask": attention_mask, "training": self.training, **kwargs}
        new = torch.tensor([c[:max_new_tokens] for c in self.continuations])
        return torch.cat([input_ids, new], dim=1)


def test_completions_end_at_the_first_stop_token_or_are_marked_truncated():
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=9)
    model = ScriptedModel([[5, 8, 0, 0], [4, 4, 4, 4], [9, 0, 0, 0]])
    model.train()
    out = generate_ids(model, tok, [[1, 2, 3], [1], [2, 2]], max_new_tokens=4)
    assert out.completion_ids == [[5, 8], [4, 4, 4, 4], [9]]
    assert out.truncated == [False, True, False]
    # Left padding for a decoder: the prompts end at the right edge.
    assert model.seen["input_ids"].tolist() == [[1, 2, 3], [0, 0, 1], [0, 2, 2]]
    assert model.seen["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert model.seen["training"] is False and model.training  # generated in eval mode, restored after


def test_padding_does_not_change_a_greedy_completion(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    short = tiny_tokenizer("the movie")["input_ids"]
    long = tiny_tokenizer("you will like this movie it is great and good")["input_ids"]
    alone = generate_ids(model, tiny_tokenizer, [short], max_new_tokens=6)
    batched = generate_ids(model, tiny_tokenizer, [long, short], max_new_tokens=6)
    assert batched.completion_ids[1] == alone.completion_ids[0]
    assert batched.prompt_ids == [long, short]


def test_seeded_sampling_repeats(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = [tiny_tokenizer("the movie")["input_ids"]] * 4

    def sample(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        return generate_ids(model, tiny_tokenizer, prompt, max_new_tokens=8, do_sample=True, top_k=0).completion_ids

    first = sample(3)
    assert sample(3) == first
    assert len({tuple(c) for c in first}) > 1  # four samples of one prompt differ: it did sample
    assert sample(4) != first


@pytest.mark.parametrize("bad", [0])
def test_max_new_tokens_must_be_positive(tiny_model_dir, tiny_tokenizer, bad):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, tiny_tokenizer, [[1, 2]], max_new_tokens=bad)


@pytest.mark.parametrize("sample", [False, True])
def test_copies_of_a_prompt_are_prefilled_once_with_the_same_completions(tiny_model_dir, tiny_tokenizer, monkeypatch,
                                                                         sample):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import tunesmith.generation as generation

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    short = tiny_tokenizer("the movie")["input_ids"]
    long = tiny_tokenizer("you will like this movie it is great and good")["input_ids"]
    prompts = [long] * 3 + [short] * 3  # two groups of three copies, left-padded to different lengths
    prefills = []
    real = generation._shared_prefill

    def spy(model, ids, mask, repeats):
        prefills.append((ids.shape[0], repeats))
        return real(model, ids, mask, repeats)

    def run() -> list[list[int]]:
        torch.manual_seed(5)
        return generate_ids(model, tiny_tokenizer, prompts, max_new_tokens=8, do_sample=sample, top_k=0,
                            temperature=0.8).completion_ids

    monkeypatch.setattr(generation, "_shared_prefill", spy)
    shared = run()
    assert prefills == [(6, 3)]
    monkeypatch.setattr(generation, "_repeats", lambda chunk: 1)
    assert run() == shared
    assert len(prefills) == 1  # the second run computed every copy's prompt
    if sample:
        assert len({tuple(c) for c in shared[:3]}) > 1  # the copies were sampled apart


def test_only_runs_of_equal_prompts_share_a_prefill():
    from tunesmith.generation import _repeats

    assert _repeats([[1, 2]] * 4) == 4
    assert _repeats([[1], [1], [2], [2]]) == 2
    assert _repeats([[1], [1], [2]]) == 1  # runs of unequal length
    assert _repeats([[1], [2], [1], [2]]) == 1  # equal prompts not next to each other
    assert _repeats([[1]]) == 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.3, 4, 0.7)])
def test_drawn_tokens_follow_transformers_warped_distribution(temperature, top_k, top_p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from tunesmith.generation import DrawToken

    torch.manual_seed(0)
    row = torch.randn(1, 10) * 2
    warped = TemperatureLogitsWarper(temperature)(None, row.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = warped.softmax(-1)[0]
    draw = DrawToken(temperature, top_k, top_p)
    n = 20_000
    out = draw(None, row.expand(n, -1).contiguous())
    assert bool((out.isfinite().sum(-1) == 1).all())  # greedy search picks exactly the drawn token
    tokens = out.argmax(-1)
    freq = torch.bincount(tokens, minlength=10).float() / n
    assert bool((freq[expected == 0] == 0).all())  # nothing outside the kept set is ever drawn
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)


def test_merged_adapters_give_the_same_greedy_completions(tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.fused_lora import FusedLoraLinear

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)  # make the adapter change the completions
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("the movie", "you will like this")]
    plain = generate_ids(model, tiny_tokenizer, prompts, max_new_tokens=8)
    with model.disable_adapter():
        base = generate_ids(model, tiny_tokenizer, prompts, max_new_tokens=8)
    merged = generate_ids(model, tiny_tokenizer, prompts, max_new_tokens=8, merged_adapters=True)
    assert plain.completion_ids != base.completion_ids  # the adapter matters here
    assert merged.completion_ids == plain.completion_ids
    assert all(m._merged_weight is None for m in model.modules() if isinstance(m, FusedLoraLinear))


def test_the_models_generation_config_does_not_reshape_the_distribution(tiny_model_dir, tiny_tokenizer):
    """A config's repetition penalty, n-gram ban, suppressed tokens or beams must not change what is drawn:
    completions are scored under softmax(logits / T) alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = [tiny_tokenizer("the movie the movie the movie")["input_ids"]] * 2
    plain = generate_ids(model, tiny_tokenizer, prompt, max_new_tokens=10)
    torch.manual_seed(5)
    sampled = generate_ids(model, tiny_tokenizer, prompt, max_new_tokens=10, do_sample=True, top_k=0)
    first = plain.completion_ids[0]
    model.generation_config.update(repetition_penalty=50.0, no_repeat_ngram_size=1, num_beams=3,
                                   suppress_tokens=[first[0]], min_new_tokens=10)
    assert generate_ids(model, tiny_tokenizer, prompt, max_new_tokens=10).completion_ids == plain.completion_ids
    torch.manual_seed(5)
    again = generate_ids(model, tiny_tokenizer, prompt, max_new_tokens=10, do_sample=True, top_k=0)
    assert again.completion_ids == sampled.completion_ids
