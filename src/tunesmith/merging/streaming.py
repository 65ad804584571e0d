"""The merge engine: check the inputs from their headers, then merge tensor by tensor.

Memory stays near a few tensors: each input tensor is read when its turn comes, merged, and
its bytes appended to an output safetensors file whose header was written up front (every
shape and offset is known from the plan), so neither the inputs nor the output are ever whole
in RAM. Everything that can refuse — architectures, shapes, vocabularies, tokenizers, a
parameter with no value for some tensor — is checked before the first tensor is read.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from .registry import MERGE_METHODS
from .sources import TensorSource
from .spec import Candidate, MergeSpec, evaluate_setting, model_levels

_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def _torch_dtype(code: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}[code]


@dataclass
class Plan:
    inputs: list[TensorSource]
    base: TensorSource | None
    reference: TensorSource  # whose names, config and non-float tensors the output takes
    tokenizer: TensorSource
    names: list[str]
    out_dtype: str  # safetensors code for the merged float tensors
    num_layers: int

    def depth(self, name: str) -> float:
        """Relative depth of a tensor for gradients: layer i of n at i/(n-1); other tensors 0 (as mergekit)."""
        m = _LAYER.search(name)
        if not m or self.num_layers <= 1:
            return 0.0
        return int(m.group(1)) / (self.num_layers - 1)


def _vocab(source: TensorSource) -> tuple[int | None, object]:
    """(vocab size, a comparable form of the vocabulary) from the tokenizer files, no model loaded."""
    tok = source.folder / "tokenizer.json"
    if tok.is_file():
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tok)).get_vocab(with_added_tokens=True)
        return len(vocab), frozenset(vocab.items())
    files = [p for p in sorted(source.folder.iterdir()) if p.name in ("vocab.json", "vocab.txt", "tokenizer.model",
                                                                       "spiece.model", "merges.txt")]
    return None, tuple(zlib.crc32(p.read_bytes()) for p in files)


def _moved_tokens(a: object, b: object) -> list[tuple[str, int, int]]:
    """Tokens both vocabularies (from tokenizer.json) have, at different ids: (token, id in a, id in b)."""
    if not isinstance(a, frozenset) or not isinstance(b, frozenset) or a == b:
        return []
    ids = dict(a)
    return sorted((t, ids[t], i) for t, i in b if t in ids and ids[t] != i)


def _num_layers(config: dict, names: list[str]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    found = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(found) + 1 if found else 0


def make_plan(spec: MergeSpec, inputs: list[TensorSource], base: TensorSource | None) -> Plan:
    reference = base or inputs[0]
    others = [s for s in inputs if s is not reference]
    def arch(source: TensorSource) -> tuple[str | None, str | None]:
        return (source.config.get("architectures") or [None])[0], source.config.get("model_type")

    for s in others:
        (a_cls, a_type), (b_cls, b_type) = arch(s), arch(reference)
        # A config written from a GGUF may name only model_type; classes are compared where both have one.
        if a_type != b_type or (a_cls and b_cls and a_cls != b_cls):
            raise ConfigError(f"{s.label} is a {a_cls or a_type} model but {reference.label} is a {b_cls or b_type}: "
                              "only models of one architecture merge")
    ref_vocab = reference.config.get("vocab_size")
    for s in others:
        if s.config.get("vocab_size") != ref_vocab:
            raise ConfigError(
                f"vocabularies differ: {reference.label} has {ref_vocab} tokens, {s.label} has "
                f"{s.config.get('vocab_size')}; the embedding rows cannot be matched (resize one model's "
                "embeddings to the other's tokenizer first)")
    tied = reference.config.get("tie_word_embeddings", True)
    for s in others:
        if s.config.get("tie_word_embeddings", True) != tied:
            raise ConfigError(f"{s.label} {'ties' if not tied else 'unties'} its output layer to the input embeddings "
                              f"and {reference.label} does not: their lm_head weights cannot be matched")
    names = list(reference.tensors)
    for s in others:
        missing = [n for n in names if s.locate(n) is None]
        extra = [n for n in s.tensors if reference.locate(n) is None and n not in s.aliases.values()]
        if missing or extra:
            what = (f"lacks {len(missing)} tensor(s) {reference.label} has (e.g. {missing[:3]})" if missing
                    else f"has {len(extra)} tensor(s) {reference.label} lacks (e.g. {extra[:3]})")
            raise ConfigError(f"{s.label} {what}: the models do not share one architecture")
        wrong = [(n, reference.tensors[n][1], s.tensors[s.locate(n)][1]) for n in names
                 if reference.tensors[n][1] != s.tensors[s.locate(n)][1]]
        if wrong:
            n, a, b = wrong[0]
            raise ConfigError(f"{s.label}: tensor {n} has shape {b} but {reference.label}'s is {a} "
                              f"({len(wrong)} tensor(s) differ): the models do not share one architecture")
    tokenizer = _tokenizer_source(spec, inputs, base)
    vocabs = {s.label: _vocab(s) for s in [reference, *others]}
    ref_map = vocabs[reference.label][1]
    for s in others:
        moved = _moved_tokens(ref_map, vocabs[s.label][1])
        if moved:
            token, a, b = moved[0]
            raise ConfigError(
                f"{s.label}'s tokenizer gives {len(moved)} token(s) another id than {reference.label}'s (e.g. "
                f"{token!r}: {b} vs {a}): embedding rows are merged by id, so they would mix different tokens, "
                "and tokenizer_source only picks whose tokenizer files the merged model gets (it does not "
                "re-align rows); merge models that share their token ids")
    if spec.tokenizer_source is None and len({v[1] for v in vocabs.values()}) > 1:
        sizes = ", ".join(f"{k}: {v[0] if v[0] is not None else '?'} tokens" for k, v in vocabs.items())
        raise ConfigError(f"the inputs' tokenizers differ ({sizes}); set tokenizer_source to the input (or 'base') "
                          "whose tokenizer the merged model should use")
    if spec.dtype != "auto":
        out_dtype = FLOAT_DTYPES[spec.dtype]
    else:
        floats = [d for _, _, d in reference.tensors.values() if d in ("F32", "BF16", "F16", "F64")]
        out_dtype = max(set(floats), key=floats.count) if floats else "F32"
    return Plan(inputs, base, reference, tokenizer, names, out_dtype, _num_layers(reference.config, names))


def _tokenizer_source(spec: MergeSpec, inputs: list[TensorSource], base: TensorSource | None) -> TensorSource:
    if spec.tokenizer_source == "base" or (spec.tokenizer_source is None and base is not None):
        return base
    if spec.tokenizer_source is None:
        return inputs[0]
    return next(s for s in inputs if s.label == spec.tokenizer_source)


def tensor_arguments(plan: Plan, candidate: Candidate, spec: MergeSpec) -> dict[str, dict]:
    """Every float tensor's keyword arguments for the method function, before anything is read."""
    method = MERGE_METHODS[candidate.method]
    levels = {s.label: model_levels(spec, candidate, s.label) for s in plan.inputs}
    out: dict[str, dict] = {}
    for name in plan.names:
        if plan.reference.tensors[name][2] not in ("F32", "BF16", "F16", "F64"):
            continue
        t = plan.depth(name)
        kwargs: dict = {}
        for pname, p in method.per_model.items():
            values = []
            for s in plan.inputs:
                # Most specific first; a level whose filters match nothing falls through (as mergekit's).
                value = None
                for level in levels[s.label]:
                    if pname in level:
                        value = evaluate_setting(level[pname], name, t)
                        if value is not None:
                            break
                values.append(p.default if value is None else value)
            kwargs[pname] = values
        for pname, p in method.globals.items():
            setting = candidate.parameters.get(pname)
            value = evaluate_setting(setting, name, t) if setting is not None else None
            if value is None:
                value = p.default
            if value is None:
                raise ConfigError(f"{candidate.method}: parameters.{pname} has no value for tensor {name} "
                                  "(none of its filters matches; add an entry without a filter)")
            kwargs["lambda_" if pname == "lambda" else pname] = value
        out[name] = kwargs
    return out


