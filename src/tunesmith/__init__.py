"""tunesmith: fine-tune language models from one YAML file."""

__version__ = "0.1.0"


def train(*args, **kwargs):
    """Fine-tune as a config says; see `tunesmith.api.train`."""
    from .api import train as _train

    return _train(*args, **kwargs)


__all__ = ["train", "__version__"]
