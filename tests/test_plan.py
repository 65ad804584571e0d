"""`tunesmith plan`: counts from the config, peak memory from proxies, refusals before any proxy runs."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.cli import app
from tunesmith.errors import ConfigError


runner = CliRunner()


@pytest.fixture(scope="module")
def deep_tiny_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny llama with 8 blocks: deeper than the larger proxy, so the plan extrapolates."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-8")
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 8
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _config(model: Path, data: Path, out: Path, **method) -> dict:
    return {"model": {"name_or_path": str(model)}, "data": {"train": str(data), "max_length": 64},
            "method": {"type": "lora", "r": 4, "target_modules": "all-linear", **method},
            "training": {"batch_size": 4}, "output": {"dir": str(out)}}


def test_plan_extrapolates_counts_exactly_and_measures_the_real_run(deep_tiny_dir, alpaca_file, tmp_path):
    """Trainable parameters from the 2- and 6-block proxies equal the 8-block run's; the CLI prints the
    split and writes JSON; --measure trains the real model and its peak is near the estimate."""
    import yaml

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(deep_tiny_dir, alpaca_file, tmp_path / "run")))
    result = runner.invoke(app, ["plan", str(cfg_file), "--measure", "--gpu", "T4", "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert [p["blocks"] for p in plan["proxies"]] == [2, 6]
    assert plan["layers"] == 8
    assert plan["trainable_params"] == plan["measured"]["trainable"]  # 8 blocks x 7 linears of LoRA r=4
    assert plan["total_params"] == plan["measured"]["total"] - plan["measured"]["trainable"]
    assert sum(plan["memory"].values()) == pytest.approx(plan["peak"], abs=1)
    assert abs(plan["peak"] - plan["measured"]["peak"]) / plan["measured"]["peak"] < 0.25
    assert plan["gpu"]["name"] == "T4" and plan["gpu"]["fits"] is True
    for text in ("estimated peak", "optimizer states (AdamW)", "activations", "from proxies: 2 blocks",
                 "T4 (15 GiB)", "measured     real model"):
        assert text in result.output, result.output
    assert not (tmp_path / "run").exists()  # planning writes nothing where the run will go


def test_plan_refuses_before_any_proxy_runs(tiny_model_dir, alpaca_file, tmp_path):
    from tunesmith.planning import plan

    cfg = _config(tiny_model_dir, alpaca_file, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"--gpu: unknown card 'A100' \(known: T4, "):
        plan(cfg, gpu="A100")
    no_teacher = {**cfg, "objective": {"type": "distill", "teacher": str(tmp_path / "gone")},
                  "method": {"type": "full"}, "model": {"name_or_path": str(tiny_model_dir), "init_from_teacher_every": 2}}
    with pytest.raises(ConfigError, match="objective.teacher: "):
        plan(no_teacher)
    missing = {**cfg, "model": {"name_or_path": str(tmp_path / "nowhere")}}
    with pytest.raises(ConfigError, match="model.name_or_path: folder not found"):
        plan(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: x}\ndata: {train: y.jsonl}\ntraining: {batch_sise: 2}\n")
    result = runner.invoke(app, ["plan", str(bad)])
    assert result.exit_code == 2 and "training.batch_sise: unknown key" in result.output
    assert "Traceback" not in result.output


def test_plan_of_distillation_counts_the_teacher_once(deep_tiny_dir, alpaca_file, tmp_path):
    """The teacher is loaded whole in both proxies: its weights are a line of the split, not part of the
    per-block slope, and the estimate stays near the real run's measured peak."""
    from transformers import AutoModelForCausalLM

    from tunesmith.planning import plan

    cfg = {**_config(deep_tiny_dir, alpaca_file, tmp_path / "run"), "method": {"type": "full"},
           "objective": {"type": "distill", "teacher": str(deep_tiny_dir)}, "training": {"precision": "fp32",
                                                                                        "batch_size": 4}}
    p = plan(cfg, measure=True)
    teacher = AutoModelForCausalLM.from_pretrained(deep_tiny_dir)
    teacher_bytes = sum(t.numel() * 4 for t in {x.data_ptr(): x for x in teacher.state_dict().values()}.values())
    assert p.memory["second_model"] == p.measured["second_model"] == pytest.approx(teacher_bytes, rel=0.01)
    assert [x["second_model"] for x in p.proxies] == [p.memory["second_model"]] * 2
    assert abs(p.peak - p.measured["peak"]) / p.measured["peak"] < 0.25, (p.peak, p.measured)


