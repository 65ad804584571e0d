"""`tunesmith eval` and `tunesmith compare`: parse options, call the evaluation API, print.

Registered on the main app with `app.command("eval")(eval_command)` and
`app.command("compare")(compare_command)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import ConfigError, TunesmithError

console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


def _split(values: list[str]) -> list[str]:
    """Repeated and/or comma-separated values: --metrics a,b --metrics c -> [a, b, c]."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _columns(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        if "=" not in item:
            raise ConfigError(f"--column '{item}': expected canonical=column, e.g. prompt=question")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _settings(metrics, extract, pattern, normalize, max_new_tokens, batch_size, max_length, do_sample,
              temperature, top_p, top_k, seed, no_chat_template) -> dict:
    """Only the options the user gave: the rest keep their per-form defaults."""
    s: dict = {}
    if metrics:
        s["metrics"] = _split(metrics)
    if extract is not None:
        s["extract"] = extract
    if pattern is not None:
        s["pattern"] = pattern
    if normalize is not None:
        s["normalize"] = [] if normalize.strip() in ("", "none") else _split([normalize])
    for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                       ("max_length", max_length), ("temperature", temperature), ("top_p", top_p),
                       ("top_k", top_k), ("seed", seed)):
        if value is not None:
            s[key] = value
    if do_sample:
        s["do_sample"] = True
    if no_chat_template:
        s["chat_template"] = False
    return s


def _references(reference: list[str], reference_task: list[str]) -> list[dict] | None:
    if not reference and not reference_task:
        return None
    return [{"path": p, "kind": "perplexity"} for p in reference] + \
        [{"path": p, "kind": "task"} for p in reference_task]


# Options shared by both commands (typer needs them spelled out per function).
_METRICS = typer.Option([], "--metrics", "-m", help="Metrics, comma-separated or repeated: perplexity, "
                        "exact_match, accuracy, macro_f1, bleu, chrf, rouge1, rouge2, rougeL; preference data "
                        "(prompt/chosen/rejected) on a reward model: pair_accuracy, pair_margin.")
_EXTRACT = typer.Option(None, "--extract", help="Answer extraction before exact match/accuracy/F1: none, "
                        "gsm8k ('####' else last number), hashes, last_number, first_line, regex.")
_PATTERN = typer.Option(None, "--pattern", help="Regex for --extract regex (group 1 if it has one).")
_NORMALIZE = typer.Option(None, "--normalize", help="Comma-separated: lowercase, punctuation, articles, "
                          "whitespace, numbers; 'none' for exact string equality (default: all).")
_MAX_NEW = typer.Option(None, "--max-new-tokens", help="Generation length limit (default 64).")
_BATCH = typer.Option(None, "--batch-size", help="Batch size for generation and perplexity (default 8).")
_MAXLEN = typer.Option(None, "--max-length", help="Longest input in tokens for perplexity (default 1024).")
_SAMPLE = typer.Option(False, "--do-sample", help="Sample instead of greedy decoding.")
_TEMP = typer.Option(None, "--temperature", help="Sampling temperature (with --do-sample).")
_TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling threshold (with --do-sample).")
_TOP_K = typer.Option(None, "--top-k", help="Top-k sampling (with --do-sample).")
_SEED = typer.Option(None, "--seed", help="Sampling seed (default 0).")
_NO_TEMPLATE = typer.Option(False, "--no-chat-template", help="Prompt with the raw text, not the chat template.")
_REFERENCE = typer.Option([], "--reference", help="Reference text/data file for forgetting perplexity "
                          "(repeatable; 'default' = the shipped general text).")
_REFERENCE_TASK = typer.Option([], "--reference-task", help="Reference task file scored by exact match "
                               "(repeatable; 'default' = the shipped general Q/A set).")
_NO_FORGET = typer.Option(False, "--no-forgetting", help="Do not measure the reference sets.")
_NO_CACHE = typer.Option(False, "--no-cache", help="Recompute everything; do not read or write the cache.")
_FORMAT = typer.Option("auto", "--format", help="Data format (auto, alpaca, chat, sharegpt, prompt_completion, text, "
                       "preference).")
_COLUMN = typer.Option([], "--column", help="Map a canonical field to your column: prompt=question (repeatable).")
_MAX_SAMPLES = typer.Option(None, "--max-samples", help="Evaluate the first N examples only.")
_DTYPE = typer.Option("fp32", "--dtype", help="Weights dtype: fp32, bf16, fp16.")
_EXAMPLES = typer.Option(10, "--show-examples", help="Differing examples per task in report.md.")


