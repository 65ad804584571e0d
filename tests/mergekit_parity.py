"""The mergekit parity recipe shared by tests/test_merge_mergekit_parity.py and
benchmarks/merge_vs_mergekit.py (../shared/reference/merging.md, "Verified parity recipe").

mergekit is LGPL, so it never enters tunesmith's environment: it lives in its own venv,
`.venv-mergekit`, which sees this venv's packages through a .pth file (torch, transformers and
the rest are shared, not downloaded again) and gets only mergekit and the two small packages
this venv lacks, without dependencies. One driver process imports mergekit once and runs every
recipe, so the whole comparison costs one mergekit start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-mergekit"
MERGEKIT = "mergekit==0.1.5"

# method -> (tunesmith recipe fields, mergekit config fields); models a, b (and c) against base.
W_FILTER = [{"filter": "self_attn", "value": 0.7}, {"value": 0.4}]
RECIPES = {
    "linear": ({"method": "linear", "models": [("a", {"weight": 0.7}), ("b", {"weight": 0.3})]},
               {"merge_method": "linear"}),
    "linear_unnormalized": ({"method": "linear", "parameters": {"normalize": False},
                             "models": [("a", {"weight": 0.5}), ("b", {"weight": 0.25})]},
                            {"merge_method": "linear", "parameters": {"normalize": False}}),
    "task_arithmetic": ({"method": "task_arithmetic", "parameters": {"lambda": 0.8},
                         "models": [("a", {"weight": W_FILTER}), ("b", {"weight": 0.5})]},
                        {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8}}),
    "ties": ({"method": "ties", "models": [("a", {"weight": 0.6, "density": 0.5}),
                                          ("b", {"weight": 0.4, "density": 0.7})]},
             {"merge_method": "ties"}),
    "breadcrumbs": ({"method": "breadcrumbs", "models": [("a", {"weight": 1.0, "density": 0.8, "gamma": 0.05}),
                                                        ("b", {"weight": 0.5, "density": 0.6, "gamma": 0.1})]},
                    {"merge_method": "breadcrumbs"}),
    "slerp": ({"method": "slerp", "parameters": {"t": [0.0, 0.3, 1.0]}, "models": [("a", {})]},
              {"merge_method": "slerp", "parameters": {"t": [0.0, 0.3, 1.0]}}),
    "model_stock": ({"method": "model_stock", "models": [("a", {}), ("b", {}), ("c", {})]},
                    {"merge_method": "model_stock"}),
    "dare_ties": ({"method": "dare_ties", "models": [("a", {"weight": 0.5, "density": 0.5}),
                                                    ("b", {"weight": 0.5, "density": 0.5})]},
                  {"merge_method": "dare_ties"}),
    "dare_linear": ({"method": "dare_linear", "models": [("a", {"weight": 0.5, "density": 0.5}),
                                                        ("b", {"weight": 0.5, "density": 0.5})]},
                    {"merge_method": "dare_linear"}),
}
RANDOM = ("dare_ties", "dare_linear")

_DRIVER = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in json.loads(sys.argv[1]):
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(config))), out,
              options=MergeOptions(copy_tokenizer=True, lazy_unpickle=True, random_seed=0))
print("ok")
"""


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    """The mergekit venv's python, made on first use (a few seconds: mergekit and two small wheels)."""
    python = venv_python()
    if python.is_file():
        probe = subprocess.run([str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('mergekit') is None)"], capture_output=True, text=True)
        if probe.returncode == 0:
            return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "tunesmith_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", MERGEKIT, "immutables", "sentencepiece"],
                   check=True, capture_output=True, text=True)
    return python


def save_models(root: Path) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes of it (the base plus different noise), as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import build_llama, build_tokenizer

    folders = {name: root / name for name in ("base", "a", "b", "c")}
    folders["base"].mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folders["base"])
    build_llama(folders["base"], len(tok))
    for i, name in enumerate(("a", "b", "c")):
        model = AutoModelForCausalLM.from_pretrained(folders["base"])
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    return folders


def tunesmith_recipe(method: str, folders: dict[str, Path], output: Path) -> dict:
    ours, _ = RECIPES[method]
    return {"method": ours["method"], "parameters": ours.get("parameters", {}), "base_model": str(folders["base"]),
            "models": [{"name": n, "model": str(folders[n]), "parameters": p} for n, p in ours["models"]],
            "dtype": "fp32", "output": str(output), "overwrite": True}


def mergekit_config(method: str, folders: dict[str, Path]) -> dict:
    ours, theirs = RECIPES[method]
    models = [{"model": str(folders[n]), "parameters": p} if p else {"model": str(folders[n])}
              for n, p in ours["models"]]
    if method == "slerp":  # mergekit lists the base among slerp's two models
        models.insert(0, {"model": str(folders["base"])})
    cfg = {"models": models, "base_model": str(folders["base"]), "dtype": "float32", **theirs}
    if method in ("linear", "linear_unnormalized"):
        cfg.pop("base_model")
    return cfg


def run_mergekit(python: Path, jobs: list[tuple[dict, Path]], work: Path) -> None:
    import yaml

    pairs = []
    for i, (cfg, out) in enumerate(jobs):
        path = work / f"mergekit-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        pairs.append((str(path), str(out)))
    proc = subprocess.run([str(python), "-c", _DRIVER, json.dumps(pairs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{proc.stderr[-3000:]}")


def tensors_of(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_abs_difference(ours: Path, theirs: Path) -> tuple[float, int]:
    """(largest |ours - theirs| over every tensor both wrote, tensors compared); a tensor stored under a
    tied name (lm_head / embed_tokens) on one side is matched to the other's."""
    a, b = tensors_of(ours), tensors_of(theirs)
    tied = {"lm_head.weight": "model.embed_tokens.weight", "model.embed_tokens.weight": "lm_head.weight"}
    worst, n = 0.0, 0
    for name, x in a.items():
        y = b.get(name, b.get(tied.get(name, ""), None))
        if y is None:
            raise AssertionError(f"mergekit's output has no {name}")
        worst = max(worst, float((x.float() - y.float()).abs().max()))
        n += 1
    return worst, n


def dare_statistics(merged: Path, base: Path) -> dict[str, float]:
    """For a DARE merge: the share of entries that moved from the base and the L1 norm of the move."""
    m, b = tensors_of(merged), tensors_of(base)
    moved = total = 0
    l1 = 0.0
    for name, x in m.items():
        y = b.get(name)
        if y is None or x.dim() < 2:
            continue
        d = x.float() - y.float()
        moved += int((d != 0).sum())
        total += d.numel()
        l1 += float(d.abs().sum())
    return {"moved_share": moved / total, "l1": l1}
