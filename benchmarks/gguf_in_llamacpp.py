"""Run tunesmith's GGUF files in llama.cpp itself (through llama-cpp-python) and compare with the
transformers model they came from: tokenizer ids, logits over a text, and chat answers produced
with the chat template llama.cpp reads from the file.

llama-cpp-python ships as a source package (a ~13-minute build on 2 cores), so it lives in its
own venv, never a dependency: `python -m venv /tmp/llcpp && /tmp/llcpp/bin/pip install
llama-cpp-python numpy`. This script runs the transformers side itself and the llama.cpp side
with `--llama-python`, exchanging token ids and logits through .npy files.

Usage: python benchmarks/gguf_in_llamacpp.py EXPORT_DIR MERGED_DIR [--llama-python /tmp/llcpp/bin/python]
(EXPORT_DIR from `tunesmith export RUN --format gguf`, MERGED_DIR from `--format merged`.)
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TEXT = "The capital of France is Paris; 12 + 30 = 42. Ünïcödé, tabs\tand\nnewlines!"
PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 7 times 8?"]

LLAMA_SIDE = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, work = sys.argv[1], sys.argv[2]
job = json.load(open(f"{work}/job.json"))
llm = Llama(model_path=path, logits_all=True, n_ctx=1024, verbose=False, seed=0)
out = {"template_in_file": "tokenizer.chat_template" in llm.metadata,
       "chat_format": getattr(llm, "chat_format", None)}
out["ids"] = llm.tokenize(job["text"].encode(), add_bos=False, special=True)
ids = job["hf_ids"]
llm.reset()
llm.eval(ids)
np.save(f"{work}/llama_logits.npy", np.array(llm.scores[: len(ids)], dtype=np.float32))
answers = []
for p in job["prompts"]:
    r = llm.create_chat_completion(messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0.0,
                                   top_k=1, seed=0)
    answers.append(r["choices"][0]["message"]["content"])
out["answers"] = answers
json.dump(out, open(f"{work}/llama.json", "w"))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", type=Path)
    p.add_argument("merged_dir", type=Path)
    p.add_argument("--llama-python", default="/tmp/llcpp/bin/python")
    args = p.parse_args()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.merged_dir)
    model = AutoModelForCausalLM.from_pretrained(args.merged_dir, dtype=torch.float32).eval()
    hf_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf_logits = model(torch.tensor([hf_ids])).logits[0].numpy()
        hf_answers = []
        for prompt in PROMPTS:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
            hf_answers.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    results = {}
    for file in sorted(args.export_dir.glob("*.gguf")):
        with tempfile.TemporaryDirectory() as work:
            Path(work, "job.json").write_text(json.dumps({"text": TEXT, "hf_ids": hf_ids, "prompts": PROMPTS}))
            proc = subprocess.run([args.llama_python, "-c", LLAMA_SIDE, str(file), work], capture_output=True,
                                  text=True)
            if proc.returncode:
                raise SystemExit(f"llama.cpp side failed on {file.name}:\n{proc.stderr[-3000:]}")
            side = json.loads(Path(work, "llama.json").read_text())
            logits = np.load(Path(work, "llama_logits.npy"))
        diff = np.abs(logits - hf_logits)
        same = [a.strip() == b for a, b in zip(side["answers"], hf_answers)]
        results[file.name] = {
            "tokenizer_ids_equal": side["ids"] == hf_ids, "chat_template_in_file": side["template_in_file"],
            "logits_max_abs_diff": float(diff.max()),
            "logits_max_rel_diff": float(diff.max() / np.abs(hf_logits).max()),
            "argmax_agreement": float((logits.argmax(-1) == hf_logits.argmax(-1)).mean()),
            "chat_answers_identical": f"{sum(same)}/{len(same)}",
            "answers": [{"prompt": q, "transformers": h, "llama.cpp": a.strip()}
                        for q, h, a in zip(PROMPTS, hf_answers, side["answers"])],
        }
        r = results[file.name]
        print(f"{file.name}: tokenizer ids {'identical' if r['tokenizer_ids_equal'] else 'DIFFER'}, "
              f"logits max |diff| {r['logits_max_abs_diff']:.3g} (rel {r['logits_max_rel_diff']:.2e}), argmax "
              f"agreement {r['argmax_agreement']:.1%}, chat answers identical {r['chat_answers_identical']}",
              flush=True)
    print(json.dumps({"merged": str(args.merged_dir), "files": results}))


if __name__ == "__main__":
    sys.exit(main())