def test_plan_of_a_student_cut_from_its_teacher_counts_the_kept_blocks(deep_tiny_dir, alpaca_file, tmp_path):
    """model.init_from_teacher_every: the student is the teacher's config with ceil(8 / 2) = 4 blocks."""
    from tunesmith.planning import model_config
    from tunesmith.config import load_config

    cfg = {**_config(deep_tiny_dir, alpaca_file, tmp_path / "run"), "method": {"type": "full"},
           "model": {"name_or_path": str(deep_tiny_dir), "init_from_teacher_every": 2},
           "objective": {"type": "distill", "teacher": str(deep_tiny_dir)}}
    assert model_config(load_config(cfg)).num_hidden_layers == 4


def test_a_proxy_settles_precision_before_its_peak_is_read(deep_tiny_dir, alpaca_file, tmp_path, monkeypatch):
    """precision auto's timing race builds models of its own: run inside the first proxy's measured window it
    raised that proxy's peak alone and flattened the per-block slope (SmolLM2, cold cache: 2,547 MB planned
    for a run that peaked at 3,951 MB). The child decides the precision, then resets the peak, then trains."""
    from tunesmith import api, planning
    from tunesmith.config import load_config

    order = []

    class Stop(Exception):
        pass

    def train(cfg, **kwargs):
        order.append("train")
        raise Stop

    monkeypatch.setattr(api, "decide_precision", lambda cfg, **kw: order.append("precision"))
    monkeypatch.setattr(planning, "_reset_peak_rss", lambda: order.append("reset"))
    monkeypatch.setattr(api, "train", train)
    cfg = load_config({**_config(deep_tiny_dir, alpaca_file, tmp_path / "run"), "training": {"precision": "auto"}})
    (tmp_path / "proxy").mkdir()
    request = tmp_path / "proxy" / "request.json"
    request.write_text(json.dumps({"kind": "proxy", "config": cfg.model_dump(mode="json"), "blocks": 2,
                                   "folder": str(tmp_path / "proxy")}))
    with pytest.raises(Stop):
        planning._child(str(request))
    assert order == ["precision", "reset", "train"]


def test_plan_of_a_multi_task_run_counts_every_tasks_adapter(tiny_bert_wide_dir, tmp_path):
    """A multi-task config plans like any run (its tasks' rows feed the proxy); with an adapter and a head per
    task its trainable count is the training run's own."""
    import tunesmith
    from conftest import classification_tasks
    from tunesmith.planning import plan

    cfg = {"model": {"name_or_path": str(tiny_bert_wide_dir)}, "tasks": classification_tasks(tmp_path),
           "method": {"type": "lora", "r": 4}, "multitask": {"shared": False},
           "training": {"batch_size": 4, "max_steps": 1, "progress": False, "precision": "fp32"},
           "eval": {"at_end": False, "forgetting": False}, "output": {"dir": str(tmp_path / "run")}}
    planned = plan(cfg)
    assert not (tmp_path / "run").exists()
    assert planned.trainable_params == tunesmith.train(cfg, echo=lambda _m: None).trainable_params


def test_gpu_estimate_counts_an_8_bit_base_at_one_byte_per_weight(tiny_model_dir, alpaca_file, tmp_path):
    """The card estimate and the memory split use one rule for a QLoRA base: 8-bit is 1 byte a weight, NF4
    about half (the estimate took NF4 for both)."""
    from tunesmith.config import load_config
    from tunesmith.planning import NF4_BYTES, _gpu_estimate

    total, trainable = 7_000_000_000, 20_000_000
    need = {}
    for bits in (4, 8):
        cfg = load_config(_config(tiny_model_dir, alpaca_file, tmp_path / "run", type="qlora", bits=bits))
        need[bits] = _gpu_estimate("T4", cfg, total, trainable, {"activations": 0}, "bf16")["estimate"]
    assert need[8] - need[4] == pytest.approx((total - trainable) * (1 - NF4_BYTES), rel=1e-6)
