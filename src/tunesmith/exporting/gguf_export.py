"""`export --format gguf`: fold the run into its base, write one GGUF per type, check each file
by loading it back with transformers' GGUF loader, and leave an Ollama Modelfile beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, TunesmithError
from ..files import staged_folder
from .gguf_file import TYPES, check_type, gguf_pre_of, plan, write_gguf
from .merged import check_foldable, check_output, fold_fp32, source_folder

# The file must compute what the model computes with its weights rounded the way the file stores
# them (largest |logit difference| / largest |logit| below this, the same greedy generations):
# that isolates the writer's layout (names, q/k permutation, tokenizer) from the type's rounding.
FAITHFUL = 1e-4
# Below this next-token agreement with the unrounded model, the type is flagged as too lossy.
AGREEMENT_WARNING = 0.9
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
    check_output(output, overwrite, source, found)
    described = source_folder(source, found)
    pre = _base_pre(found)
    if described is not None:
        plan(described, pre)  # refuses an unmapped architecture or tokenizer before any work
        _check_disk(described, output, types)
    name = Path(str(source)).expanduser().resolve().name if Path(str(source)).expanduser().exists() \
        else str(source).replace("/", "-")
    with staged_folder(output) as tmp:
        merged, manifest = fold_fp32(source, tmp, echo)
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
    for file, entry in report["files"].items():
        check = entry.get("check")
        echo(f"{file}: {entry['bytes'] / 2**20:.1f} MiB" + (
            f"; faithful to its stored weights: {'yes' if check['passed'] else 'NO'} (tokenizer ids "
            f"{'same' if check['tokenizer_ids_equal'] else 'DIFFERENT'}, logits within "
            f"{check['faithful']['logits_max_rel_diff']:.1e}, generations {check['faithful']['generations_equal']}/"
            f"{check['generations']}); against the unrounded model: logits max rel diff "
            f"{check['logits_max_rel_diff']:.1e}, next-token agreement {check['argmax_agreement']:.1%}, greedy "
            f"generations {check['generations_equal']}/{check['generations']} identical" if check else ""))
        if check and check["lossy"]:
            echo(f"warning: {file} agrees with the model on only {check['argmax_agreement']:.0%} of next tokens; "
                 "this type loses much of this model (try a wider type)")
    failed = [f for f, e in report["files"].items() if e.get("check") and not e["check"]["passed"]]
    if failed:
        raise ExportCheckError(f"gguf: {', '.join(failed)} in {output} did not reproduce the model's weights as "
                               f"stored (see {output / 'export.json'}); the files are kept for inspection")
    echo(f"GGUF export: {output} (ollama create NAME -f {output / 'Modelfile'})")
    return output


def _base_pre(found: Path | None) -> str | None:
    """A run on a GGUF base keeps the pre-tokenizer name its base file stated (its tokenizer came from there)."""
    if found is None:
        return None
    from ..artifacts import read_manifest
    from ..config import ModelConfig
    from ..models import resolve_source

    manifest = read_manifest(found)
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
    """Load `file` back with transformers' GGUF loader and compare it with the model in `reference`:
    faithfulness against the model rounded as the file stores it (must hold), quality against the
    model itself (reported)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quiet import held_load_report, no_progress_bars

    with no_progress_bars(), held_load_report():
        tok = AutoTokenizer.from_pretrained(reference)
        tok_g = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
        # GGUF has no attention-bias flag: llama.cpp uses the bias tensors it finds, transformers' reader
        # builds a llama without them unless told.
        biased = {"attention_bias": True} if getattr(model.config, "attention_bias", False) else {}
        model_g = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32,
                                                       **biased).eval()
        expected = model if type_name == "f32" else _rounded_model(reference, type_name)
    texts = [CHECK_TEXT] + [_prompt(tok, p) for p in CHECK_PROMPTS]
    ids_equal = all(tok(t)["input_ids"] == tok_g(t)["input_ids"] for t in texts)
    faithful, quality = _Compare(), _Compare()
    samples = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            a, e, b = model(ids).logits[0], expected(ids).logits[0], model_g(ids).logits[0]
            faithful.logits(e, b)
            quality.logits(a, b)
        for p in CHECK_PROMPTS:
            ids = tok(_prompt(tok, p), return_tensors="pt")["input_ids"]
            kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            out, out_e, out_g = (m.generate(ids, **kwargs)[0, ids.shape[1]:] for m in (model, expected, model_g))
            faithful.generations += int(torch.equal(out_e, out_g))
            quality.generations += int(torch.equal(out, out_g))
            samples.append({"prompt": p, "model": tok.decode(out, skip_special_tokens=True),
                            "gguf": tok.decode(out_g, skip_special_tokens=True)})
    passed = ids_equal and faithful.rel <= FAITHFUL and faithful.generations == len(CHECK_PROMPTS)
    return {"tokenizer_ids_equal": ids_equal, "passed": passed, "generations": len(CHECK_PROMPTS),
            "faithful": {"logits_max_rel_diff": faithful.rel, "tolerance": FAITHFUL,
                         "generations_equal": faithful.generations},
            "logits_max_abs_diff": quality.worst, "logits_max_rel_diff": quality.rel,
            "argmax_agreement": quality.agree / quality.total, "generations_equal": quality.generations,
            "lossy": quality.agree / quality.total < AGREEMENT_WARNING, "samples": samples}


