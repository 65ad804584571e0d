"""What a merged model says about itself: the model card (inputs, recipe, evaluation) and the
search report ranking every candidate (report.md, report.html, search.json)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..evaluation.report import _CSS, fmt, svg_bars

if TYPE_CHECKING:
    from .pipeline import CandidateResult, MergeResult

PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForSeq2SeqLM": "text2text-generation",
                 "AutoModelForMaskedLM": "fill-mask", "AutoModelForSequenceClassification": "text-classification",
                 "AutoModelForTokenClassification": "token-classification"}


def _table(ranked: list[CandidateResult], inputs: dict, tasks: list[dict]) -> list[str]:
    """Markdown rows: the inputs, then every candidate best first, each task's primary metric."""
    head = "| model | " + " | ".join(f"{t['name']} {t['metric']}" for t in tasks) + " | criterion |"
    lines = [head, "|---" * (len(tasks) + 2) + "|"]
    for label, per in inputs.items():
        cells = [fmt(t["metric"], per.get(t["name"], {}).get(t["metric"])) for t in tasks]
        lines.append(f"| {label} ({'base' if label == 'base' else 'input'}) | " + " | ".join(cells) + " | |")
    for i, r in enumerate(ranked):
        cells = [fmt(t["metric"], r.scores.get(t["name"], {}).get(t["metric"])) for t in tasks]
        crit = "–" if r.criterion is None else f"{r.criterion:.4f}"
        mark = " **(kept)**" if i == 0 else ""
        lines.append(f"| {r.name}{mark} | " + " | ".join(cells) + f" | {crit} |")
    return lines


def _usage(manifest: dict) -> list[str]:
    auto = manifest["auto_class"]
    if manifest.get("artifact") == "adapter":  # lora_combine: a peft adapter on the inputs' base
        peft_class = auto.replace("AutoModelFor", "AutoPeftModelFor")
        return [f"from peft import {peft_class}", f"model = {peft_class}.from_pretrained('path/to/this/folder')"]
    return [f"from transformers import {auto}", f"model = {auto}.from_pretrained('path/to/this/folder')"]


def render_merge_card(manifest: dict, *, ranked: list[CandidateResult] | None = None, inputs: dict | None = None,
                      tasks: list[dict] | None = None) -> str:
    recipe = manifest["merge"]
    front = {"base_model": [m["model"] for m in recipe["models"]] + ([recipe["base_model"]] if recipe["base_model"]
                                                                      else []),
             "library_name": "peft" if manifest.get("artifact") == "adapter" else "transformers", "pipeline_tag": PIPELINE_TAGS.get(manifest["auto_class"], "text-generation"),
             "tags": ["tunesmith", "merge", recipe["method"]]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# Merged model ({recipe['method']})", "",
             f"Merged with [tunesmith](https://github.com/tunesmith) by `{recipe['method']}` from "
             f"{len(recipe['models'])} model(s)" + (f" against the base `{recipe['base_model']}`"
                                                  if recipe["base_model"] else "") + ".", "",
             "## Usage", "", "```python", *_usage(manifest), "```", "",
             "## Inputs", "", "| name | model | parameters |", "|---|---|---|"]
    for m in recipe["models"]:
        params = ", ".join(f"{k}={v}" for k, v in m["parameters"].items()) or "defaults"
        lines.append(f"| {m['name']} | `{m['model']}` | {params} |")
    lines += ["", "## Recipe", "", "```yaml",
              yaml.safe_dump({k: recipe[k] for k in ("method", "parameters", "base_model", "dtype", "seed",
                                                     "tokenizer_source")}, sort_keys=False).strip(), "```"]
    if ranked and tasks:
        lines += ["", "## Evaluation", "",
                  "Each task's primary metric for the inputs and every candidate tried, best first "
                  "(the kept one is this model).", ""]
        lines += _table(ranked, inputs or {}, tasks)
    elif manifest.get("evaluation"):
        lines += ["", "## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in manifest["evaluation"].items():
            lines += [f"| {task} | {k} | {fmt(k, v)} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def write_search_report(result: MergeResult, folder: Path) -> dict[str, Path]:
    """search.json, report.md and report.html ranking the candidates; the kept one first."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "search.json", "markdown": folder / "report.md", "html": folder / "report.html"}
    data = {"output": str(result.output), "best": result.best, "select": result.select, "tasks": result.tasks,
            "inputs": result.inputs, "candidates": [r.to_json() for r in result.candidates],
            "seconds": round(result.seconds, 1)}
    paths["json"].write_text(json.dumps(data, indent=1))
    select = {"mean": "the mean of the tasks' primary metrics", "min": "the lowest of the tasks' primary metrics"}
    how = select.get(result.select, f"task {result.select}")
    kept = _kept_share(result)
    md = [f"# Merge search: {len(result.candidates)} candidate(s)", "",
          f"Ranked by {how} (lower-is-better metrics count negated). Kept: **{result.best}** in `{result.output}`.",
          ""] + _table(result.candidates, result.inputs, result.tasks)
    if kept:
        md += ["", "Share of each input's own score the kept model keeps on that task:", ""]
        md += [f"- {line}" for line in kept]
    paths["markdown"].write_text("\n".join(md) + "\n")
    charts = []
    for t in result.tasks:
        labels = list(result.inputs) + [r.name for r in result.candidates]
        values = [result.inputs[label].get(t["name"], {}).get(t["metric"]) for label in result.inputs] + \
                 [r.scores.get(t["name"], {}).get(t["metric"]) for r in result.candidates]
        charts.append(svg_bars(f"{t['name']} {t['metric']}", labels, values, t["metric"]))
    table_md = _table(result.candidates, result.inputs, result.tasks)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
                   for line in table_md[2:])
    header = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table_md[0].strip("|").split("|"))
    paths["html"].write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>merge search</title><style>{_CSS}</style></head>"
        f"<body><h1>Merge search: {len(result.candidates)} candidate(s)</h1><p>Ranked by {html.escape(how)}. Kept: "
        f"<b>{html.escape(result.best)}</b></p><table><tr>{header}</tr>{rows}</table>"
        + "".join(f"<ul>{''.join(f'<li>{html.escape(k)}</li>' for k in kept)}</ul>" for _ in [0] if kept)
        + "".join(charts) + "</body></html>")
    return paths


def _kept_share(result: MergeResult) -> list[str]:
    """For each task, the kept model's score as a share of the best input's (higher-is-better metrics)."""
    best = result.candidates[0]
    lines = []
    for t in result.tasks:
        if not t["higher_is_better"]:
            continue
        scored = {k: v.get(t["name"], {}).get(t["metric"]) for k, v in result.inputs.items() if k != "base"}
        scored = {k: v for k, v in scored.items() if v}
        if not scored:
            continue
        top = max(scored, key=scored.get)
        mine = best.scores.get(t["name"], {}).get(t["metric"])
        if mine is not None:
            lines.append(f"{t['name']}: {100 * mine / scored[top]:.0f}% of the best input's score "
                         f"({top}: {fmt(t['metric'], scored[top])})")
    return lines
