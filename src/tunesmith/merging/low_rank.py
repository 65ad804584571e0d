"""LoRA adapters of one base combined into one LoRA adapter (method `lora_combine`), by peft's
`add_weighted_adapter`: the result stays small and loads as an adapter, where the tensor
methods fold every adapter into full weights first.

`cat` is exact (the ranks add up: Σ wᵢ·scalingᵢ·BᵢAᵢ, i.e. task arithmetic kept in low rank);
`svd` and the `*_svd` types form each layer's full ΔW, merge it and factor it back to `svd_rank`;
`linear`, `ties`, `dare_*` and `magnitude_prune` act on the A and B matrices separately (peft's
rough, cheap variants).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from .spec import Candidate, MergeSpec, model_levels

# rsLoRA is left out: peft gives the combined adapter alpha = r, which rsLoRA's alpha/sqrt(r) scaling
# turns into sqrt(r) instead of 1 (the tensor methods merge rsLoRA runs exactly).
COMBINABLE = ("lora", "lora_fa", "qlora")


@dataclass
class LoraInput:
    label: str
    folder: Path  # the peft adapter folder
    base: str  # what its base is, as recorded
    manifest: dict | None


def lora_inputs(spec: MergeSpec) -> list[LoraInput]:
    """Every input as a peft LoRA adapter of one and the same base, or a refusal naming the odd one."""
    from ..artifacts import _artifact_in, read_manifest

    out = []
    for m in spec.inputs:
        path = Path(m.model).expanduser()
        found = _artifact_in(path) if path.is_dir() else None
        manifest = read_manifest(found) if found is not None else None
        if manifest is not None:
            if manifest.get("method") not in COMBINABLE:
                raise ConfigError(f"lora_combine: {m.label} ({m.model}) is a '{manifest.get('method')}' run; "
                                  f"only {', '.join(COMBINABLE)} adapters combine in low rank (the tensor methods "
                                  "merge any of them as full weights)")
            out.append(LoraInput(m.label, found, manifest["base_source"], manifest))
        elif path.is_dir() and (path / "adapter_config.json").is_file():
            cfg = json.loads((path / "adapter_config.json").read_text())
            if str(cfg.get("peft_type", "")).upper() != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
                raise ConfigError(f"lora_combine: {m.label} ({m.model}) is not a plain LoRA adapter (DoRA and rsLoRA "
                                  "are merged as full weights by the tensor methods)")
            out.append(LoraInput(m.label, path, str(cfg.get("base_model_name_or_path")), None))
        else:
            raise ConfigError(f"lora_combine: {m.label} ({m.model}) is not a LoRA adapter or LoRA run")
    bases = {i.base for i in out}
    if len(bases) > 1:
        raise ConfigError("lora_combine: the adapters were trained on different bases ("
                          + ", ".join(f"{i.label}: {i.base}" for i in out) + "); low-rank combination needs one base")
    return out


def build_lora(spec: MergeSpec, candidate: Candidate, folder: Path, echo: Callable[[str], None]) -> Path:
    """The combined adapter as an artifact folder (adapter weights and config, tokenizer, manifest, card)."""
    from ..artifacts import load_trained
    from ..quiet import no_progress_bars
    from .card import render_merge_card

    inputs = lora_inputs(spec)
    p = candidate.parameters
    weights = [float(next((level["weight"] for level in model_levels(spec, candidate, i.label) if "weight" in level),
                          1.0)) for i in inputs]
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with no_progress_bars():
        loaded = load_trained(inputs[0].folder, full_precision_base=True)
        model = loaded.model
        names = ["default"]  # internal names: a user's label ("combined", "default") must not collide
        for n, i in enumerate(inputs[1:], start=1):
            model.load_adapter(str(i.folder), adapter_name=f"__input{n}__")
            names.append(f"__input{n}__")
        kwargs = {"combination_type": p.get("combination", "cat"),
                  "majority_sign_method": p.get("majority_sign_method", "total")}
        if p.get("svd_rank") is not None:
            kwargs["svd_rank"] = int(p["svd_rank"])
        if p.get("density") is not None:
            kwargs["density"] = float(p["density"])
        try:
            model.add_weighted_adapter(names, weights, "__combined__", **kwargs)
        except ValueError as exc:  # peft's reason: unequal ranks for linear, different targets, ...
            raise ConfigError(f"lora_combine ({kwargs['combination_type']}): {exc}") from None
        model.save_pretrained(str(tmp), selected_adapters=["__combined__"])
    saved = tmp / "__combined__"  # peft writes a non-default adapter into a subfolder of its name
    for f in saved.iterdir():
        os.replace(f, tmp / f.name)
    saved.rmdir()
    loaded.tokenizer.save_pretrained(tmp)
    rank = json.loads((tmp / "adapter_config.json").read_text()).get("r")
    recipe = {"method": "lora_combine", "parameters": candidate.model_dump(mode="json")["parameters"],
              "models": [{"name": i.label, "model": str(i.folder), "parameters": {"weight": w}}
                         for i, w in zip(inputs, weights)],
              "base_model": inputs[0].base, "dtype": "fp32", "seed": spec.seed, "tokenizer_source": inputs[0].label}
    first = inputs[0].manifest or {
        "objective": "causal_lm", "objective_config": {"type": "causal_lm"}, "auto_class": "AutoModelForCausalLM",
        "generative": True, "base_model": inputs[0].base, "base_gguf_file": None, "base_source": inputs[0].base,
        "labels": [], "init_seed": 0, "method_config": {}}
    manifest = {**first, "method": "lora", "artifact": "adapter", "merge": recipe, "evaluation": {},
                "method_config": {**first["method_config"], "type": "lora", "r": rank, "alpha": rank}}
    (tmp / "tunesmith.json").write_text(json.dumps(manifest, indent=1))
    (tmp / "README.md").write_text(render_merge_card(manifest))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    echo(f"{candidate.name or 'lora_combine'}: a rank-{rank} LoRA adapter ({kwargs['combination_type']})")
    return folder
