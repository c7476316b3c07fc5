"""DPO losses (Rafailov et al., 2023, and TRL's variants) as pure functions over per-pair summed logprobs."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo", "robust", "sigmoid_norm"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "robust", "sigmoid_norm")
# Nats of reward margin within which a pair is a tie (counted half in accuracy): before training every margin is
# floating-point noise (~1e-6 in fp32), which counted as wins reported accuracy 0.83 for an untrained policy.
TIE_TOLERANCE = 1e-3


def zero_margin_loss(loss_type: str, beta: float) -> float:
    """The preference loss when every log-ratio is 0 (the policy is the reference): ln 2 for the sigmoid family
    (with or without label smoothing), (1/(2β))² for ipo."""
    return (1 / (2 * beta)) ** 2 if loss_type == "ipo" else math.log(2)


def dpo_loss(
    logprobs_chosen: torch.Tensor,
    logprobs_rejected: torch.Tensor,
    ref_logprobs_chosen: torch.Tensor,
    ref_logprobs_rejected: torch.Tensor,
    beta: float,
    *,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    tokens_chosen: torch.Tensor | None = None,
    tokens_rejected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss (mean over pairs) and the step's metrics, as TRL's `DPOTrainer` computes them.

    Each tensor is `[num_pairs]`: the policy's / reference's log-probability of the response, summed over the
    response tokens only (token-sum, not mean, to avoid an implicit length bias); `tokens_*` are the response
    lengths in tokens, needed by `ipo`, `sigmoid_norm` and `nll_weight`. With h = (π_c - ref_c) - (π_r - ref_r):

    - sigmoid: -(1-ε)·log σ(βh) - ε·log σ(-βh) (ε = label_smoothing; conservative DPO when ε > 0);
    - robust: (-(1-ε)·log σ(βh) + ε·log σ(-βh)) / (1 - 2ε) (Chowdhury et al., 2024: unbiased under label noise ε);
    - ipo: (h̄ - 1/(2β))², h̄ from per-token MEAN logprobs, as TRL does (Azar et al., 2023);
    - sigmoid_norm: -log σ(βh̄), h̄ from per-token mean logprobs: length-normalised DPO (as in Tülu 3), so a
      long response is not preferred for its length's sake;
    plus nll_weight × the chosen responses' negative log-likelihood per token (RPO, Pang et al., 2024).
    Rewards, accuracy and margin are β × the summed log-ratios for every type, so runs of different types compare.
    Accuracy counts a pair whose margin is within `TIE_TOLERANCE` as half a win (`ties` counts them).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_log_ratio = logprobs_chosen - ref_logprobs_chosen
    rejected_log_ratio = logprobs_rejected - ref_logprobs_rejected
    logits = chosen_log_ratio - rejected_log_ratio
    metrics: dict[str, float] = {}
    if loss_type in ("ipo", "sigmoid_norm") or nll_weight:
        if tokens_chosen is None or tokens_rejected is None:
            raise ValueError(f"loss_type={loss_type} and nll_weight need the response lengths (tokens_chosen, "
                             "tokens_rejected)")
        tokens_chosen = tokens_chosen.to(logits.dtype).clamp(min=1)
        tokens_rejected = tokens_rejected.to(logits.dtype).clamp(min=1)
    if loss_type in ("ipo", "sigmoid_norm"):
        logits_norm = chosen_log_ratio / tokens_chosen - rejected_log_ratio / tokens_rejected
        metrics["margin_norm"] = float((beta * logits_norm).detach().mean())
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  + label_smoothing * F.logsigmoid(-beta * logits)) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits_norm - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * logits_norm)
    preference = losses.mean()
    loss = preference
    if nll_weight:
        nll = -logprobs_chosen.sum() / tokens_chosen.sum()  # per token over the batch's chosen responses, as TRL
        loss = preference + nll_weight * nll
        metrics["nll_loss"] = float(nll.detach())
    chosen_reward = (beta * chosen_log_ratio).detach()
    rejected_reward = (beta * rejected_log_ratio).detach()
    margins = chosen_reward - rejected_reward
    ties = margins.abs() <= TIE_TOLERANCE
    return loss, {
        "loss": float(loss.detach()),
        "dpo_loss": float(preference.detach()),  # the preference term of loss_type
        "accuracy": float(((margins > TIE_TOLERANCE).double() + 0.5 * ties.double()).mean()),
        "ties": float(ties.sum()),
        "margin": float((chosen_reward - rejected_reward).mean()),
        "chosen_reward": float(chosen_reward.mean()),
        "rejected_reward": float(rejected_reward.mean()),
        "logps/chosen": float(logprobs_chosen.detach().mean()),
        "logps/rejected": float(logprobs_rejected.detach().mean()),
        **metrics,
    }
