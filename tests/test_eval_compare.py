"""Compare: base vs a tiny LoRA run, report files, per-example outputs, the result cache, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import tunesmith
from tunesmith.errors import ConfigError
from tunesmith.evaluation import compare as compare_mod
from tunesmith.evaluation.api import compare, evaluate
from tunesmith.evaluation.cli import compare_command, eval_command
from tunesmith.evaluation.spec import ModelSpec

from conftest import QA, write_jsonl

REF = [{"path": "default", "max_samples": 3}]


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval-lora")
    data = write_jsonl(folder / "train.jsonl",
                       [{"instruction": q, "input": "", "output": a} for q, a in QA * 4])
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(data), "max_length": 64, "split": {"validation_ratio": 0.25}},
        "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-2, "progress": False,
                     "precision": "fp32"},
        "eval": {"forgetting": False},
        "output": {"dir": str(folder / "run")},
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = tunesmith.train(cfg, echo=quiet)
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    return result.run_dir


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])


@pytest.fixture
def counted_loads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = compare_mod.load_model

    def load(source, adapter=None, dtype="fp32", task=None):
        calls.append(source)
        return real(source, adapter, dtype, task)

    monkeypatch.setattr(compare_mod, "load_model", load)
    return calls


def task(path: Path, **settings) -> dict:
    return {"data": str(path), "settings": {"metrics": ["perplexity", "exact_match", "rougeL"],
                                            "max_new_tokens": 4, **settings}}


def test_compare_writes_reports_with_both_models_and_examples(tiny_model_dir, lora_run, qa_file, tmp_path):
    out = tmp_path / "report"
    result = compare(models=[f"base={tiny_model_dir}", f"tuned={lora_run}"], tasks=[task(qa_file)],
                     reference=REF, output=out, cache_dir=tmp_path / "cache", echo=quiet)
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.html", "results.json"}
    data = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in data["models"]] == ["base", "tuned"]
    for name in ("base", "tuned"):
        r = data["results"][name]["qa"]
        assert set(r["metrics"]) >= {"perplexity", "exact_match", "rougeL"}
        assert [e["reference"] for e in r["examples"]] == [a for _, a in QA]
        assert all(isinstance(e["prediction"], str) for e in r["examples"])
    # The LoRA run learnt these answers: its answer perplexity must be well below the base's.
    assert data["results"]["tuned"]["qa"]["metrics"]["perplexity"] < \
        0.8 * data["results"]["base"]["qa"]["metrics"]["perplexity"]
    assert set(data["forgetting"]["tuned"]) == {"forgetting/default/perplexity_delta",
                                                "forgetting/default/perplexity_change_pct"}
    md = (out / "report.md").read_text()
    assert "| base |" in md and "| tuned |" in md and "Forgetting" in md
    assert "qa exact_match" in md and "ref/default/perplexity" in md
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 4  # one chart per column
    # Self-contained: renders offline, nothing fetched from a CDN.
    assert "<script" not in html and "<link" not in html and "src=" not in html
    assert result.evaluated == 4 and result.cache_hits == 0


def test_second_compare_hits_the_cache_and_changes_miss(tiny_model_dir, lora_run, qa_file, tmp_path,
                                                        counted_loads):
    models = [f"base={tiny_model_dir}", f"tuned={lora_run}"]
    kw = dict(reference=REF, cache_dir=tmp_path / "cache", echo=quiet)
    first = compare(models=models, tasks=[task(qa_file)], output=tmp_path / "a", **kw)
    assert first.evaluated == 4 and len(counted_loads) == 2
    second = compare(models=models, tasks=[task(qa_file)], output=tmp_path / "b", **kw)
    assert second.evaluated == 0 and second.cache_hits == 4
    assert len(counted_loads) == 2, "a fully cached model must not even be loaded"
    assert all(r.cached for per in second.results.values() for r in per.values())
    assert second.results["tuned"]["qa"].metrics == first.results["tuned"]["qa"].metrics
    assert json.loads((tmp_path / "b" / "results.json").read_text())["results"]["base"]["qa"]["cached"]

    # Other settings: the task is recomputed, the unchanged reference set is not.
    base = models[:1]
    third = compare(models=base, tasks=[task(qa_file, max_new_tokens=2)], output=tmp_path / "c", **kw)
    assert third.evaluated == 1 and third.cache_hits == 1
    # Other data (one row changed): recomputed as well.
    rows = [json.loads(x) for x in qa_file.read_text().splitlines()]
    rows[0]["output"] = "london"
    changed = write_jsonl(tmp_path / "qa2.jsonl", rows)
    fourth = compare(models=base, tasks=[task(changed)], output=tmp_path / "d", **kw)
    assert fourth.evaluated == 1 and fourth.cache_hits == 1
    # No cache at all when asked.
    fifth = compare(models=base, tasks=[task(qa_file)], output=tmp_path / "e", use_cache=False, **kw)
    assert fifth.evaluated == 2 and fifth.cache_hits == 0
    # Another dtype scores differently: recomputed, task and reference set.
    sixth = compare({"dtype": "bf16"}, models=base, tasks=[task(qa_file)], output=tmp_path / "f", **kw)
    assert sixth.evaluated == 2 and sixth.cache_hits == 0


def test_retrained_adapter_changes_the_fingerprint(lora_run):
    from tunesmith.evaluation.cache import model_fingerprint

    before = model_fingerprint(str(lora_run))
    adapter = model_fingerprint("base", str(lora_run))  # the run folder given as --adapter
    weights = lora_run / "adapter" / "adapter_model.safetensors"
    (lora_run / "eval-notes.txt").write_text("outputs next to a run do not count")
    assert model_fingerprint(str(lora_run)) == before
    data = weights.read_bytes()
    weights.write_bytes(data[:-4] + bytes(4))  # same size, other content: small files hash content
    try:
        assert model_fingerprint(str(lora_run)) != before
        assert model_fingerprint("base", str(lora_run)) != adapter
    finally:
        weights.write_bytes(data)


def test_errors_before_any_model_is_loaded(tiny_model_dir, qa_file, tmp_path, counted_loads):
    with pytest.raises(ConfigError, match="unknown metric 'acuracy'.*known: perplexity, exact_match"):
        compare(models=[str(tiny_model_dir)], tasks=[{"data": str(qa_file), "settings": {"metrics": ["acuracy"]}}],
                output=tmp_path / "o", echo=quiet)
    with pytest.raises(ConfigError, match="data file not found"):
        compare(models=[str(tiny_model_dir)], tasks=[{"data": str(tmp_path / "nope.jsonl")}],
                output=tmp_path / "o", echo=quiet)
    with pytest.raises(ConfigError, match="model not found"):
        compare(models=[str(tmp_path / "no-model")], tasks=[task(qa_file)], output=tmp_path / "o", echo=quiet)
    with pytest.raises(ConfigError, match="reference file not found"):
        compare(models=[str(tiny_model_dir)], reference=[{"path": str(tmp_path / "ref.txt")}],
                output=tmp_path / "o", echo=quiet)
    with pytest.raises(ConfigError, match="duplicate names"):
        compare(models=[f"a={tiny_model_dir}", f"a={tiny_model_dir}"], tasks=[task(qa_file)], echo=quiet)
    assert counted_loads == []


def test_model_spec_parsing():
    assert ModelSpec.parse("base=HuggingFaceTB/SmolLM2-135M") == ModelSpec(name="base", model="HuggingFaceTB/SmolLM2-135M")
    s = ModelSpec.parse("runs/x/model::runs/y/adapter")
    assert (s.name, s.model, s.adapter, s.label) == (None, "runs/x/model", "runs/y/adapter", "y")
    assert ModelSpec.parse("/tmp/a=b/run").model == "/tmp/a=b/run"
    assert ModelSpec(model="runs/my-run/adapter").label == "my-run"


def test_evaluate_a_run_config_with_base_and_forgetting(lora_run, tmp_path):
    cfg = yaml.safe_load((lora_run.parent / "run.yaml").read_text())
    cfg["eval"] = {"forgetting": True, "reference": REF}
    result = evaluate(cfg, output=tmp_path / "eval", cache_dir=tmp_path / "cache", echo=quiet)
    names = [m.label for m in result.models]
    assert names[0] == "base" and len(names) == 2
    tuned = names[1]
    val = result.results[tuned]["validation"]
    assert val.n == 6 and "perplexity" in val.metrics  # 24 rows, validation_ratio 0.25
    assert "forgetting/default/perplexity_delta" in result.forgetting[tuned]
    assert (tmp_path / "eval" / "report.md").is_file()


def test_evaluate_ad_hoc_adapter_measures_its_base_on_references_only(lora_run, qa_file, tmp_path):
    result = evaluate(model=str(lora_run), data=str(qa_file), settings={"metrics": ["exact_match"],
                      "max_new_tokens": 3}, reference=REF, output=tmp_path / "e", cache_dir=tmp_path / "c",
                      echo=quiet)
    assert result.reference_only == ["base"]
    assert "base" not in result.results or not result.results["base"]
    assert "exact_match" in result.results["run"]["qa"].metrics
    assert "forgetting/default/perplexity_delta" in result.forgetting["run"]


# --- CLI, through a tiny app as the main one registers them ---------------------------------

@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("compare")(compare_command)
    return app


def test_cli_compare_and_eval(app, tiny_model_dir, lora_run, qa_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", f"base={tiny_model_dir}", f"tuned={lora_run}", "--data", str(qa_file),
                              "--metrics", "exact_match,chrf", "--max-new-tokens", "3", "--extract", "first_line",
                              "--reference", "default", "--output", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"][0]["settings"]["extract"] == "first_line"
    assert data["tasks"][0]["settings"]["metrics"] == ["exact_match", "chrf"]
    assert "tunesmith compare" in res.output
    res = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(qa_file), "-m", "exact_match",
                              "--max-new-tokens", "3", "--no-forgetting", "--output", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev" / "report.md").is_file()


def test_cli_errors_are_clear(app, tiny_model_dir, qa_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(qa_file), "-m", "bleuu"])
    assert res.exit_code == 2 and "unknown metric 'bleuu'" in " ".join(res.output.split())
    res = runner.invoke(app, ["compare", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "compare config not found" in " ".join(res.output.split())


def test_compare_yaml(app, tiny_model_dir, lora_run, qa_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    spec = {"models": [{"name": "base", "model": str(tiny_model_dir)}, {"name": "tuned", "model": str(lora_run)}],
            "tasks": [{"name": "qa", "data": "qa.jsonl", "settings": {"metrics": ["exact_match"], "max_new_tokens": 2}}],
            "forgetting": False, "output": str(tmp_path / "yaml-out")}
    path = qa_file.parent / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["compare", str(path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "yaml-out" / "results.json").read_text())
    assert set(data["results"]) == {"base", "tuned"} and data["forgetting"] == {}
