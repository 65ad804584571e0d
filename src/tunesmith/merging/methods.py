"""Merge methods: one pure function over the same tensor of every model.

Each function gets the input models' tensors (same shape), the base model's tensor (None when
the method needs no base), per-model parameters as lists (one value per input, e.g. `weight`)
and global ones as keywords, and returns the merged tensor in float32. Defaults and algorithms
follow mergekit 0.1.5 (see docs/merging.md for where they differ from the papers and PEFT),
so a recipe gives the same weights in either tool; `registry.py` lists them with their
parameters, and the engine in `streaming.py` decides which tensor and parameter values each
call sees. A function may set entries of the `tensors` list to None once it has used them, so
that the freshly read inputs the engine hands over are freed early (the largest tensor of a
model, its embedding, is what sets a merge's peak memory); the tensors themselves are never
modified.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def linear(tensors: list[Tensor], base: Tensor | None, *, weight: list[float], normalize: bool = True) -> Tensor:
    """Σ w_i θ_i, divided by Σ w_i when `normalize`."""
    merged = tensors[0].float() * weight[0]
    tensors[0] = None
    for i in range(1, len(tensors)):
        merged.add_(tensors[i].float(), alpha=weight[i])
        tensors[i] = None
    return merged.div_(sum(weight)) if normalize else merged


# --- sparsification of a task vector δ (mergekit's sparsify.py semantics), in place on δ ---

def _rescaled(delta: Tensor, mask: Tensor, rescale: bool, eps: float = 1e-7) -> Tensor:
    """δ·mask, scaled back to δ's L1 norm when `rescale` (mergekit's DARE rescale, not 1/density)."""
    before = delta.abs().sum() if rescale else None
    kept = delta.mul_(mask)
    if not rescale:
        return kept
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def magnitude_prune(delta: Tensor, density: float, rescale: bool = False) -> Tensor:
    """Keep the `density` share of entries with the largest |δ|. The same (unstable) descending
    argsort as mergekit, so entries tied in magnitude at the cut are kept alike in both tools."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k < 1:
        return delta.zero_()
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[order[:k]] = True
    del order
    return _rescaled(delta, mask.view_as(delta), rescale)


def random_prune(delta: Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
                 ) -> Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return _rescaled(delta, mask, rescale)


def outlier_prune(delta: Tensor, density: float, gamma: float, rescale: bool = False) -> Tensor:
    """Model breadcrumbs: drop the top `gamma` share by |δ| and the smallest, keeping `density`."""
    if density >= 1:
        return delta
    n = delta.numel()
    n_top = int(gamma * n)
    n_bottom = n - int(density * n) - n_top
    if n_bottom < 0:  # fewer outliers dropped so that `density` is still reached
        n_top, n_bottom = n_top + n_bottom, 0
    order = torch.sort(delta.abs().reshape(-1)).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bottom:n - n_top]] = True
    del order
    return _rescaled(delta, mask.view_as(delta), rescale)


def _task_vector_merge(tensors: list[Tensor], base: Tensor, weight: list[float], *, prune, consensus: bool,
                       normalize: bool, lambda_: float) -> Tensor:
    """θ_base + λ·(Σ w_i δ_i' [agreeing with the majority sign]) [÷ Σ of the counted weights].

    Lean on memory: each input is turned into its weighted task vector and dropped from the list
    (the engine hands over freshly read tensors), and sums accumulate in place.
    """
    base = base.float()
    deltas = []
    for i in range(len(tensors)):
        delta = tensors[i].float() - base
        tensors[i] = None
        deltas.append(prune(i, delta).mul_(weight[i]))
        del delta
    mixed = deltas[0].clone()
    for d in deltas[1:]:
        mixed.add_(d)
    if consensus:
        # TIES "sum" election: the sign of the summed weighted deltas; a pruned (zero) entry never agrees.
        majority = torch.where(mixed >= 0, 1.0, -1.0)
        mixed.zero_()
        divisor = torch.zeros_like(mixed)
        for d, w in zip(deltas, weight):
            agree = d.sign() == majority
            mixed.add_(d * agree)
            divisor.add_(agree, alpha=w)
        del majority
        divisor[divisor == 0] = 1
    else:
        total = sum(weight)
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total)
    del deltas
    if normalize:
        mixed.div_(divisor)
    return mixed.mul_(lambda_).add_(base)


def task_arithmetic(tensors: list[Tensor], base: Tensor, *, weight: list[float], lambda_: float = 1.0,
                    normalize: bool = False) -> Tensor:
    return _task_vector_merge(tensors, base, weight, prune=lambda i, d: d, consensus=False,
                              normalize=normalize, lambda_=lambda_)


def ties(tensors: list[Tensor], base: Tensor, *, weight: list[float], density: list[float], lambda_: float = 1.0,
         normalize: bool = True) -> Tensor:
    return _task_vector_merge(tensors, base, weight, prune=lambda i, d: magnitude_prune(d, density[i]),
                              consensus=True, normalize=normalize, lambda_=lambda_)


def _dare(consensus: bool):
    def merge(tensors: list[Tensor], base: Tensor, *, weight: list[float], density: list[float],
              lambda_: float = 1.0, normalize: bool = False, rescale: bool = True,
              generator: torch.Generator | None = None) -> Tensor:
        return _task_vector_merge(
            tensors, base, weight, prune=lambda i, d: random_prune(d, density[i], rescale, generator),
            consensus=consensus, normalize=normalize, lambda_=lambda_)
    return merge


def _breadcrumbs(consensus: bool):
    def merge(tensors: list[Tensor], base: Tensor, *, weight: list[float], density: list[float],
              gamma: list[float], lambda_: float = 1.0, normalize: bool = False) -> Tensor:
        return _task_vector_merge(
            tensors, base, weight, prune=lambda i, d: outlier_prune(d, density[i], gamma[i]),
            consensus=consensus, normalize=normalize, lambda_=lambda_)
    return merge


def slerp(tensors: list[Tensor], base: Tensor | None, *, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from the base (t = 0) to the one model (t = 1), or from the first of
    two models to the second when there is no base.

    The angle comes from the two flattened tensors normalised; nearly colinear tensors
    (|cos| > dot_threshold) are interpolated linearly. Computed in float64.
    """
    start, end = (base, tensors[0]) if base is not None else (tensors[0], tensors[1])
    v0, v1 = start.double(), end.double()
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > dot_threshold:
        return ((1 - t) * v0 + t * v1).float()
    theta = math.acos(dot)
    s0 = math.sin(theta - theta * t) / math.sin(theta)
    s1 = math.sin(theta * t) / math.sin(theta)
    return (s0 * v0 + s1 * v1).float()


def model_stock(tensors: list[Tensor], base: Tensor, *, filter_wise: bool = False) -> Tensor:
    """Model Stock: t = N·c / (1 + (N−1)·c) from the mean pairwise cosine c of the task vectors;
    t·mean(θ_i) + (1 − t)·θ_base. Per row when `filter_wise`."""
    shape = base.shape
    w0 = base.float()
    ws = [t.float() for t in tensors]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


dare_linear, dare_ties = _dare(False), _dare(True)
breadcrumbs, breadcrumbs_ties = _breadcrumbs(False), _breadcrumbs(True)
