"""The command line: parse arguments, call the API, print. No logic of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import ConfigError, TunesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune language models from one YAML file.")
data_app = typer.Typer(no_args_is_help=True, help="Look at datasets before training on them.")
app.add_typer(data_app, name="data")
console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue from the latest checkpoint ('latest') or a checkpoint/run folder."
    ),
) -> None:
    """Fine-tune a model as CONFIG says."""
    from . import api
    from .engine.loop import Interrupted

    try:
        result = api.train(config, set_, resume=True if resume == "latest" else resume,
                           echo=lambda m: console.print(m, highlight=False))
    except Interrupted as exc:
        import os

        if os.environ.get("RANK", "0") != "0":  # under torchrun: one process reports
            raise typer.Exit(130 if exc.signal_name == "SIGINT" else 143)
        console.print(f"[bold yellow]stopped:[/] {exc}", highlight=False)
        if exc.checkpoint is not None:
            console.print(f"resume: tunesmith train {config} --resume latest"  # one line, to copy
                          + "".join(f" --set {s}" for s in set_), highlight=False, soft_wrap=True)
        raise typer.Exit(130 if exc.signal_name == "SIGINT" else 143)
    except TunesmithError as exc:
        _fail(exc)
    except OSError as exc:  # an unwritable or full output folder, named by the OS error
        _fail(exc)
    _print_metrics(result.metrics)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Also say whether the run fits this card "
                                                          "(T4, L4, A10G, RTX-4090, A100-40GB, A100-80GB, H100-80GB, ...)."),
    measure: bool = typer.Option(False, "--measure", help="Also train the real model a few steps: measured "
                                                          "tokens/s and peak memory beside the estimate."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the plan as JSON here."),
) -> None:
    """Parameters, peak memory and speed of CONFIG's run, estimated before its weights load."""
    import json

    from .planning import plan as make_plan
    from .planning import render

    try:
        p = make_plan(config, set_, gpu=gpu, measure=measure, echo=lambda m: console.print(m, highlight=False))
    except TunesmithError as exc:
        _fail(exc)
    typer.echo(render(p))
    if json_out is not None:
        json_out.write_text(json.dumps(p.to_dict(), indent=1))


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="Sweep file (YAML): base config, search space, metric, budget."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials to finish (overrides the file's)."),
) -> None:
    """Search hyperparameters with Optuna; each trial is a run. Run again to resume a killed sweep."""
    from .engine.loop import Interrupted
    from .sweeping import sweep as run_sweep

    try:
        run_sweep(spec, trials=trials, echo=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except Interrupted as exc:  # the sweep stops with its trial; running it again resumes both
        console.print(f"[bold yellow]stopped:[/] {exc}", highlight=False)
        console.print(f"resume: tunesmith sweep {spec}" + (f" --trials {trials}" if trials else ""),
                      highlight=False, soft_wrap=True)
        raise typer.Exit(130 if exc.signal_name == "SIGINT" else 143)
    except TunesmithError as exc:
        _fail(exc)


@app.command("config")
def show_config(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
) -> None:
    """Print the fully resolved, validated config."""
    from .config import dump_config, load_config

    try:
        # Plain echo: rich would wrap long lines and break the YAML when redirected to a file.
        typer.echo(dump_config(load_config(config, set_)), nl=False)
    except TunesmithError as exc:
        _fail(exc)


@app.command()
def quickstart(
    output: Path = typer.Option(Path("runs/quickstart"), help="Run folder."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: one epoch)."),
) -> None:
    """LoRA-tune SmolLM2-135M-Instruct on the built-in task and show base vs tuned."""
    from .quickstart import run_quickstart
    from .quiet import quiet_libraries

    quiet_libraries()  # run_quickstart imports peft (and so bitsandbytes) before any model loads
    try:
        run_quickstart(output, steps=steps, console=console)
    except TunesmithError as exc:
        _fail(exc)


@data_app.command("inspect")
def data_inspect(
    file: str = typer.Argument(..., help="Data file or hub dataset id."),
    format: str = typer.Option("auto", "--format", help="Force a format instead of detecting it."),
    model: Optional[str] = typer.Option(None, "--model", help="Tokenizer source for token-length stats."),
    max_length: int = typer.Option(1024, help="Length used for the 'would be truncated' share."),
    column_names: Optional[str] = typer.Option(
        None, "--column-names", help="Header of a CSV/TSV file without one, comma-separated (e.g. text,label)."),
    column: list[str] = typer.Option(
        [], "--column", help="FIELD=COLUMN: read the format's field from another column (repeatable), "
                             "e.g. --column text=sentence."),
    against: Optional[str] = typer.Option(
        None, "--against", help="A validation/test file: rows of FILE found in it (exactly or nearly) are leaks."),
    write_clean: Optional[Path] = typer.Option(
        None, "--write-clean", help="Folder for the cleaned rows (data.jsonl) and their dataset card (README.md)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write the report as HTML with plots."),
) -> None:
    """Format, size, fields, labels, token lengths, and quality: duplicates and near-duplicates, leakage,
    outliers, languages, echoed prompts, chat structure; optionally a cleaned copy with a dataset card."""
    from .data.inspect import inspect_data, render_report

    names = [n.strip() for n in column_names.split(",")] if column_names else None
    try:
        mapping = {}
        for item in column:
            field, sep, name = item.partition("=")
            if not sep or not field.strip() or not name.strip():
                raise ConfigError(f"--column: '{item}' is not FIELD=COLUMN (e.g. text=sentence)")
            mapping[field.strip()] = name.strip()
        report = inspect_data(file, format=format, model=model, max_length=max_length, column_names=names,
                              columns=mapping, against=against, write_clean=write_clean, html=html)
    except TunesmithError as exc:
        _fail(exc)
    render_report(report, console)


@data_app.command("generate")
def data_generate(
    seeds: str = typer.Argument(..., help="Seed tasks: Self-Instruct's seed_tasks.jsonl shape or Alpaca rows."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file to write (Alpaca rows + provenance)."),
    base_url: str = typer.Option(..., "--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8011/v1."),
    model: str = typer.Option(..., "--model", help="The teacher's model name at that endpoint."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Default: TUNESMITH_API_KEY or OPENAI_API_KEY."),
    num: int = typer.Option(100, "--num", help="Instructions to keep, counting those a resumed run already has."),
    concurrency: int = typer.Option(4, "--concurrency", help="Requests in flight at once."),
    temperature: float = typer.Option(0.7, "--temperature"),
    top_p: float = typer.Option(0.5, "--top-p"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="The most tokens of one answer."),
    similarity_threshold: float = typer.Option(
        0.7, "--similarity-threshold", help="Drop an instruction whose ROUGE-L F with any kept one reaches this."),
    prompt_examples: int = typer.Option(3, "--prompt-examples", help="Example tasks shown in each prompt."),
    max_requests: Optional[int] = typer.Option(
        None, "--max-requests", help="Stop after this many requests (default: 4 per instruction wanted)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the choice of example tasks and the teacher's sampling."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted or finished run's file."),
) -> None:
    """Self-Instruct: have a teacher model write new instruction data from SEEDS, filtered for quality
    and diversity (ROUGE-L)."""
    from .data.synthetic import generate_instructions

    try:
        summary = generate_instructions(
            seeds, output, base_url=base_url, api_key=api_key, model=model, num_instructions=num,
            num_prompt_instructions=prompt_examples, concurrency=concurrency, temperature=temperature, top_p=top_p,
            max_tokens=max_tokens, similarity_threshold=similarity_threshold, seed=seed, max_requests=max_requests,
            overwrite=overwrite, resume=resume, echo=lambda m: console.print(m, highlight=False))
    except TunesmithError as exc:
        _fail(exc)
    except OSError as exc:  # an unwritable output folder, named by the OS error
        _fail(exc)
    dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items() if v) or "none"
    console.print(f"kept {summary['kept']} of {summary['target']} in {summary['output']} "
                  f"({summary['requests']} requests; dropped: {dropped}); stats: {summary['stats']}",
                  highlight=False, soft_wrap=True)
    if not summary["complete"]:
        console.print(f"[bold yellow]stopped:[/] {summary['max_requests']} requests spent; add --resume to go on",
                      highlight=False)


@app.command()
def methods() -> None:
    """Which method can train which objective (the tested support matrix), with reasons."""
    from rich.table import Table

    from .methods.matrix import matrix

    grid = matrix()
    objectives = list(next(iter(grid.values())))
    table = Table(title="methods x objectives (yes = supported and tested; n = see note n)")
    table.add_column("method", no_wrap=True)
    for o in objectives:
        # Objective names break at "_" so the table fits an 80-column terminal.
        table.add_column(o.replace("_", "_\n"), justify="center")
    notes: dict[str, int] = {}
    for m, row in grid.items():
        cells = []
        for o in objectives:
            why = row[o]
            if why is None:
                cells.append("[green]yes[/]")
            else:
                n = notes.setdefault(why, len(notes) + 1)
                cells.append(f"[red]{n}[/]")
        table.add_row(m, *cells)
    console.print(table)
    for why, n in notes.items():
        console.print(f"{n}. {why}", highlight=False)


@app.command()
def rewards() -> None:
    """The built-in reward functions of online RL (objective.rewards) and their arguments."""
    from rich.table import Table

    from .reward_functions import describe_builtins

    for fn in describe_builtins():
        table = Table(title=f"{fn['name']}: {fn['summary']}", title_justify="left", show_lines=False)
        for column in ("argument", "type", "default", "meaning"):
            table.add_column(column)
        for arg in fn["args"]:
            table.add_row(arg["name"], arg["type"], arg["default"], arg["description"])
        console.print(table)
    console.print("Your own: {function: 'my_module:my_function', weight: 1.0}, called as TRL calls reward "
                  "functions: fn(prompts=..., completions=..., completion_ids=..., **columns) -> list of floats "
                  "or None.", highlight=False)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="Merge recipe (YAML): models, base_model, method, parameters, ..."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: key.sub=value (repeatable)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Output folder (overrides the recipe's)."),
    device: Optional[str] = typer.Option(None, "--device", help="Where tensors are merged: cpu, cuda, cuda:1."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Score every candidate again."),
) -> None:
    """Merge models (linear, task arithmetic, TIES, DARE, SLERP, ...); with a search block, build,
    evaluate and rank every candidate and keep the best."""
    from .merging import merge as run

    try:
        result = run(recipe, overrides=set_, output=output, device=device, overwrite=overwrite or None,
                     use_cache=not no_cache, echo=lambda m: console.print(m, highlight=False))
    except TunesmithError as exc:
        _fail(exc)
    if len(result.candidates) > 1 or result.tasks:
        from rich.table import Table

        from .evaluation.report import fmt

        table = Table(title=f"merge candidates (kept: {result.best})")
        table.add_column("model")
        for t in result.tasks:
            table.add_column(f"{t['name']} {t['metric']}", justify="right")
        for label, per in result.inputs.items():
            table.add_row(f"{label} ({'base' if label == 'base' else 'input'})", *[fmt(t["metric"], per.get(t["name"], {}).get(t["metric"]))
                                                for t in result.tasks])
        for r in result.candidates:
            table.add_row(r.name, *[fmt(t["metric"], r.scores.get(t["name"], {}).get(t["metric"]))
                                    for t in result.tasks])
        console.print(table)


@app.command()
def export(
    source: str = typer.Argument(..., help="A run or artifact folder, a peft adapter folder or a model folder."),
    format: str = typer.Option("merged", "--format",
                               help="merged: a plain transformers model; gguf: llama.cpp/Ollama file(s) and a "
                                    "Modelfile; bnb-4bit: NF4 safetensors for GPU serving."),
    output: Optional[Path] = typer.Option(None, "--output", help="Output folder (default: SOURCE/export-FORMAT)."),
    dtype: str = typer.Option("auto", "--dtype", help="merged: auto (fp32: the fold computes in fp32, whatever the base's stored dtype), fp32, bf16 or fp16."),
    type_: list[str] = typer.Option(["f16"], "--type", help="gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 "
                                                            "(repeat for several files)."),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="gguf: load each file back with transformers and compare tokens, logits and "
                                     "greedy generations with the model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Export a trained run: merged into its base, as GGUF, or as 4-bit safetensors."""
    from .exporting import export as run
    from .exporting.gguf_export import ExportCheckError

    try:
        run(source, format=format, output=output, dtype=dtype, types=tuple(type_), verify=verify,
            overwrite=overwrite, echo=lambda m: console.print(m, highlight=False))
    except ExportCheckError as exc:  # the files exist but are wrong: not a usage error
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1)
    except TunesmithError as exc:
        _fail(exc)


@app.command()
def serve(
    source: str = typer.Argument(..., help="A model (folder, hub id, .gguf) or a run folder to serve."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH: a peft adapter (or run) on the same base, "
                                                            "chosen by the request's `model` (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNESMITH_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/ routes."),
    name: Optional[str] = typer.Option(None, "--name", help="The base model's name in /v1/models."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16 weights."),
    lazy: bool = typer.Option(False, "--lazy", help="Load each adapter on its first request, not at start."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="The most tokens one request may ask for."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Completions decoded together."),
    max_queue: int = typer.Option(256, "--max-queue", help="Completions waiting before new requests get 429."),
    max_request_bytes: int = typer.Option(1_000_000, "--max-request-bytes"),
) -> None:
    """Serve a model and adapters with an OpenAI-compatible API (chat, completions, streaming)."""
    from .serving import Limits
    from .serving import serve as run

    limits = Limits(max_tokens=max_tokens, default_max_tokens=min(256, max_tokens),
                    max_request_bytes=max_request_bytes, max_batch_size=max_batch_size, max_queue=max_queue)
    try:
        run(source, adapters=adapter, host=host, port=port, api_key=api_key, dtype=dtype, lazy=lazy, name=name,
            limits=limits, echo=lambda m: console.print(m, highlight=False))
    except TunesmithError as exc:
        _fail(exc)


@app.command()
def chat(
    source: str = typer.Argument(..., help="A model or a run folder."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A peft adapter on SOURCE."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    temperature: float = typer.Option(0.7, "--temperature", help="0 for greedy decoding."),
    top_p: float = typer.Option(0.95, "--top-p"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16 weights."),
) -> None:
    """Chat in the terminal with streaming output; /reset, /system TEXT, /exit."""
    from .serving.chat import chat_loop
    from .serving.models import load_served

    try:
        served = load_served(source, {"adapter": Path(adapter)} if adapter else None, dtype=dtype)
        chat_loop(served, max_tokens=max_tokens, temperature=temperature, top_p=top_p, system=system,
                  adapter="adapter" if adapter else None)
    except TunesmithError as exc:
        _fail(exc)


@app.command()
def push(
    source: str = typer.Argument(..., help="A run folder, an artifact folder or an export folder."),
    repo: str = typer.Option(..., "--repo", help="user/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded; upload nothing."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
    message: Optional[str] = typer.Option(None, "--message", help="Commit message."),
) -> None:
    """Upload a run's artifact (or an export) to the Hugging Face Hub with its model card."""
    from .sharing import push as run

    try:
        run(source, repo, private=private, dry_run=dry_run, token=token, commit_message=message,
            echo=lambda m: console.print(m, highlight=False))
    except TunesmithError as exc:
        _fail(exc)


@app.command("merge-methods")
def merge_methods() -> None:
    """The merge methods and their parameters (per model or global), defaults and ranges."""
    from rich.table import Table

    from .merging.registry import MERGE_METHODS

    for m in MERGE_METHODS.values():
        needs = ("needs base_model" if m.needs_base else "base_model for one model" if m.pair_without_base
                 else "no base")
        table = Table(title=f"{m.name}: {m.summary} ({needs})", title_justify="left")
        for column in ("parameter", "scope", "default", "range"):
            table.add_column(column)
        for scope, params in (("per model", m.per_model), ("global", m.globals)):
            for name, p in params.items():
                table.add_row(name, scope, "required" if p.default is None else str(p.default), p.describe())
        console.print(table)


@app.command()
def env() -> None:
    """Versions, device and dtype support."""
    from rich.table import Table

    from .api import env_info

    table = Table(title="tunesmith environment", show_header=False)
    for k, v in env_info().items():
        table.add_row(k, str(v))
    console.print(table)


def _print_metrics(metrics: dict) -> None:
    from rich.table import Table

    if not metrics:
        return
    table = Table(title="final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


def _register_eval_commands() -> None:
    from .evaluation.cli import compare_command, eval_command

    app.command("eval")(eval_command)
    app.command("compare")(compare_command)


_register_eval_commands()

if __name__ == "__main__":
    app()
