"""The numerical core for token log-likelihoods: the LM head on labelled positions only.

With a 49k vocabulary and labels on a fraction of each row, running the LM head on every
position would be the largest matmul of a step and the largest tensor in memory. Training
(the causal-LM objectives) and evaluation (perplexity, forgetting) both score tokens through
`labelled_nll`, so a loss or a perplexity means the same thing wherever it appears.

Where the head is a plain linear layer, head and cross-entropy run as one fused function over
row chunks (`linear_cross_entropy`): no (tokens x vocab) logits, log-softmax or gradient buffer
lives past its chunk. On a 2-core CPU those buffers cost more than the head's matmuls
(docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import segments_active, shared_prompt_rows
from .data.templates import IGNORE
from .hardware import matmul_dtype

# Configs whose logits are post-processed in forward(); they take the plain forward path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Logit elements of one chunk: 2**23 fp32 values is 32 MB whatever the vocabulary, within
# glibc's largest heap-served block (so chunks reuse kept heap memory instead of fresh mmaps);
# smaller chunks slow the head's matmuls.
CHUNK_ELEMENTS = 1 << 23
# On an accelerator the caching allocator keeps big blocks and the head's matmuls want thousands of
# rows (2**23 logits are 65 rows of a 128k vocabulary): 2**27 fp32 logits are 512 MB, ~1,000 rows.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 27


def head_and_backbone(model: nn.Module):
    """(backbone, lm_head) when the LM head can be applied to selected positions only."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return None  # DDP must see forward() to synchronise gradients
    cfg = getattr(model, "active_peft_config", None)
    if getattr(getattr(cfg, "peft_type", None), "value", None) not in (None, "LORA"):
        return None  # prompt-style peft methods rewrite the inputs inside forward()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(lm, "config", None)
    if cfg is None or any(getattr(cfg, k, None) for k in _LOGIT_TRANSFORMS):
        return None
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is lm:
        return None
    return backbone, head


