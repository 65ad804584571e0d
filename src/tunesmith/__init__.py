"""tunesmith: fine-tune language models from one YAML file."""

__version__ = "0.1.0"


def train(*args, **kwargs):
    """Fine-tune as a config says; see `tunesmith.api.train`."""
    from .api import train as _train

    return _train(*args, **kwargs)


def plan(*args, **kwargs):
    """Estimate a run's parameters, peak memory and speed before loading weights; see `tunesmith.planning.plan`."""
    from .planning import plan as _plan

    return _plan(*args, **kwargs)


def sweep(*args, **kwargs):
    """Search hyperparameters with Optuna, each trial a run; see `tunesmith.sweeping.sweep`."""
    from .sweeping import sweep as _sweep

    return _sweep(*args, **kwargs)


def generate_data(*args, **kwargs):
    """Write Self-Instruct style synthetic instruction data with a teacher model; see
    `tunesmith.data.synthetic.generate_instructions`."""
    from .data.synthetic import generate_instructions as _generate

    return _generate(*args, **kwargs)


def evaluate(*args, **kwargs):
    """Evaluate a run or a model on data; see `tunesmith.evaluation.api.evaluate`."""
    from .evaluation.api import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def compare(*args, **kwargs):
    """Evaluate several models on the same data and write reports; see `tunesmith.evaluation.api.compare`."""
    from .evaluation.api import compare as _compare

    return _compare(*args, **kwargs)


def merge(*args, **kwargs):
    """Merge models (and optionally search merge settings by evaluation); see `tunesmith.merging.merge`."""
    from .merging import merge as _merge

    return _merge(*args, **kwargs)


def export(*args, **kwargs):
    """Export a trained run (merged, GGUF or NF4); see `tunesmith.exporting.export`."""
    from .exporting import export as _export

    return _export(*args, **kwargs)


def serve(*args, **kwargs):
    """Serve a model and adapters with an OpenAI-compatible API; see `tunesmith.serving.serve`."""
    from .serving import serve as _serve

    return _serve(*args, **kwargs)


def push(*args, **kwargs):
    """Upload a run or export to the Hugging Face Hub; see `tunesmith.sharing.push`."""
    from .sharing import push as _push

    return _push(*args, **kwargs)


__all__ = ["train", "evaluate", "compare", "merge", "export", "serve", "push", "__version__"]
