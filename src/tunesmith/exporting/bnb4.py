"""`export --format bnb-4bit`: the merged model stored as bitsandbytes NF4 safetensors (double
quantization, bf16 compute), which transformers loads for serving with no re-quantization step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from ..files import staged_folder
from .merged import _check_disk, card, check_foldable, check_output, fold_fp32


def export_bnb4(source: str | Path, output: Path, *, overwrite: bool = False,
                echo: Callable[[str], None] = print) -> Path:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError("--format bnb-4bit needs bitsandbytes (pip install 'tunesmith[qlora]')") from exc
    found = check_foldable(source)
    check_output(output, overwrite, source, found)
    _check_disk(source, found, output, "fp32")  # the fp32 fold is written first, then the 4-bit copy
    with staged_folder(output) as tmp:
        merged, manifest = fold_fp32(source, tmp, echo)
        echo("quantizing to NF4 with bitsandbytes")
        check = _quantize(merged, tmp, manifest.get("auto_class") or "AutoModelForCausalLM")
        shutil.rmtree(merged)
        (tmp / "README.md").write_text(card(manifest, str(source), "bnb-4bit", extra=(
            "Stored as bitsandbytes NF4 (double quantization, bf16 compute): transformers loads it as it is "
            f"(bitsandbytes installed). Against the fp32 model: {_describe(check)}.")))
        (tmp / "export.json").write_text(json.dumps({"source": str(source), "check": check}, indent=2) + "\n")
    echo(f"NF4 model: {output} ({_describe(check)})")
    return output


def _describe(check: dict) -> str:
    if "skipped" in check:
        return f"not compared: {check['skipped']}"
    return (f"logits max relative difference {check['logits_max_rel_diff']:.3f}, next-token argmax agreement "
            f"{check['argmax_agreement']:.0%}")


def _quantize(merged: Path, out: Path, auto_class: str) -> dict:
    import torch
    import transformers
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from ..quiet import held_load_report, no_progress_bars

    auto = getattr(transformers, auto_class)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with no_progress_bars(), held_load_report():
        model = auto.from_pretrained(merged, quantization_config=quant, device_map="cpu")
        model.save_pretrained(out)
        tok = AutoTokenizer.from_pretrained(merged)
        tok.save_pretrained(out)
        reference = auto.from_pretrained(merged, dtype=torch.float32).eval()
        reloaded = auto.from_pretrained(out, device_map="cpu").eval()
    ids = tok("The capital of France is Paris, and 12 + 30 = 42.", return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            a, b = (m(ids).logits.float() for m in (reference, reloaded))
    except (AssertionError, RuntimeError) as exc:
        # bitsandbytes' CPU kernel wants every output size a multiple of 32; GPUs do not.
        return {"skipped": f"the 4-bit model could not run here ({type(exc).__name__}: {exc})"}
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return {"logits_max_rel_diff": (a - b).abs().max().item() / a.abs().max().item(),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
