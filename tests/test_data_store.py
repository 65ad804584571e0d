"""data.store: arrow — rows streamed into a memory-mapped Arrow file, reused by key, trained on like lists."""

from __future__ import annotations

import json

import pytest

from conftest import whole_and_resumed, QA, metric_records, write_jsonl


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _text_file(tmp_path, n: int = 64):
    words = "the movie was good and great a bad terrible day water blue sky paris".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(3 + i % 9))} for i in range(n)]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


def test_store_rows_equal_the_in_memory_rows_when_order_is_not_in_play(run_config, tiny_tokenizer, tmp_path, cache):
    """Unpacked, unshuffled, no split: the Arrow rows are the in-memory pipeline's rows, in the same order."""
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data
    from tunesmith.objectives import build_objective

    corpus = _text_file(tmp_path)
    cfg = load_config(run_config(data={"train": str(corpus), "shuffle": False, "packing": False},
                                 objective={"type": "causal_lm"}))
    objective = build_objective(cfg.objective)
    memory = build_data(cfg.data, tiny_tokenizer, seed=1, packing=False, objective=objective)
    arrow_cfg = cfg.data.model_copy(update={"store": "arrow"})
    arrow = build_data(arrow_cfg, tiny_tokenizer, seed=1, packing=False, objective=objective)
    assert len(arrow.train) == len(memory.train) == 64
    assert list(arrow.train) == memory.train
    assert arrow.train[5] == memory.train[5] and arrow.train[-1] == memory.train[-1]
    assert arrow.stats.train_loss_tokens == memory.stats.train_loss_tokens


def test_second_build_reuses_the_store_and_a_change_rebuilds(run_config, tiny_tokenizer, tmp_path, cache, monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data
    from tunesmith.objectives import build_objective

    corpus = _text_file(tmp_path, 300)
    cfg = load_config(run_config(data={"train": str(corpus), "store": "arrow", "split": {"validation_ratio": 0.2}},
                                 objective={"type": "causal_lm"}))
    objective = build_objective(cfg.objective)
    first = build_data(cfg.data, tiny_tokenizer, seed=1, packing=True, objective=objective)
    # Packed rows: no row longer than max_length, position ids restart per example.
    assert all(len(r["input_ids"]) <= 64 for r in first.train)
    assert 40 <= first.stats.val_examples <= 80  # ~20 % by a seeded hash of the row's position
    assert first.stats.train_examples + first.stats.val_examples == 300
    from tunesmith.data import pipeline

    calls = []
    real = pipeline.encode_all
    monkeypatch.setattr(pipeline, "encode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = build_data(cfg.data, tiny_tokenizer, seed=1, packing=True, objective=objective)
    assert calls == []  # nothing tokenized: the rows came from the Arrow file
    assert list(again.train) == list(first.train) and again.val == first.val
    build_data(cfg.data.model_copy(update={"max_length": 48}), tiny_tokenizer, seed=1, packing=True,
               objective=objective)
    assert calls  # another max_length is another store
    assert len([p for p in (cache / "rows").iterdir() if not p.name.count(".tmp")]) == 2


def test_training_from_the_store_resumes_exactly(run_config, tmp_path, cache, monkeypatch):
    corpus = _text_file(tmp_path, 120)

    def config(out: str) -> dict:
        return run_config(data={"train": str(corpus), "store": "arrow", "split": {"validation_ratio": 0.1}},
                          objective={"type": "causal_lm"}, training={"epochs": 2},
                          output={"dir": str(tmp_path / out)})

    whole, resumed = whole_and_resumed(config, monkeypatch, step=3)

    def losses(run):
        return [(r["step"], r["loss"]) for r in metric_records(run.run_dir) if "loss" in r and "eval_loss" not in r]

    assert losses(resumed) == losses(whole)
    assert resumed.metrics["eval_loss"] == whole.metrics["eval_loss"]


def test_store_refusals_name_the_setting(run_config, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="data.store: arrow streams rows for objective.type"):
        load_config(run_config(data={"store": "arrow"}, objective={"type": "classification"}))
    with pytest.raises(ConfigError, match="data.streaming: true writes the stream"):
        load_config(run_config(data={"streaming": True}))


def test_a_bad_row_deep_in_a_streamed_file_names_its_line(run_config, tiny_tokenizer, tmp_path, cache):
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data
    from tunesmith.errors import DataError
    from tunesmith.objectives import build_objective

    corpus = _text_file(tmp_path, 3000)
    with corpus.open("a") as f:
        f.write('{"text": "ok"}\n{"text": broken\n')
    cfg = load_config(run_config(data={"train": str(corpus), "store": "arrow"}, objective={"type": "causal_lm"}))
    with pytest.raises(DataError, match="corpus.jsonl line 3002: not a valid JSON object"):
        build_data(cfg.data, tiny_tokenizer, seed=1, packing=True, objective=build_objective(cfg.objective))
    assert not any((cache / "rows").glob("*")) if (cache / "rows").exists() else True  # no half-written store


def test_sft_rows_stream_too(run_config, tiny_tokenizer, tmp_path, cache):
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data
    from tunesmith.objectives import build_objective

    alpaca = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA * 5])
    cfg = load_config(run_config(data={"train": str(alpaca), "store": "arrow", "shuffle": False, "packing": False}))
    objective = build_objective(cfg.objective)
    memory = build_data(cfg.data.model_copy(update={"store": "memory"}), tiny_tokenizer, seed=1, packing=False,
                        objective=objective)
    arrow = build_data(cfg.data, tiny_tokenizer, seed=1, packing=False, objective=objective)
    assert list(arrow.train) == memory.train
    assert json.dumps(arrow.stats.format) == json.dumps(memory.stats.format)