def _chunks(n_rows: int, vocab: int, device: torch.device | str = "cpu") -> list[slice]:
    if torch.device(device).type == "cpu":
        step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    else:  # whole tiles of 64 rows for the accelerator's matmuls
        step = max(64, ACCELERATOR_CHUNK_ELEMENTS // max(vocab, 1) // 64 * 64)
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _softmax_minus_onehot(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d nll / d logits, in place over the chunk's fp32 log-probabilities."""
    probs = logp.exp_()
    probs[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return probs


class _LinearCrossEntropy(torch.autograd.Function):
    """nll_i = logsumexp(h_i W^T) - (h_i W^T)[y_i], chunked over rows, logits in fp32.

    The gradient with respect to h is formed in forward, chunk by chunk, while each chunk's
    logits exist anyway; backward only scales it by the incoming per-token gradients. The
    weight's gradient (full fine-tuning, where the head trains) needs those scales, so backward
    recomputes the chunk logits for it.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                entropy: bool = False):
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if hidden.requires_grad else None
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # The distribution's entropy per row, while each chunk's log-probabilities exist (for logs; no gradient).
        ent = torch.empty_like(nll) if entropy else nll.new_zeros(0)
        for rows in _chunks(hidden.shape[0], w.shape[0], hidden.device):
            logp = torch.log_softmax(hidden[rows].to(dtype) @ w.T, dim=-1, dtype=torch.float32)
            nll[rows] = -logp.gather(1, targets[rows, None]).squeeze(1)
            if entropy:
                ent[rows] = -(logp.exp() * logp).sum(-1)
            if grad_hidden is not None:
                grad_hidden[rows] = (_softmax_minus_onehot(logp, targets[rows]).to(dtype) @ w).float()
        ctx.dtype, ctx.hidden_dtype = dtype, hidden.dtype
        ctx.save_for_backward(grad_hidden, hidden if weight.requires_grad else None,
                              weight if weight.requires_grad else None, targets)
        ctx.mark_non_differentiable(ent)
        return nll, ent

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor, _grad_entropy: torch.Tensor | None = None):
        grad_hidden, hidden, weight, targets = ctx.saved_tensors
        scale = grad_nll.float()[:, None]
        d_hidden = None
        if grad_hidden is not None and ctx.needs_input_grad[0]:
            d_hidden = (grad_hidden * scale).to(ctx.hidden_dtype)
        d_weight = None
        if weight is not None and ctx.needs_input_grad[1]:
            w = weight.to(ctx.dtype)
            d_weight = torch.zeros_like(weight, dtype=torch.float32)
            for rows in _chunks(hidden.shape[0], w.shape[0], hidden.device):
                h = hidden[rows].to(ctx.dtype)
                grad = _softmax_minus_onehot(torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32), targets[rows])
                d_weight += ((grad * scale[rows]).to(ctx.dtype).T @ h).float()
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row fp32 cross-entropy of `hidden @ weight.T` against `targets`, without full logits.

    Matches `F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")` with the
    matmul in autocast's dtype when autocast is on (tests/test_scoring.py holds the two equal).
    """
    return linear_cross_entropy_and_entropy(hidden, weight, targets)[0]


def linear_cross_entropy_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` and, with `entropy`, each row's distribution entropy (no gradient; else empty)."""
    dtype = matmul_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, entropy)


def _plain_head(head: nn.Module) -> bool:
    return isinstance(head, nn.Linear) and head.bias is None and type(head).forward is nn.Linear.forward


def _labelled_hidden(backbone: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                     share_prompts: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states of the positions that predict a label, those labels), flat over the batch.

    With `share_prompts`, rows that repeat a prompt run it once (`attention.shared_prompt_rows`)
    when the backbone runs segment attention and the rows have that shape.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    shared = shared_prompt_rows(inputs, labels) if share_prompts and segments_active(backbone) else None
    if shared is not None:
        packed, index = shared
        return backbone(**packed, use_cache=False).last_hidden_state[0, index], targets[mask]
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
    return hidden[mask], targets[mask]


def labelled_logits(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the positions that predict a label, those labels), both flat over the batch.

    labels[:, t] is predicted from position t - 1; IGNORE labels are not scored.
    """
    parts = head_and_backbone(model)
    if parts is not None:
        hidden, targets = _labelled_hidden(parts[0], inputs, labels)
        return parts[1](hidden), targets
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = model(**inputs, use_cache=False).logits
    # Prompt tuning / p-tuning prepend virtual tokens to the logits; keep the real ones.
    return logits[:, -inputs["input_ids"].shape[1]:][:, :-1][mask], targets[mask]


def labelled_nll(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *,
                 share_prompts: bool = False) -> torch.Tensor:
    """fp32 negative log-likelihood of every labelled token, flat over the batch in row order.

    labels[:, t] is predicted from position t - 1; IGNORE labels are not scored. `share_prompts`:
    see `labelled_scores`.
    """
    return labelled_scores(model, inputs, labels, share_prompts=share_prompts)[0]


def labelled_nll_and_entropy(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *,
                             temperature: float = 1.0, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`labelled_nll` of the distribution softmax(logits / temperature) (how online RL scores what it sampled
    at that temperature) and, with `entropy`, that distribution's entropy per labelled token (no gradient;
    else an empty tensor). Rows are prompt + completion: a group's shared prompt runs once (`share_prompts`)."""
    nll, ent, _ = labelled_scores(model, inputs, labels, temperature=temperature, entropy=entropy,
                                  share_prompts=True)
    return nll, ent


def labelled_scores(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *,
                    temperature: float = 1.0, entropy: bool = False, hidden: bool = False,
                    share_prompts: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`labelled_nll_and_entropy`, and with `hidden` the final hidden state of every labelled position
    (flat, in the same order): what PPO's value head reads, from the same forward pass. `share_prompts`:
    rows that repeat a prompt (a group of sampled answers, a preference pair) run it once where the
    model allows (`_labelled_hidden`); the numbers are those of the rows scored apart."""
    parts = head_and_backbone(model)
    if parts is not None:
        states, picked = _labelled_hidden(parts[0], inputs, labels, share_prompts)
        if _plain_head(parts[1]):
            scaled = states / temperature if temperature != 1.0 else states  # (h / T) W^T = logits / T
            nll, ent = linear_cross_entropy_and_entropy(scaled, parts[1].weight, picked, entropy)
            return nll, ent, (states if hidden else None)
        logits = parts[1](states)
    else:
        targets = labels[:, 1:]
        mask = targets != IGNORE
        out = model(**inputs, use_cache=False, output_hidden_states=hidden)
        width = inputs["input_ids"].shape[1]  # prompt-style methods prepend virtual positions: keep the real ones
        logits, picked = out.logits[:, -width:][:, :-1][mask], targets[mask]
        states = out.hidden_states[-1][:, -width:][:, :-1][mask] if hidden else None
    states = states if hidden else None
    if not len(picked):
        # No labelled token (every completion of a micro-batch masked): an empty result that stays on the
        # graph, so the loss built from it backpropagates zeros instead of failing for want of a grad_fn.
        return logits[:, 0].float(), logits.new_zeros(0, dtype=torch.float32), states
    nll, ent = [], []
    for rows in _chunks(len(picked), logits.shape[-1], logits.device):
        logp = torch.log_softmax(logits[rows].float() / temperature, dim=-1)
        nll.append(-logp.gather(1, picked[rows, None]).squeeze(1))
        if entropy:
            with torch.no_grad():
                ent.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(nll), (torch.cat(ent) if entropy else logits.new_zeros(0, dtype=torch.float32)), states


def sequence_logps(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, their count per row).

    The per-sequence form of `labelled_nll` that preference losses compare between the policy
    and its reference: the same head, chunking and dtype rules, so a DPO log-prob and an SFT
    loss are the same number for the same tokens. Rows are prompt + answer, so a prompt that
    several rows repeat (a preference pair) runs once (`share_prompts`).
    """
    nll = labelled_nll(model, inputs, labels, share_prompts=True)
    mask = labels[:, 1:] != IGNORE
    return sum_by_row(-nll, mask), mask.sum(1)


def sum_by_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sums of `values`, one value per True of `mask` in row-major order (labelled_nll's)."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)