class _Compare:
    def __init__(self):
        self.worst = self.top = 0.0
        self.agree = self.total = self.generations = 0

    def logits(self, want, got) -> None:
        self.worst = max(self.worst, (want - got).abs().max().item())
        self.top = max(self.top, want.abs().max().item())
        self.agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        self.total += want.shape[0]

    @property
    def rel(self) -> float:
        return self.worst / max(self.top, 1e-12)


def _rounded_model(reference: Path, type_name: str):
    """The model with every tensor the file holds rounded as the file stores it."""
    import torch
    from transformers import AutoModelForCausalLM

    from .gguf_file import mapped_tensors, rounded, storage

    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for hf_name, new, data in mapped_tensors(reference, plan(reference)):
            params[hf_name].copy_(torch.from_numpy(rounded(data, storage(new, data.shape, type_name))))
    return model


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
                  "{{- range .Messages }}<|im_start|>{{ .Role }}", "{{ .Content }}<|im_end|>",
                  # One line: a newline after this {{ end }} would put a blank line before the answer's turn.
                  '{{ end }}<|im_start|>assistant', '"""', 'PARAMETER stop "<|im_end|>"']
    elif tok.eos_token:
        lines += ["# the chat template embedded in the GGUF file is used", f'PARAMETER stop "{tok.eos_token}"']
    return "\n".join(lines) + "\n"


def _card(manifest: dict, source: str, report: dict) -> str:
    base = manifest.get("base_model") or "unknown"
    rows = ["| file | MiB | faithful to its stored weights | logits max rel diff vs the model | next-token "
            "agreement | greedy generations identical |", "|---|---|---|---|---|---|"]
    for file, entry in report["files"].items():
        c = entry.get("check")
        rows.append(f"| {file} | {entry['bytes'] / 2**20:.1f} | " + (
            f"{'yes' if c['passed'] else 'no'} | {c['logits_max_rel_diff']:.2e} | {c['argmax_agreement']:.1%} | "
            f"{c['generations_equal']}/{c['generations']} |" if c else "not checked | | | |"))
    return "\n".join(["---", f"base_model: {base}", "tags:", "- tunesmith", "- gguf", "---", "",
                      f"# {Path(source).name} (GGUF)", "",
                      f"`{source}` folded into `{base}` and written with the `gguf` package.", "",
                      *rows, "", "```", "ollama create my-model -f Modelfile",
                      f"llama-cli -m {next(iter(report['files']))}", "```"]) + "\n"