def eval_command(
    config: Optional[Path] = typer.Argument(None, help="Run config (YAML) of a trained run."),
    model: Optional[str] = typer.Option(None, "--model", help="Model: hub id, folder, .gguf, pkg://, run folder."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="peft adapter folder to put on --model."),
    task: Optional[str] = typer.Option(None, "--task", help="With --model: one task of a multi-task run."),
    data: Optional[str] = typer.Option(None, "--data", help="Data file to evaluate on (default for a run: "
                                       "its validation data)."),
    format: str = _FORMAT,
    column: list[str] = _COLUMN,
    max_samples: Optional[int] = _MAX_SAMPLES,
    metrics: list[str] = _METRICS,
    extract: Optional[str] = _EXTRACT,
    pattern: Optional[str] = _PATTERN,
    normalize: Optional[str] = _NORMALIZE,
    max_new_tokens: Optional[int] = _MAX_NEW,
    batch_size: Optional[int] = _BATCH,
    max_length: Optional[int] = _MAXLEN,
    do_sample: bool = _SAMPLE,
    temperature: Optional[float] = _TEMP,
    top_p: Optional[float] = _TOP_P,
    top_k: Optional[int] = _TOP_K,
    seed: Optional[int] = _SEED,
    no_chat_template: bool = _NO_TEMPLATE,
    reference: list[str] = _REFERENCE,
    reference_task: list[str] = _REFERENCE_TASK,
    no_forgetting: bool = _NO_FORGET,
    no_base: bool = typer.Option(False, "--no-base", help="With a run config: skip the base model."),
    set_: list[str] = typer.Option([], "--set", help="Override a run-config key: section.key=value."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default runs/eval/<name>)."),
    no_cache: bool = _NO_CACHE,
    dtype: str = _DTYPE,
) -> None:
    """Evaluate a trained run (CONFIG) or a model (--model ... --data ...): metrics, forgetting, report."""
    from .api import evaluate

    try:
        settings = _settings(metrics, extract, pattern, normalize, max_new_tokens, batch_size, max_length,
                             do_sample, temperature, top_p, top_k, seed, no_chat_template)
        evaluate(str(config) if config else None, model=model, adapter=adapter, task=task, data=data, format=format,
                 columns=_columns(column), max_samples=max_samples, settings=settings,
                 reference=_references(reference, reference_task),
                 forgetting=False if no_forgetting else None, include_base=not no_base, output=output,
                 use_cache=not no_cache, dtype=dtype, overrides=set_, console=console,
                 echo=lambda m: console.print(m, highlight=False))
    except TunesmithError as exc:
        _fail(exc)


def compare_command(
    models: list[str] = typer.Argument(..., help="A compare YAML, or models as [NAME=]SOURCE[::ADAPTER] "
                                       "(the first is the baseline)."),
    data: list[str] = typer.Option([], "--data", help="Data file(s) to evaluate on (repeatable; one task each)."),
    format: str = _FORMAT,
    column: list[str] = _COLUMN,
    max_samples: Optional[int] = _MAX_SAMPLES,
    metrics: list[str] = _METRICS,
    extract: Optional[str] = _EXTRACT,
    pattern: Optional[str] = _PATTERN,
    normalize: Optional[str] = _NORMALIZE,
    max_new_tokens: Optional[int] = _MAX_NEW,
    batch_size: Optional[int] = _BATCH,
    max_length: Optional[int] = _MAXLEN,
    do_sample: bool = _SAMPLE,
    temperature: Optional[float] = _TEMP,
    top_p: Optional[float] = _TOP_P,
    top_k: Optional[int] = _TOP_K,
    seed: Optional[int] = _SEED,
    no_chat_template: bool = _NO_TEMPLATE,
    reference: list[str] = _REFERENCE,
    reference_task: list[str] = _REFERENCE_TASK,
    no_forgetting: bool = _NO_FORGET,
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Model name deltas are measured against."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default runs/compare)."),
    no_cache: bool = _NO_CACHE,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Weights dtype: fp32 (default), bf16, fp16."),
    show_examples: Optional[int] = typer.Option(None, "--show-examples", help="Differing examples per task in "
                                                 "report.md (default 10)."),
) -> None:
    """Evaluate several models/adapters/checkpoints on the same data and settings; write reports."""
    from .api import compare

    try:
        is_yaml = len(models) == 1 and models[0].endswith((".yaml", ".yml"))
        if is_yaml and not Path(models[0]).is_file():
            raise ConfigError(f"compare config not found: {models[0]}")
        if not is_yaml and not data and no_forgetting:
            raise ConfigError("nothing to evaluate: pass --data FILE (or keep forgetting on)")
        settings = _settings(metrics, extract, pattern, normalize, max_new_tokens, batch_size, max_length,
                             do_sample, temperature, top_p, top_k, seed, no_chat_template)
        spec: dict = {}
        if is_yaml:
            from .spec import load_compare_spec

            spec = load_compare_spec(models[0]).model_dump(mode="json")
            if settings:  # command-line settings override every task's
                for t in spec["tasks"]:
                    t["settings"] = {**t["settings"], **settings}
        else:
            spec["models"] = [m for m in models]
        if data:
            spec["tasks"] = [{"data": d, "format": format, "columns": _columns(column), "max_samples": max_samples,
                              "settings": settings} for d in data]
        if baseline is not None:
            spec["baseline"] = baseline
        if dtype is not None:
            spec["dtype"] = dtype
        if show_examples is not None:
            spec["show_examples"] = show_examples
        model_list = None if is_yaml else models
        compare({k: v for k, v in spec.items() if k != "models"} | ({"models": spec["models"]} if is_yaml else {}),
                models=model_list, reference=_references(reference, reference_task),
                forgetting=False if no_forgetting else None, output=output,
                use_cache=False if no_cache else None, console=console,
                echo=lambda m: console.print(m, highlight=False))
    except TunesmithError as exc:
        _fail(exc)
