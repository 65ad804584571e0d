"""Pair accuracy: how often a reward model scores the chosen answer above the rejected one.

`tunesmith eval` on preference data (prompt / chosen / rejected) scores every pair with the
model's one-output head, through the same encoding, collation and reward read-out the `reward`
objective trains with (objectives/reward.py), so `pair_accuracy` / `pair_margin` here equal the
`eval_accuracy` / `eval_margin` a training run reports on the same pairs.

A pair counts as correct when r_chosen > r_rejected (ties count as wrong, as in TRL). Other
metrics (perplexity, generation metrics) need texts or reference answers that a pair does not
have, so preference data is scored with the pair metrics only (`pair_settings`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .spec import EvalSettings

PAIR_METRICS = ("pair_accuracy", "pair_margin")


def is_preference(records: list[dict]) -> bool:
    return bool(records) and all("chosen" in r and "rejected" in r for r in records)


def pair_settings(settings: EvalSettings, records: list[dict]) -> EvalSettings:
    """The settings a task is scored with: preference data gets the pair metrics asked for (default: both)."""
    if not is_preference(records):
        return settings
    wanted = [m for m in settings.metrics if m in PAIR_METRICS] or list(PAIR_METRICS)
    return settings.model_copy(update={"metrics": wanted})


def wants_pairs(settings: EvalSettings) -> bool:
    return any(m in PAIR_METRICS for m in settings.metrics)


def is_reward_model(model) -> bool:
    """A sequence-classification head with one output (what objective `reward` trains); a linear
    probe's pooled head (tunesmith's ProbedModel, `per_token` False) counts too."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    pooled_head = type(inner).__name__.endswith("ForSequenceClassification") or getattr(inner, "per_token", None) is False
    return pooled_head and getattr(getattr(inner, "config", None), "num_labels", None) == 1


def check_pair_records(records: list[dict], settings: EvalSettings, where: str) -> None:
    """Pair metrics need preference records, and preference records can only be scored with them."""
    pairs, asked = is_preference(records), [m for m in settings.metrics if m in PAIR_METRICS]
    if asked and not pairs:
        raise DataError(f"{where}: metrics {asked} score preference pairs, but the data is not in the "
                        "'preference' format (prompt, chosen, rejected)")
    other = [m for m in settings.metrics if m not in PAIR_METRICS]
    if pairs and other:
        raise DataError(f"{where}: preference pairs are scored with {list(PAIR_METRICS)} only; metrics {other} "
                        "need texts or reference answers")


def check_pair_model(model, settings: EvalSettings) -> None:
    if wants_pairs(settings) and not is_reward_model(model):
        raise ConfigError(
            f"pair metrics {list(PAIR_METRICS)} need a reward model (a sequence-classification head with one "
            f"output, as objective 'reward' trains), but {type(model).__name__} has none"
        )


def _records(data: list[dict] | str | Path) -> list[dict]:
    if not isinstance(data, (str, Path)):
        return data
    from ..config import DataConfig
    from ..data.pipeline import load_records

    records, _, _, _ = load_records(DataConfig(train=str(data), format="preference", shuffle=False))
    return records


@torch.no_grad()
def score_pairs(model, tokenizer, data: list[dict] | str | Path, *, max_length: int = 1024,
                batch_size: int = 8) -> dict[str, float]:
    """Pair accuracy and margins of a reward model on preference records (or a preference data file).

    Returns pair_accuracy, pair_margin (mean r_c − r_r), chosen_reward and rejected_reward (means),
    pairs (scored) and dropped_pairs (whose prompt alone fills max_length).
    """
    from ..config import DataConfig
    from ..objectives.reward import RewardModel, collate_reward_pairs, pair_rewards

    records = _records(data)
    if not is_preference(records):
        raise DataError("score_pairs: the records are not preference pairs (prompt, chosen, rejected)")
    check_pair_model(model, EvalSettings(metrics=list(PAIR_METRICS)))
    objective = RewardModel()
    data_cfg = DataConfig(train="pairs", max_length=max_length, truncation="right")
    rows = []
    for rec in records:
        row, _ = objective.encode(tokenizer, rec, data_cfg, None)
        if row is not None:
            rows.append(row)
    if not rows:
        raise DataError("score_pairs: no pair fits max_length (every prompt alone fills it)")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for i in range(0, len(rows), batch_size):
            batch = collate_reward_pairs(rows[i : i + batch_size], tokenizer.pad_token_id)
            c, r = pair_rewards(model, {k: v.to(device) for k, v in batch.items()})
            chosen.append(c.cpu())
            rejected.append(r.cpu())
    finally:
        model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"pair_accuracy": float((c > r).float().mean()), "pair_margin": float((c - r).mean()),
            "chosen_reward": float(c.mean()), "rejected_reward": float(r.mean()),
            "pairs": len(rows), "dropped_pairs": len(records) - len(rows)}
