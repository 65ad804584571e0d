"""Reward functions the online-RL tests import by path ('rl_rewards:even')."""


def even(prompts, completions, completion_ids, **kwargs):
    """The share of even token ids: dense, so a tiny random policy can learn it in a few steps."""
    return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]
