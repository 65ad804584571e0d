"""The training engine: one loop, checkpoints, tracking."""

from .loop import FitResult, evaluate_loss, fit

__all__ = ["FitResult", "evaluate_loss", "fit"]
