"""`tunesmith merge` end to end on tiny saved Llamas: outputs plain transformers loads, adapters
folded first, refusals before any tensor is read, streaming shards, merge -> evaluate -> select."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tunesmith
from conftest import QA, build_tokenizer, write_jsonl
from mergekit_parity import save_models, tensors_of
from tunesmith.errors import ConfigError
from tunesmith.merging.sources import TensorSource


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return save_models(tmp_path_factory.mktemp("merge-models"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


def _quiet(message: str) -> None:
    pass


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_linear_merge_loads_in_plain_transformers_and_records_the_recipe(folders, tmp_path):
    out = tmp_path / "merged"
    result = tunesmith.merge(models=[{"model": str(folders["a"]), "parameters": {"weight": 0.7}},
                                     {"model": str(folders["b"]), "parameters": {"weight": 0.3}}],
                             method="linear", output=str(out), echo=_quiet)
    assert result.output == out
    a, b, merged = _weights(folders["a"]), _weights(folders["b"]), _weights(out)
    for name, value in merged.items():
        assert torch.allclose(value, 0.7 * a[name] + 0.3 * b[name], atol=1e-6), name
    manifest = json.loads((out / "tunesmith.json").read_text())
    assert manifest["artifact"] == "model" and manifest["merge"]["method"] == "linear"
    assert [m["parameters"]["weight"] for m in manifest["merge"]["models"]] == [0.7, 0.3]
    card = (out / "README.md").read_text()
    assert "tags:" in card and "linear" in card and "| a |" in card
    assert (out / "tokenizer.json").is_file()
    from tunesmith.artifacts import load_trained

    loaded = load_trained(out)
    ids = loaded.tokenizer("the movie was good", return_tensors="pt")["input_ids"]
    assert loaded.model(ids).logits.shape[-1] == loaded.model.config.vocab_size


def test_linear_weights_summing_to_zero_are_refused_before_any_tensor_is_written(folders, tmp_path):
    models = [{"model": str(folders["a"]), "parameters": {"weight": 1.0}},
              {"model": str(folders["b"]), "parameters": {"weight": -1.0}}]
    with pytest.raises(ConfigError, match=r"weights sum to 0 for tensor .*set normalize: false"):
        tunesmith.merge(models=models, method="linear", output=str(tmp_path / "zero"), echo=_quiet)
    assert not (tmp_path / "zero").exists()
    out = tmp_path / "difference"  # without normalize the difference of the models is what was asked for
    tunesmith.merge(models=models, method="linear", parameters={"normalize": False}, output=str(out), echo=_quiet)
    a, b, merged = _weights(folders["a"]), _weights(folders["b"]), _weights(out)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged[name], a[name] - b[name], atol=1e-6)


def test_slerp_gradient_runs_from_the_base_at_the_first_layer_to_the_model_at_the_last(folders, tmp_path):
    out = tmp_path / "slerp"
    tunesmith.merge(models=[{"model": str(folders["a"])}], base_model=str(folders["base"]), method="slerp",
                    parameters={"t": [0.0, 1.0]}, output=str(out), echo=_quiet)
    base, a, merged = _weights(folders["base"]), _weights(folders["a"]), _weights(out)
    assert torch.allclose(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(merged["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"],
                          atol=1e-6)
    # Tensors outside the layers take the gradient's first value, as mergekit does.
    assert torch.allclose(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_dare_is_reproducible_from_its_seed(folders, tmp_path):
    recipe = {"models": [{"model": str(folders["a"])}, {"model": str(folders["b"])}],
              "base_model": str(folders["base"]), "method": "dare_ties", "parameters": {"density": 0.5}}
    for name, seed in (("one", 3), ("two", 3), ("three", 4)):
        tunesmith.merge({**recipe, "seed": seed, "output": str(tmp_path / name)}, echo=_quiet)
    one, two, three = (tensors_of(tmp_path / n) for n in ("one", "two", "three"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], three[k]) for k in one)


def _lora_adapter(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                      init_lora_weights=False))  # B random: the adapter changes the weights
    model.save_pretrained(out)
    return out


def test_lora_adapters_are_folded_into_their_base_then_merged(folders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _lora_adapter(folders["base"], tmp_path / "lora", seed=1)
    messages: list[str] = []
    out = tmp_path / "ta"
    tunesmith.merge(models=[{"model": str(adapter)}], base_model=str(folders["base"]), method="task_arithmetic",
                    output=str(out), echo=messages.append)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["base"]), adapter)
    expected = {k: v for k, v in expected.merge_and_unload().state_dict().items()}
    merged = _weights(out)
    assert any(not torch.equal(expected[k], _weights(folders["base"])[k]) for k in expected)
    for name, value in merged.items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert any("folding the adapter" in m for m in messages)
    # The folded adapter is cached: a second merge (a search, say) does not fold it again.
    messages.clear()
    tunesmith.merge(models=[{"model": str(adapter)}], base_model=str(folders["base"]), method="task_arithmetic",
                    parameters={"lambda": 0.5}, output=str(tmp_path / "ta2"), echo=messages.append)
    assert not any("folding the adapter" in m for m in messages)


def _never_read(monkeypatch):
    def refuse(self, name, device="cpu"):
        raise AssertionError(f"tensor {name} was read before the refusal")

    monkeypatch.setattr(TensorSource, "read", refuse)


def _variant(folder: Path, **config) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    tok = build_tokenizer(folder)
    base = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=3,
                eos_token_id=2, bos_token_id=None)
    LlamaForCausalLM(LlamaConfig(**{**base, **config})).save_pretrained(folder)
    return folder


def test_refusals_come_before_any_tensor_is_read(folders, tmp_path, monkeypatch):
    wide = _variant(tmp_path / "wide", intermediate_size=128)
    bigger_vocab = _variant(tmp_path / "vocab", vocab_size=420)
    quantized = tmp_path / "quantized"
    shutil.copytree(folders["a"], quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    bottleneck = tmp_path / "bottleneck-run" / "adapter"
    bottleneck.mkdir(parents=True)
    (bottleneck / "tunesmith.json").write_text(json.dumps({"method": "adapter", "artifact": "adapter"}))
    _never_read(monkeypatch)
    cases = [
        ({"models": [{"model": str(folders["a"])}, {"model": str(wide)}]}, "has shape [48, 128] but a's is [48, 96]"),
        ({"models": [{"model": str(folders["a"])}, {"model": str(bigger_vocab)}]}, "vocabularies differ: a has"),
        ({"models": [{"model": str(quantized)}]}, "holds bitsandbytes weights; merging into quantized weights is lossy"),
        ({"models": [{"model": str(bottleneck.parent)}]}, "is a 'adapter' run"),
        ({"models": [{"model": str(tmp_path / "missing")}]}, "model not found"),
        ({"models": [{"model": str(folders["a"])}], "method": "ties"}, "ties needs base_model"),
    ]
    for i, (recipe, message) in enumerate(cases):
        with pytest.raises(ConfigError) as exc:
            tunesmith.merge({"method": "linear", "output": str(tmp_path / f"out{i}"), **recipe}, echo=_quiet)
        assert message in str(exc.value), (message, str(exc.value))
        assert not (tmp_path / f"out{i}").exists()


def test_vocabulary_sizes_are_named_and_a_different_architecture_refused(folders, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=48, n_layer=2, n_head=4)).save_pretrained(gpt2)
    bigger_vocab = _variant(tmp_path / "vocab", vocab_size=420)
    _never_read(monkeypatch)
    with pytest.raises(ConfigError, match="only models of one architecture merge"):
        tunesmith.merge(models=[{"model": str(folders["a"])}, {"model": str(gpt2)}], output=str(tmp_path / "o"),
                        echo=_quiet)
    with pytest.raises(ConfigError) as exc:
        tunesmith.merge(models=[{"model": str(folders["a"])}, {"model": str(bigger_vocab)}],
                        output=str(tmp_path / "o"), echo=_quiet)
    size = json.loads((folders["a"] / "config.json").read_text())["vocab_size"]
    assert f"a has {size} tokens, vocab has 420" in str(exc.value)


def test_different_tokenizers_need_a_tokenizer_source(folders, tmp_path):
    other = tmp_path / "other-tok"
    shutil.copytree(folders["b"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, different ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    models = [{"model": str(folders["a"])}, {"model": str(other), "name": "other"}]
    # Two tokens swapped ids: their embedding rows would be averaged with each other's, so no
    # tokenizer_source makes that right (tunesmith merges rows by id and does not re-align them).
    for source in (None, "other"):
        with pytest.raises(ConfigError, match=r"other's tokenizer gives 2 token\(s\) another id than a's .*"
                                              "merged by id"):
            tunesmith.merge(models=models, tokenizer_source=source, output=str(tmp_path / "o"), echo=_quiet)
    assert not (tmp_path / "o").exists()
    # A token only one tokenizer has (an added special token) moves nothing: tokenizer_source picks.
    added = tmp_path / "added-tok"
    shutil.copytree(folders["b"], added)
    tok = json.loads((added / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": len(tok["model"]["vocab"]), "content": "<|tool|>", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (added / "tokenizer.json").write_text(json.dumps(tok))
    models = [{"model": str(folders["a"])}, {"model": str(added), "name": "added"}]
    with pytest.raises(ConfigError, match="tokenizers differ .*set tokenizer_source"):
        tunesmith.merge(models=models, output=str(tmp_path / "o"), echo=_quiet)
    out = tmp_path / "picked"
    tunesmith.merge(models=models, tokenizer_source="added", output=str(out), echo=_quiet)
    assert "<|tool|>" in (out / "tokenizer.json").read_text()


def test_existing_output_is_refused_and_left_untouched(folders, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        tunesmith.merge(models=[{"model": str(folders["a"])}], output=str(out), echo=_quiet)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_streaming_writer_shards_and_indexes(tmp_path):
    from safetensors.torch import load_file

    from tunesmith.merging.streaming import StreamingWriter

    tensors = {f"w{i}": torch.randn(64, 64) for i in range(5)}
    tensors["ids"] = torch.arange(7)
    tensors["half"] = torch.randn(3, 5).to(torch.bfloat16)
    entries = [(k, list(v.shape), {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}[v.dtype])
               for k, v in tensors.items()]
    writer = StreamingWriter(tmp_path, entries, max_bytes=40_000, metadata={"format": "pt"})
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(writer.files) > 1
    loaded = {}
    for f in writer.files:
        loaded.update(load_file(str(tmp_path / f)))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_merge_peak_memory_stays_near_one_model(folders, tmp_path):
    """The inputs are never whole in memory: tensors read at once never exceed a few per input."""
    reads: list[str] = []
    original = TensorSource.read

    def counting(self, name, device="cpu"):
        reads.append(name)
        return original(self, name, device)

    import tunesmith.merging.sources as sources

    sources.TensorSource.read = counting
    try:
        tunesmith.merge(models=[{"model": str(folders["a"])}, {"model": str(folders["b"])}],
                        base_model=str(folders["base"]), method="ties", output=str(tmp_path / "m"), echo=_quiet)
    finally:
        sources.TensorSource.read = original
    # Each tensor read once per model (2 inputs + base), in order: streaming, not loading models whole.
    names = list(tensors_of(folders["base"]))
    assert len(reads) == 3 * len(names)
    assert reads[:3] == [names[0]] * 3


@pytest.fixture
def qa_task(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in QA])


def test_search_builds_scores_ranks_keeps_the_best_and_caches(folders, tmp_path, qa_task):
    out = tmp_path / "search-out"
    recipe = {"models": [{"model": str(folders["a"])}, {"model": str(folders["b"])}],
              "base_model": str(folders["base"]), "method": "linear", "output": str(out),
              "evaluate": [{"name": "qa", "data": str(qa_task), "settings": {"metrics": ["perplexity"]}}],
              "search": {"grid": {"method": ["linear", "ties"], "weight": [[1.0, 0.0], [0.5, 0.5]],
                                  "density": [0.5]}}}
    result = tunesmith.merge(recipe, echo=_quiet)
    assert len(result.candidates) == 4 and not any(r.cached for r in result.candidates)
    ppl = [r.scores["qa"]["perplexity"] for r in result.candidates]
    assert ppl == sorted(ppl)  # lower perplexity ranks first
    assert result.best == result.candidates[0].name
    assert set(result.inputs) == {"base", "a", "b"}
    # The kept model is the best candidate, whole; the others were deleted.
    best = result.candidates[0]
    rebuilt = tmp_path / "rebuilt"
    tunesmith.merge({**recipe, "search": None, "evaluate": [], "method": best.candidate.method,
                     "parameters": best.candidate.parameters,
                     "models": [{"model": str(folders[n]), "parameters": best.candidate.models.get(n, {})}
                                for n in ("a", "b")], "output": str(rebuilt)}, echo=_quiet)
    ours, theirs = tensors_of(out), tensors_of(rebuilt)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not (out / "search" / "candidates").exists()
    for name in ("report.md", "report.html", "search.json", "compare/report.md"):
        assert (out / "search" / name).is_file(), name
    report = (out / "search" / "report.md").read_text()
    assert "(kept)" in report and "a (input)" in report and "base (base)" in report
    assert "## Evaluation" in (out / "README.md").read_text()
    # A rerun scores nothing again: every candidate comes from the cache.
    again = tunesmith.merge({**recipe, "overwrite": True}, echo=_quiet)
    assert all(r.cached for r in again.candidates) and again.best == result.best


def test_search_keep_and_select_by_task(folders, tmp_path, qa_task):
    out = tmp_path / "kept"
    result = tunesmith.merge(
        {"models": [{"model": str(folders["a"])}, {"model": str(folders["b"])}], "output": str(out),
         "evaluate": [{"name": "qa", "data": str(qa_task), "settings": {"metrics": ["perplexity"]}},
                      {"name": "qa2", "data": str(qa_task), "max_samples": 3, "settings": {"metrics": ["perplexity"]}}],
         "search": {"candidates": [{"method": "linear", "name": "only-a", "models": {"b": {"weight": 0.0}}},
                                   {"method": "linear", "name": "even"}], "select": "qa2", "keep": True}},
        echo=_quiet)
    assert {p.name for p in (out / "search" / "candidates").iterdir()} == {"only-a", "even"} - {result.best}
    crit = {r.name: r.criterion for r in result.candidates}
    assert crit[result.best] == max(crit.values())
    assert crit[result.best] == -result.candidates[0].scores["qa2"]["perplexity"]


def test_cli_merge_and_merge_methods(folders, tmp_path):
    from tunesmith.cli import app

    recipe = tmp_path / "merge.yaml"
    recipe.write_text(f"models:\n  - model: {folders['a']}\n  - model: {folders['b']}\nmethod: linear\n"
                      f"output: {tmp_path / 'cli-out'}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(recipe)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli-out" / "model.safetensors").is_file()
    again = runner.invoke(app, ["merge", str(recipe)])
    text = " ".join(again.output.split())  # rich wraps long lines
    assert again.exit_code == 2 and "already exists and is not empty" in text and "Traceback" not in text
    bad = runner.invoke(app, ["merge", str(recipe), "--set", "method=ties", "--set", f"base_model={folders['base']}",
                                 "--set", "parameters.density=2"])
    assert bad.exit_code == 2 and "density must be <= 1.0" in " ".join(bad.output.split())
    listing = runner.invoke(app, ["merge-methods"])
    assert listing.exit_code == 0 and "dare_ties" in listing.output and "density" in listing.output


def test_lora_adapters_combine_in_low_rank(folders, tmp_path):
    from tunesmith.artifacts import load_trained

    one = _lora_adapter(folders["base"], tmp_path / "lora1", seed=1)
    two = _lora_adapter(folders["base"], tmp_path / "lora2", seed=2)
    models = [{"model": str(one), "parameters": {"weight": 1.0}}, {"model": str(two), "parameters": {"weight": 0.5}}]
    cat = tmp_path / "cat"
    tunesmith.merge(models=models, method="lora_combine", output=str(cat), echo=_quiet)
    assert json.loads((cat / "adapter_config.json").read_text())["r"] == 8  # the ranks add up
    assert json.loads((cat / "tunesmith.json").read_text())["merge"]["method"] == "lora_combine"
    folded = load_trained(cat).model.merge_and_unload().state_dict()
    # cat is exact: the same weights as task arithmetic over the adapters folded into full weights.
    full = tmp_path / "full"
    tunesmith.merge(models=models, base_model=str(folders["base"]), method="task_arithmetic", output=str(full),
                    echo=_quiet)
    for name, value in _weights(full).items():
        assert torch.allclose(folded[name], value, atol=1e-5), name
    svd = tmp_path / "svd"
    tunesmith.merge(models=models, method="lora_combine", parameters={"combination": "svd", "svd_rank": 2},
                    output=str(svd), echo=_quiet)
    assert json.loads((svd / "adapter_config.json").read_text())["r"] == 2
    with pytest.raises(ConfigError, match="is not a LoRA adapter or LoRA run"):
        tunesmith.merge(models=[*models, {"model": str(folders["a"])}], method="lora_combine",
                        output=str(tmp_path / "x"), echo=_quiet)
    with pytest.raises(ConfigError, match="combination ties_svd needs parameters.density"):
        tunesmith.merge(models=models, method="lora_combine", parameters={"combination": "ties_svd"},
                        output=str(tmp_path / "x"), echo=_quiet)
    with pytest.raises(ConfigError, match="takes one value per parameter"):
        tunesmith.merge(models=models, method="lora_combine", parameters={"density": [0.2, 0.5]},
                        output=str(tmp_path / "x"), echo=_quiet)


def test_evaluate_without_search_scores_the_one_merge(folders, tmp_path, qa_task):
    out = tmp_path / "scored"
    result = tunesmith.merge(models=[{"model": str(folders["a"])}, {"model": str(folders["b"])}], output=str(out),
                             evaluate=[{"name": "qa", "data": str(qa_task), "settings": {"metrics": ["perplexity"]}}],
                             echo=_quiet)
    assert len(result.candidates) == 1 and result.candidates[0].scores["qa"]["perplexity"] > 1
    manifest = json.loads((out / "tunesmith.json").read_text())
    assert manifest["evaluation"]["qa"]["perplexity"] == result.candidates[0].scores["qa"]["perplexity"]
    assert (out / "evaluation" / "report.md").is_file() and "## Evaluation" in (out / "README.md").read_text()


def test_a_hub_id_that_cannot_be_fetched_is_named(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not get 'nobody/no-such-model' from the hub"):
        tunesmith.merge(models=[{"model": str(folders["a"])}, {"model": "nobody/no-such-model"}],
                        output=str(tmp_path / "o"), echo=_quiet)
    assert not (tmp_path / "o").exists()


def test_an_output_that_holds_an_input_is_refused(folders, tmp_path):
    inside = tmp_path / "work"
    shutil.copytree(folders["a"], inside / "a")
    with pytest.raises(ConfigError, match="holds the input"):
        tunesmith.merge(models=[{"model": str(inside / "a")}], output=str(inside), overwrite=True, echo=_quiet)
    assert (inside / "a" / "model.safetensors").is_file()


def test_a_sharded_input_is_read_through_its_index(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(folders["a"]).save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(folders["a"] / "tokenizer.json", sharded)
    (sharded / "consolidated.safetensors").write_bytes((folders["b"] / "model.safetensors").read_bytes())  # stray
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "m"
    tunesmith.merge(models=[{"model": str(sharded)}, {"model": str(folders["a"])}], output=str(out), echo=_quiet)
    a, merged = _weights(folders["a"]), _weights(out)
    assert all(torch.allclose(merged[k], a[k], atol=1e-6) for k in merged)


def test_listed_search_candidates_start_from_the_recipe_parameters():
    from tunesmith.merging.spec import load_merge_spec

    spec = load_merge_spec({
        "models": [{"model": "a"}, {"model": "b"}], "base_model": "base", "method": "ties",
        "parameters": {"density": 0.3, "lambda": 0.5},
        "evaluate": [{"name": "qa", "data": "qa.jsonl"}],
        "search": {"candidates": [{"method": "ties"}, {"method": "ties", "parameters": {"density": 0.7}}],
                   "grid": {"method": ["ties"]}}})
    listed, own, grid = spec.candidates()
    assert listed.parameters == {"density": 0.3, "lambda": 0.5} == grid.parameters
    assert own.parameters == {"density": 0.7, "lambda": 0.5}


def test_the_base_listed_under_another_spelling_is_not_an_input(folders, tmp_path):
    from tunesmith.merging.spec import load_merge_spec

    base = folders["base"]
    spec = load_merge_spec({"models": [{"model": f"{base}/"}, {"model": str(folders["a"])},
                                       {"model": str(folders["b"])}],
                            "base_model": str(base), "method": "task_arithmetic"})
    assert [m.model for m in spec.inputs] == [str(folders["a"]), str(folders["b"])]
    recipe = tmp_path / "merge.yaml"  # in a YAML, relative spellings resolve against its folder
    (tmp_path / "models").symlink_to(base.parent)
    recipe.write_text(f"models:\n  - model: ./models/{base.name}\n  - model: {folders['a']}\n  - model: {folders['b']}\n"
                      f"base_model: models/{base.name}/\nmethod: task_arithmetic\n")
    assert len(load_merge_spec(recipe).inputs) == 2


def test_cli_overrides_apply_with_output_flag(folders, tmp_path):
    from tunesmith.cli import app

    recipe = tmp_path / "slerp.yaml"
    recipe.write_text(f"models:\n  - model: {folders['a']}\nbase_model: {folders['base']}\nmethod: slerp\n")
    out = tmp_path / "slerp-out"
    result = CliRunner().invoke(app, ["merge", str(recipe), "--set", "parameters.t=0.5", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
