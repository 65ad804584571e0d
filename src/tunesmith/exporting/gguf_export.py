"""`export --format gguf`: fold the run into its base, write one GGUF per type, check each file
by loading it back with transformers' GGUF loader, and leave an Ollama Modelfile beside them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, TunesmithError
from .gguf_file import TYPES, check_type, gguf_pre_of, plan, write_gguf
from .merged import check_foldable, check_output, fold_into, source_folder

# Largest |logit difference| / largest |logit| the loaded-back file may show against the model,
# per type: f32 must be the same model; the others are bounded by their rounding, measured on
# SmolLM2-135M and tiny models (docs/deploy.md) with room for other weights.
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2, "q8_0": 0.1, "q5_1": 0.2, "q5_0": 0.2, "q4_1": 0.4,
             "q4_0": 0.4}
# Types whose greedy generations must equal the model's token for token.
EXACT_GENERATIONS = ("f32", "f16")
CHECK_TEXT = "The capital of France is Paris; 12 + 30 = 42. Ünïcödé, tabs\tand\nnewlines!"
CHECK_PROMPTS = ("What is the capital of France?", "Write a haiku about autumn.", "What is 7 times 8?",
                 "Name three colors.")


class ExportCheckError(TunesmithError):
    """A written file does not reproduce the model within its tolerance."""


def export_gguf(source: str | Path, output: Path, *, types: tuple[str, ...] = ("f16",), verify: bool = True,
                overwrite: bool = False, echo: Callable[[str], None] = print) -> Path:
    for t in types:
        check_type(t)
    if len(set(types)) != len(types):
        raise ConfigError(f"--type: {', '.join(types)} names a type twice")
    found = check_foldable(source)
    check_output(output, overwrite)
    described = source_folder(source, found)
    pre = _base_pre(found)
    if described is not None:
        plan(described, pre)  # refuses an unmapped architecture or tokenizer before any work
        _check_disk(described, output, types)
    name = Path(str(source)).expanduser().resolve().name if Path(str(source)).expanduser().exists() \
        else str(source).replace("/", "-")
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = tmp / ".merged"
    merged.mkdir(parents=True)
    try:
        echo(f"folding {source} into its base")
        import torch

        manifest = fold_into(source, merged, dtype=torch.float32)
        plan(merged, pre)
        report = {"source": str(source), "files": {}}
        for t in types:
            file = tmp / f"{name}-{t}.gguf"
            echo(f"writing {file.name}")
            counts = write_gguf(merged, file, t, pre=pre, name=name)
            entry = {"bytes": file.stat().st_size, "tensors": counts}
            if verify:
                echo(f"checking {file.name} against the model (transformers' GGUF loader)")
                entry["check"] = check_file(file, merged, t)
            report["files"][file.name] = entry
        first = f"{name}-{types[0]}.gguf"
        (tmp / "Modelfile").write_text(modelfile(first, merged))
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(manifest, str(source), report))
        shutil.rmtree(merged)
        if output.exists():
            shutil.rmtree(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for file, entry in report["files"].items():
        check = entry.get("check")
        echo(f"{file}: {entry['bytes'] / 2**20:.1f} MiB" + (
            f", tokenizer ids {'same' if check['tokenizer_ids_equal'] else 'DIFFERENT'}, logits max rel diff "
            f"{check['logits_max_rel_diff']:.2e} (tolerance {check['tolerance']:.0e}), greedy generations "
            f"{check['generations_equal']}/{check['generations']} identical" if check else ""))
    failed = [f for f, e in report["files"].items() if e.get("check") and not e["check"]["passed"]]
    if failed:
        raise ExportCheckError(f"gguf: {', '.join(failed)} in {output} did not reproduce the model within "
                               f"tolerance (see {output / 'export.json'}); the files are kept for inspection")
    echo(f"GGUF export: {output} (ollama create NAME -f {output / 'Modelfile'})")
    return output


def _base_pre(found: Path | None) -> str | None:
    """A run on a GGUF base keeps the pre-tokenizer name its base file stated (its tokenizer came from there)."""
    if found is None:
        return None
    from ..artifacts import MANIFEST
    from ..config import ModelConfig
    from ..models import resolve_source

    manifest = json.loads((found / MANIFEST).read_text())
    if not manifest.get("base_gguf_file"):
        return None
    try:
        folder, file = resolve_source(ModelConfig(name_or_path=manifest["base_model"],
                                                  gguf_file=manifest["base_gguf_file"]))
    except ConfigError:
        return None
    return gguf_pre_of(Path(folder) / file)


def _check_disk(described: Path, output: Path, types: tuple[str, ...]) -> None:
    from .merged import free_space

    weights = sum(f.stat().st_size for f in described.glob("*.safetensors"))
    config = json.loads((described / "config.json").read_text())
    fp32 = weights * (2 if str(config.get("dtype") or config.get("torch_dtype")) in ("bfloat16", "float16") else 1)
    need = fp32 + sum(fp32 * TYPES[t][2] for t in types)  # the folded fp32 copy lives beside the files until done
    probe, free = free_space(output)
    if need > free:
        raise ConfigError(f"output: the export needs about {need / 2**30:.2f} GiB (an fp32 copy while writing, "
                          f"then {', '.join(types)}) but {probe} has {free / 2**30:.2f} GiB free (nothing was written)")


def check_file(file: Path, reference: Path, type_name: str) -> dict:
    """Load `file` back with transformers' GGUF loader and compare it with the model in `reference`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quiet import held_load_report, no_progress_bars

    with no_progress_bars(), held_load_report():
        tok = AutoTokenizer.from_pretrained(reference)
        tok_g = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
        model_g = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    texts = [CHECK_TEXT] + [_prompt(tok, p) for p in CHECK_PROMPTS]
    ids_equal = all(tok(t)["input_ids"] == tok_g(t)["input_ids"] for t in texts)
    worst, top, agree, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            a, b = model(ids).logits[0], model_g(ids).logits[0]
            worst = max(worst, (a - b).abs().max().item())
            top = max(top, a.abs().max().item())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
        same = 0
        samples = []
        for p in CHECK_PROMPTS:
            ids = tok(_prompt(tok, p), return_tensors="pt")["input_ids"]
            kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            out = model.generate(ids, **kwargs)[0, ids.shape[1]:]
            out_g = model_g.generate(ids, **kwargs)[0, ids.shape[1]:]
            same += int(torch.equal(out, out_g))
            samples.append({"prompt": p, "model": tok.decode(out, skip_special_tokens=True),
                            "gguf": tok.decode(out_g, skip_special_tokens=True)})
    rel = worst / max(top, 1e-12)
    tolerance = TOLERANCE[type_name]
    passed = ids_equal and rel <= tolerance and (type_name not in EXACT_GENERATIONS or same == len(CHECK_PROMPTS))
    return {"tokenizer_ids_equal": ids_equal, "logits_max_abs_diff": worst, "logits_max_rel_diff": rel,
            "tolerance": tolerance, "argmax_agreement": agree / total, "generations": len(CHECK_PROMPTS),
            "generations_equal": same, "samples": samples, "passed": passed}