def test_a_streamed_hub_dataset_fills_the_store_row_by_row(run_config, tiny_tokenizer, tmp_path, cache, monkeypatch):
    """data.streaming: the hub dataset is asked for as a stream (datasets' IterableDataset, here a local
    generator standing in for the hub) and written chunk by chunk; the rows equal those of the same data
    read from a file, and a second build reuses the store without opening the stream."""
    import datasets

    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data
    from tunesmith.objectives import build_objective

    corpus = _text_file(tmp_path, 200)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    opened = []

    def load_dataset(name, config=None, *, split, streaming):
        opened.append((name, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    settings = {"store": "arrow", "streaming": True, "shuffle": False, "packing": False}
    cfg = load_config(run_config(data={"train": "someone/corpus", **settings}, objective={"type": "causal_lm"}))
    objective = build_objective(cfg.objective)
    streamed = build_data(cfg.data, tiny_tokenizer, seed=1, packing=False, objective=objective)
    assert opened == [("someone/corpus", "train", True)]
    from_file = build_data(cfg.data.model_copy(update={"train": str(corpus), "streaming": False}), tiny_tokenizer,
                           seed=1, packing=False, objective=objective)
    assert len(streamed.train) == 200 and list(streamed.train) == list(from_file.train)
    again = build_data(cfg.data, tiny_tokenizer, seed=1, packing=False, objective=objective)
    assert len(opened) == 1 and list(again.train) == list(streamed.train)


def test_a_validation_file_reads_in_the_training_format_and_counts_its_skipped_rows(run_config, tiny_tokenizer,
                                                                                   tmp_path, cache):
    """Continued pretraining on rows with both a text column and alpaca columns learns the text; the
    validation file must be read the same way in both stores (the Arrow store detected it afresh, as
    alpaca), and a row it skips under skip_invalid is counted."""
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data
    from tunesmith.objectives import build_objective

    rows = [{"instruction": f"name color {i}", "input": "", "output": "blue",
             "text": f"instruction name color {i} response blue"} for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:2])
    with open(val, "a") as f:
        f.write("not json\n")
    cfg = load_config(run_config(data={"train": str(train), "packing": False, "skip_invalid": True,
                                       "split": {"validation_file": str(val)}},
                                 objective={"type": "causal_lm"}))
    objective = build_objective(cfg.objective)
    for store in ("memory", "arrow"):
        built = build_data(cfg.data.model_copy(update={"store": store}), tiny_tokenizer, seed=1, packing=False,
                           objective=objective)
        assert built.stats.format == "text" and built.stats.rows_skipped == 1, store
        for row in list(built.val):
            assert all(label != -100 for label in row["labels"]), store  # text: every token learned