class StreamingWriter:
    """Safetensors files written tensor by tensor in a fixed order, headers first."""

    def __init__(self, folder: Path, entries: list[tuple[str, list[int], str]], max_bytes: int,
                 metadata: dict[str, str]):
        self.folder = folder
        shards: list[list[tuple[str, list[int], str]]] = [[]]
        size = 0
        for entry in entries:
            nbytes = math.prod(entry[1]) * _SIZES[entry[2]]
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                          for i in range(n)]
        self.order = [(self.files[i], e) for i, shard in enumerate(shards) for e in shard]
        self.shards = shards
        self.metadata = metadata
        self.total = sum(math.prod(e[1]) * _SIZES[e[2]] for e in entries)
        self._pos = 0
        self._handle = None
        self._file = None

    def _open(self, file: str) -> None:
        if self._handle is not None:
            self._handle.close()
        shard = self.shards[self.files.index(file)]
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * _SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._handle = open(self.folder / file, "wb")
        self._handle.write(len(raw).to_bytes(8, "little"))
        self._handle.write(raw)
        self._file = file

    def write(self, name: str, tensor) -> None:
        import torch

        file, (expected, shape, dtype) = self.order[self._pos]
        if name != expected or list(tensor.shape) != shape or tensor.dtype != _torch_dtype(dtype):
            raise RuntimeError(f"merge writer: got {name} {list(tensor.shape)} {tensor.dtype}, expected "
                               f"{expected} {shape} {dtype}")
        if file != self._file:
            self._open(file)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(memoryview(data.view(torch.uint8).numpy()))  # no copy of the bytes
        self._pos += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._pos != len(self.order):
            raise RuntimeError(f"merge writer: {len(self.order) - self._pos} tensor(s) never written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name: file for file, (name, _, _) in self.order}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def merge_tensors(plan: Plan, candidate: Candidate, spec: MergeSpec, folder: Path,
                  echo: Callable[[str], None] = print) -> int:
    """Write the merged weights of one candidate into `folder`; returns the bytes written."""
    import torch

    method = MERGE_METHODS[candidate.method]
    arguments = tensor_arguments(plan, candidate, spec)
    for name, kwargs in arguments.items() if method.check_arguments else ():  # before any tensor is read
        problem = method.check_arguments(name, kwargs)
        if problem:
            raise ConfigError(f"{candidate.method}: {problem}")
    entries = [(n, plan.reference.tensors[n][1], plan.out_dtype if n in arguments else plan.reference.tensors[n][2])
               for n in plan.names]
    aliases = {k: v for k, v in plan.reference.aliases.items() if v in plan.reference.tensors}
    writer = StreamingWriter(folder, entries, spec.max_shard_mb * 2**20, {"format": "pt", **aliases})
    out_dtype = _torch_dtype(plan.out_dtype)
    device = spec.device
    fn = method.fn
    with torch.no_grad():
        for i, name in enumerate(plan.names):
            if name not in arguments:  # integer buffers (position ids, ...) are the reference's
                writer.write(name, plan.reference.read(name))
                continue
            tensors = [s.read(name, device) for s in plan.inputs]
            base = plan.base.read(name, device) if method.uses_base(len(plan.inputs)) else None
            kwargs = dict(arguments[name])
            if method.random:
                seed = (spec.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
                kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)
            merged = fn(tensors, base, **kwargs)  # may drop the inputs from `tensors` as it goes
            del tensors, base
            writer.write(name, merged.to(out_dtype))
            del merged
    writer.close()
    return writer.total