def _prompt(tok, text: str) -> str:
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    return text


def modelfile(gguf_name: str, folder: Path) -> str:
    """An Ollama Modelfile: the file, and for ChatML models the template and stop token spelled out
    (Ollama otherwise guesses the template from the one embedded in the file)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    lines = [f"FROM ./{gguf_name}"]
    if tok.chat_template and "<|im_start|>" in tok.chat_template:
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system', "{{ .System }}<|im_end|>", "{{ end }}",
                  "{{- range .Messages }}<|im_start|>{{ .Role }}", "{{ .Content }}<|im_end|>", "{{ end }}",
                  '<|im_start|>assistant', '"""', 'PARAMETER stop "<|im_end|>"']
    elif tok.eos_token:
        lines += ["# the chat template embedded in the GGUF file is used", f'PARAMETER stop "{tok.eos_token}"']
    return "\n".join(lines) + "\n"


def _card(manifest: dict, source: str, report: dict) -> str:
    base = manifest.get("base_model") or "unknown"
    rows = ["| file | MiB | logits max rel diff | greedy generations identical |", "|---|---|---|---|"]
    for file, entry in report["files"].items():
        c = entry.get("check")
        rows.append(f"| {file} | {entry['bytes'] / 2**20:.1f} | " + (
            f"{c['logits_max_rel_diff']:.2e} | {c['generations_equal']}/{c['generations']} |" if c else "not checked | |"))
    return "\n".join(["---", f"base_model: {base}", "tags:", "- tunesmith", "- gguf", "---", "",
                      f"# {Path(source).name} (GGUF)", "",
                      f"`{source}` folded into `{base}` and written with the `gguf` package.", "",
                      *rows, "", "```", "ollama create my-model -f Modelfile",
                      f"llama-cli -m {next(iter(report['files']))}", "```"]) + "\n"
