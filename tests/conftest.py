"""Tiny models and tokenizers built in-process, so tests run in seconds offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunesmith.hardware import usable_cores
from tunesmith.method_config import SECTIONS as METHOD_SECTIONS


def _share_cores_between_workers() -> None:
    """Each pytest-xdist worker gets its share of the cores. Two workers that each run torch on every
    core oversubscribe them, and OpenMP's spinning threads then make a tiny model's steps many times
    slower (on 2 cores the suite took 19 minutes instead of 6). Subprocesses inherit the share."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and not os.environ.get("OMP_NUM_THREADS"):
        import torch

        threads = max(1, usable_cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_cores_between_workers()

WORDS = (
    "the a of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do how "
    "their if will up other about out many then them these so some her would make like him into time "
    "has look two more write go see number no way could people my than first water been call who oil "
    "its now find long down day did get come made may part positive negative review movie good bad "
    "great terrible answer question capital france paris color sky blue red green what is"
).split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 7)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None, pad_token="<pad>",
    )
    fast.save_pretrained(folder)
    return fast


def sdpa_llama(seed: int = 0):
    """A 2-layer Llama (vocab 100, grouped-query attention) on transformers' SDPA, in memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def build_llama(folder: Path, vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=3, eos_token_id=2, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(folder)
    build_llama(folder, len(tok))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


QA = [
    ("what is the capital of france", "paris"),
    ("what color is the sky", "blue"),
    ("is this movie good", "positive"),
    ("is this movie bad", "negative"),
    ("what is one and one", "two"),
    ("call the water", "blue water"),
]
# Labelled sentences for the classification fixtures.
SENTENCES = [
    ("the movie was good and great", "positive"),
    ("a bad and terrible movie", "negative"),
    ("you will like this movie it is great", "positive"),
    ("the water was bad", "negative"),
    ("what a great day", "positive"),
    ("this is terrible", "negative"),
    ("good people make good time", "positive"),
    ("a terrible way to look", "negative"),
]
# A wrong answer to each of QA's questions: the rejected side of preference fixtures.
WRONG = {"paris": "london", "blue": "green", "positive": "negative", "negative": "positive", "two": "three",
         "blue water": "red water"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA * 4]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def method_keys(method: dict) -> dict:
    """The keys of `method` its type has: tests share LoRA settings (r, alpha, dropout) across
    methods, and each method's section refuses another method's keys."""
    section = METHOD_SECTIONS.get(method.get("type", "lora"))
    return {k: v for k, v in method.items() if section is None or k in section.model_fields}


@pytest.fixture
def run_config(tiny_model_dir, alpaca_file, tmp_path):
    """A small valid run config as a dict; tests change what they study."""

    def make(**sections) -> dict:
        cfg = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(alpaca_file), "max_length": 64},
            "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-2, "progress": False,
                         "log_every": 1, "precision": "fp32"},
            "output": {"dir": str(tmp_path / "run")},
            # Forgetting is on by default for users; tests that study it switch it back on.
            "eval": {"forgetting": False},
        }
        for name, values in sections.items():
            if name == "method":  # the LoRA defaults above stay where the chosen method has them
                cfg["method"] = method_keys({**cfg["method"], "type": values.get("type", "lora")})
            cfg.setdefault(name, {}).update(values)
        return cfg

    return make


def build_wordpiece_tokenizer(folder: Path):
    """A BERT-style WordPiece tokenizer ([CLS] ... [SEP], [MASK]) over WORDS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # A vocabulary written out, not trained: tokenizers' WordPieceTrainer breaks ties differently from one
    # process to the next (274 or 276 tokens), which gave every BERT test a different model each session.
    words = sorted({w.lower() for w in WORDS})
    letters = sorted(set("".join(words)))
    vocab = [*special, *letters, *(f"##{c}" for c in letters), *(w for w in words if len(w) > 1)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(folder)
    return fast


def build_bert(folder: Path, vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, **overrides,
    )
    model = BertForMaskedLM(config)
    model.save_pretrained(folder)
    return model


def build_t5(folder: Path, seed: int = 0):
    """A tiny T5 with a BPE tokenizer (pad 0, eos 1, as T5 expects)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 7)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(fast), d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="relu",
    )
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = build_wordpiece_tokenizer(folder)
    build_bert(folder, len(tok))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_wide_dir(tmp_path_factory) -> Path:
    """A tiny BERT that learns within a few steps: its [CLS] state depends on the text, no dropout.

    With BERT's usual 0.02 initialisation a tiny random encoder gives almost the same [CLS]
    state for every text, so a classifier on its (fresh) pooler sits at chance for many
    steps, and with dropout plus fresh MLM masks each step a few-step loss moves only by
    noise; either way a "loss decreased" check passes or fails on float noise. Wider initial
    weights make the attention mix the tokens. Used by the matrix's classification,
    token-classification and masked-LM cells and by the method tests.
    """
    folder = tmp_path_factory.mktemp("tiny-bert-wide")
    tok = build_wordpiece_tokenizer(folder)
    build_bert(folder, len(tok), initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return folder


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-t5")
    build_t5(folder)
    return folder


def metric_records(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_steps(cfg: dict):
    """(result, the training-step records) of one run."""
    import tunesmith

    result = tunesmith.train(cfg, echo=lambda m: None)
    return result, [r for r in metric_records(result.run_dir) if "loss" in r and "eval_loss" not in r]


def window_mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def free_port() -> int:
    """A local TCP port nothing listens on now."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class UvicornThread:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port, in a daemon thread (test servers)."""

    def __init__(self, app, timeout: float = 30):
        import threading
        import time

        import uvicorn

        self.app, self.port = app, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def whole_and_resumed(config, monkeypatch, step: int):
    """(an uninterrupted run, the same run stopped by SIGINT after `step` and resumed) from `config(out_name)`."""
    import signal

    import tunesmith
    from tunesmith import faults
    from tunesmith.engine.loop import Interrupted

    whole = tunesmith.train(config("whole"), echo=lambda _m: None)
    monkeypatch.setenv("TUNESMITH_FAULT", f"step:{step}")
    monkeypatch.setenv("TUNESMITH_FAULT_SIGNAL", str(int(signal.SIGINT)))
    monkeypatch.setattr(faults, "_counts", {})
    with pytest.raises(Interrupted):
        tunesmith.train(config("parts"), echo=lambda _m: None)
    monkeypatch.delenv("TUNESMITH_FAULT")
    return whole, tunesmith.train(config("parts"), resume=True, echo=lambda _m: None)


# A second labelled task on the same vocabulary: what the sentence is about (three classes).
TOPICS = [
    ("the movie was good and great", "film"), ("a bad and terrible movie", "film"),
    ("you will like this movie it is great", "film"), ("the water was bad", "water"),
    ("call the water", "water"), ("blue water", "water"), ("what a great day", "day"),
    ("a terrible way to look", "day"), ("good people make good time", "day"),
]


def classification_tasks(tmp_path, *, sentiment_rows: int = 4) -> list[dict]:
    """Two classification tasks of a multi-task run: sentiment (2 labels) and topic (3 labels)."""
    sentiment = write_jsonl(tmp_path / "sentiment.jsonl",
                            [{"text": t, "label": y} for t, y in SENTENCES * sentiment_rows])
    topic = write_jsonl(tmp_path / "topic.jsonl", [{"text": t, "label": y} for t, y in TOPICS * 2])
    return [
        {"name": "sentiment", "data": {"train": str(sentiment), "max_length": 32, "split": {"validation_ratio": 0.25}},
         "objective": {"type": "classification"}},
        {"name": "topic", "data": {"train": str(topic), "max_length": 32, "split": {"validation_ratio": 0.25}},
         "objective": {"type": "classification"}},
    ]


@pytest.fixture()
def grpo_arithmetic(monkeypatch):
    """benchmarks/grpo_arithmetic.py as a module, imported afresh (benchmarks/ is not a package)."""
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("grpo_arithmetic", None)
    import grpo_arithmetic

    return grpo_arithmetic
