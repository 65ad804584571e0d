"""A transformers model folder written as one GGUF file with the `gguf` package's writer (no
llama.cpp build): hyperparameters, tensors under llama.cpp's names, the byte-level BPE
tokenizer and the chat template, so llama.cpp and Ollama load it as it is.

The Llama family (Llama, Mistral, SmolLM) and Qwen2 are mapped; anything else is refused
before a byte is written, as are tokenizers and rope scalings the file could not describe."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

# transformers model_type -> llama.cpp architecture. Llama's q/k rows are permuted for llama.cpp's
# rope pairing (the HF checkpoint rotates halves; llama.cpp rotates adjacent pairs).
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}

# name -> (ggml type name of 2-D weights, llama.cpp file type id, bytes per fp32 byte)
TYPES = {
    "f32": ("F32", 0, 1.0),
    "f16": ("F16", 1, 0.5),
    "bf16": ("BF16", 32, 0.5),
    "q8_0": ("Q8_0", 7, 34 / 128),
    "q4_0": ("Q4_0", 2, 18 / 128),
    "q4_1": ("Q4_1", 3, 20 / 128),
    "q5_0": ("Q5_0", 8, 22 / 128),
    "q5_1": ("Q5_1", 9, 24 / 128),
}
# The gguf package can read but not write these; naming them gives a reason, not "unknown".
READ_ONLY_TYPES = ("q2_k", "q3_k", "q4_k", "q4_k_m", "q4_k_s", "q5_k", "q5_k_m", "q6_k")

# tokenizer.json pre-tokenizers llama.cpp knows by name (its `tokenizer.ggml.pre`).
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def check_type(name: str) -> None:
    if name in TYPES:
        return
    if name.lower() in READ_ONLY_TYPES:
        raise ConfigError(f"--type: '{name}' (a k-quant) can be read by the gguf package but not written; "
                          f"write one of {', '.join(TYPES)} (llama.cpp's llama-quantize turns f16 into k-quants)")
    raise ConfigError(f"--type: unknown GGUF type '{name}' (known: {', '.join(TYPES)})")


@dataclass
class Plan:
    """What the writer will do, decided from config.json and tokenizer.json alone."""

    arch: str
    permute: bool
    config: dict
    pre: str


def plan(folder: Path, pre: str | None = None) -> Plan:
    """Refuse what cannot be written, reading only the folder's JSON files."""
    config = json.loads((folder / "config.json").read_text())
    kind = config.get("model_type")
    classes = config.get("architectures") or []
    if kind not in ARCHITECTURES or any(not c.endswith("ForCausalLM") for c in classes):
        raise ConfigError(f"gguf: architecture {', '.join(classes) or kind} is not mapped to llama.cpp names "
                          f"(mapped: causal LMs of type {', '.join(ARCHITECTURES)}); export --format merged instead")
    arch, permute = ARCHITECTURES[kind]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"gguf: rope_type '{rope['rope_type']}' is not written by this exporter (default rope only)")
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise ConfigError(f"gguf: {folder} has no tokenizer.json; only fast byte-level BPE tokenizers are written")
    tok = json.loads(tok_file.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(f"gguf: the tokenizer is {model.get('type')}"
                          f"{' with byte fallback (sentencepiece style)' if model.get('byte_fallback') else ''}; "
                          "only byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2 style) are written")
    return Plan(arch, permute, config, pre or pre_tokenizer_name(tok.get("pre_tokenizer")))


def pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, refusing ones it would split differently."""
    def is_byte_level(s, regex):
        return s.get("type") == "ByteLevel" and bool(s.get("use_regex", True)) == regex

    spec = spec or {}
    if is_byte_level(spec, True):
        return "gpt-2"
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
            and is_byte_level(parts[1], True):
        return "smollm"
    if len(parts) == 2 and parts[0].get("type") == "Split" and is_byte_level(parts[1], False):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, split in (("llama-bpe", _LLAMA3_SPLIT), ("qwen2", _QWEN2_SPLIT)):
            if regex == split:
                return name
    raise ConfigError(f"gguf: the tokenizer's pre-tokenizer {json.dumps(spec)[:200]} has no llama.cpp name this "
                      "exporter knows (gpt-2, smollm, llama-bpe, qwen2); llama.cpp would split text differently")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half layout to llama.cpp's adjacent pairs, per head."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(folder: Path):
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name).float().numpy()


def storage(gguf_name: str, shape: tuple[int, ...], type_name: str) -> str:
    """The ggml type a tensor is stored as: norms and biases stay F32; a row that is not a whole
    number of quant blocks falls back to F16 (as llama.cpp's converter does); for 4/5-bit types the
    output projection (the tied embedding, too) stays Q8_0, as llama.cpp keeps it above them (Q6_K
    there, which the gguf package cannot write)."""
    import gguf

    wanted = TYPES[type_name][0]
    if len(shape) < 2 or wanted == "F32":
        return "F32"
    if wanted[:2] in ("Q4", "Q5") and gguf_name in ("token_embd.weight", "output.weight"):
        wanted = "Q8_0"
    if wanted in ("F16", "BF16"):
        return wanted
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]][0]
    return "F16" if shape[-1] % block else wanted


def encode(data: np.ndarray, stored: str):
    """(array, raw ggml type or None) for the writer."""
    import gguf

    if stored == "F32":
        return data.astype(np.float32), None
    if stored == "F16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[stored]
    return gguf.quants.quantize(data, qtype), qtype


def rounded(data: np.ndarray, stored: str) -> np.ndarray:
    """The fp32 values a reader gets back from `data` stored as `stored`."""
    import gguf

    array, raw = encode(data, stored)
    if raw is None:
        return array.astype(np.float32)
    return gguf.quants.dequantize(array, raw).reshape(data.shape).astype(np.float32)


def mapped_tensors(folder: Path, p: Plan):
    """(transformers name, llama.cpp name, fp32 array in the transformers layout) for each tensor the
    file holds."""
    import gguf

    cfg = p.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[p.arch.upper()], cfg["num_hidden_layers"])
    tied = cfg.get("tie_word_embeddings", False)
    for hf_name, data in _tensors(folder):
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConfigError(f"gguf: tensor {hf_name} has no llama.cpp name for {p.arch}")
        yield hf_name, new, data


def _vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with llama.cpp's types: control for special added tokens, user-defined
    for other added tokens, unused placeholders up to the embedding size."""
    import gguf

    tok = json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= vocab_size:
        raise ConfigError(f"gguf: the tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(folder: Path, path: Path, type_name: str, *, pre: str | None = None, name: str = "model") -> dict:
    """`folder` (a transformers model) as a GGUF file at `path`; returns counts of what was written."""
    import gguf

    p = plan(folder, pre)
    cfg = p.config
    _, file_type, _ = TYPES[type_name]
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(path), p.arch)
    writer.add_name(name)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _vocab(folder, cfg["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(p.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/pad/unk ids, add_bos/add_eos and the chat template (tokenizer_config.json or
    # chat_template.jinja), read the way llama.cpp's own converter reads them.
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)

    counts: dict[str, int] = {}
    for hf_name, new, data in mapped_tensors(folder, p):
        stored = storage(new, data.shape, type_name)
        # Biases too (a llama with attention_bias), as llama.cpp's converter does.
        if p.permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, heads)
        elif p.permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, kv_heads)
        array, raw = encode(data, stored)
        writer.add_tensor(new, array, raw_dtype=raw)
        counts[stored] = counts.get(stored, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def gguf_pre_of(file: Path) -> str | None:
    """The `tokenizer.ggml.pre` a GGUF file states (the base a run came from, say)."""
    import gguf

    reader = gguf.GGUFReader(str(file))
    field = reader.fields.get("tokenizer.ggml.pre")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()
