"""Gather the wheels benchmarks/gpu_sft.py needs on the lent GPU machine, into .gpu-wheels/.

The GPU machine is offline and its image (Python 3.12, torch 2.11 + CUDA, transformers 5.17;
/work/.library/device/KINDS.md lists it) lacks pydantic, datasets and TRL, and carries other
versions of transformers, peft and accelerate than the ones tunesmith is tested with. This
downloads, from the package index, Python 3.12 wheels of exactly the versions installed in this
checkout's .venv, so the GPU run uses the stack the CPU suite passed on. The folder (~20 MB) is
git-ignored; the device tool carries it (`carry: [".gpu-wheels"]`), and there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
    PYTHONPATH=src:/tmp/site python3 benchmarks/gpu_sft.py --models 1b

torch stays the image's own CUDA build; everything else the image already has at compatible
versions (numpy, pyarrow, tokenizers, safetensors, huggingface_hub, ...).

Usage:  python benchmarks/gpu_wheels.py [--dest .gpu-wheels] [--python-version 3.12]
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the image lacks (pydantic and its parts, datasets and its parts, TRL, typing-extensions new
# enough for pydantic) and what it has at other versions than tunesmith's tested stack (regex:
# transformers checks its minimum version at import).
DISTRIBUTIONS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
                 "datasets", "dill", "multiprocess", "trl", "transformers", "peft", "accelerate", "regex"]
LINUX_X86_64 = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64", "any"]


def pins() -> list[str]:
    """`name==version` of each distribution as installed here; a missing one is an error naming it."""
    out, missing = [], []
    for name in DISTRIBUTIONS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"not installed in this environment: {', '.join(missing)} (run `make install` first)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    a = p.parse_args()
    wanted = pins()
    if a.dest.exists():
        shutil.rmtree(a.dest)
    a.dest.mkdir(parents=True)
    tag = a.python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest", str(a.dest),
           "--python-version", a.python_version, "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "none",
           *[x for platform in LINUX_X86_64 for x in ("--platform", platform)], *wanted]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pip download failed:\n{proc.stderr[-3000:]}")
    wheels = sorted(a.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MB in {a.dest}: " + ", ".join(w.name for w in wheels))
    got = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    lost = [n for n in DISTRIBUTIONS if n not in got]
    if lost:
        raise SystemExit(f"no wheel came for: {', '.join(lost)}")


if __name__ == "__main__":
    main()
