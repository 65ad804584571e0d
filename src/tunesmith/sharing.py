"""`tunesmith push RUN --repo user/name`: a run's artifact (or an export folder) uploaded to the
Hugging Face Hub with its model card, through huggingface_hub's `create_repo` + `upload_folder`.

What goes up is staged first: the artifact's files, the run's card as README.md and its
config; a peft adapter whose config points at a local base folder (a GGUF cache, say) is
pointed at the hub id the card names instead, so `from_pretrained` works for whoever downloads
it. `HF_ENDPOINT` is read when pushing (not at import), so a stand-in hub can be used."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .errors import ConfigError, TunesmithError

SKIP = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class Plan:
    repo_id: str
    files: dict[str, Path]  # path in the repo -> local file
    notes: list[str] = field(default_factory=list)
    card: dict = field(default_factory=dict)
    adapter_base: str | None = None  # the hub id adapter_config.json will name instead of a local path


def plan_push(source: str | Path, repo_id: str) -> Plan:
    """Decide what `source` uploads as, reading files only."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .artifacts import _artifact_in

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"--repo: '{repo_id}' is not a valid repo id (user/name): {exc}") from exc
    if "/" not in repo_id:
        raise ConfigError(f"--repo: '{repo_id}' needs a namespace: user/name or org/name")
    path = Path(str(source)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"push: {source} is not a folder (a run, an artifact or an export)")
    found = _artifact_in(path)
    files: dict[str, Path] = {}
    notes: list[str] = []
    if found is not None:
        # Recursively: a multi-task run keeps per-task heads and adapters in sub-folders its manifest names.
        for f in sorted(found.rglob("*")):
            rel = f.relative_to(found)
            if f.is_file() and f.name not in SKIP and not any(part.startswith(".") for part in rel.parts):
                files[str(rel)] = f
        run = found.parent if found.parent != found and (found.parent / "config.yaml").is_file() else None
        if run is not None:
            if (run / "README.md").is_file():
                files["README.md"] = run / "README.md"
            files["tunesmith_config.yaml"] = run / "config.yaml"
    else:
        for f in sorted(path.rglob("*")):
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts):
                files[str(f.relative_to(path))] = f
        if not any(name in files for name in ("config.json", "adapter_config.json")) and \
                not any(name.endswith(".gguf") for name in files):
            raise ConfigError(f"push: {source} holds no model (no config.json, adapter_config.json or .gguf file)")
    if "README.md" not in files:
        raise ConfigError(f"push: {source} has no model card (README.md); a run folder or an export folder has one")
    card = _front_matter(files["README.md"])
    plan = Plan(repo_id, files, notes, card)
    if "adapter_config.json" in files:
        base = json.loads(files["adapter_config.json"].read_text()).get("base_model_name_or_path") or ""
        hub = card.get("base_model")
        if not hub:
            notes.append("the card names no base_model")
        elif not _HUB_ID.fullmatch(hub) or Path(hub).expanduser().exists():
            notes.append(f"the card's base_model {hub} is not a Hub id, so adapter_config.json keeps "
                         f"{base or 'no base'}; set output.card_base_model to the base's Hub id and push again")
        elif base != hub and (base.startswith(("/", ".", "~")) or Path(base).exists()):
            plan.adapter_base = hub
            notes.append(f"adapter_config.json: base_model_name_or_path {base} -> {hub} (a local path means "
                         "nothing on the Hub)")
    return plan


def push(source: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
         token: str | None = None, commit_message: str | None = None,
         echo: Callable[[str], None] = print) -> Plan:
    """Upload `source` to `repo_id` (created if missing); with `dry_run`, only list what would go."""
    plan = plan_push(source, repo_id)
    total = sum(f.stat().st_size for f in plan.files.values())
    echo(f"{'would upload' if dry_run else 'uploading'} {len(plan.files)} files ({total / 2**20:.1f} MiB) to "
         f"{repo_id} ({'private' if private else 'public'}):")
    for name, f in plan.files.items():
        echo(f"  {name}  {f.stat().st_size:,} bytes")
    card = plan.card
    echo("  card: " + ", ".join(f"{k}: {card[k]}" for k in ("base_model", "library_name", "tags", "datasets")
                                if card.get(k)))
    for note in plan.notes:
        echo(f"  note: {note}")
    if dry_run:
        return plan
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    if token is None and not _have_token():
        raise ConfigError("push: no Hugging Face token; run `hf auth login`, set HF_TOKEN, or pass --token")
    with tempfile.TemporaryDirectory(prefix="tunesmith-push-") as tmp:
        staged = Path(tmp)
        for name, f in plan.files.items():
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, staged / name)
        if plan.adapter_base:
            config = json.loads((staged / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = plan.adapter_base
            (staged / "adapter_config.json").write_text(json.dumps(config, indent=2))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type="model",
                                     commit_message=commit_message or f"Upload {Path(str(source)).name} with tunesmith")
        except HfHubHTTPError as exc:
            raise TunesmithError(f"push: the Hub refused the upload to {repo_id}: {exc}") from exc
        except Exception as exc:  # the HTTP client's own errors (connection refused, timeouts, TLS): no traceback
            raise TunesmithError(f"push: could not reach the Hub ({api.endpoint}) to upload to {repo_id}: "
                                 f"{type(exc).__name__}: {exc}") from exc
    echo(f"pushed: {getattr(info, 'commit_url', None) or repo_id}")
    return plan


def _have_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _front_matter(card: Path) -> dict:
    text = card.read_text()
    if not text.startswith("---"):
        return {}
    try:
        return yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"push: the front matter of {card} is not valid YAML: {exc}") from exc
