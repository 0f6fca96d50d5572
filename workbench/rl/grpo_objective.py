"""The pieces of GRPO's objective, as small pure functions (each unit-tested by hand-computed examples).

``workbench.rl.grpo`` explains the algorithm and runs it; here are its parts: group-relative advantages,
the k3 estimate of the KL to the reference, PPO's clipped surrogate, the token weights that make each
loss aggregation (GRPO, DAPO, Dr. GRPO) explicit, per-token log-probabilities at the sampling
temperature, and the loss of a (micro-)batch.
"""

from __future__ import annotations

from typing import Any

import torch

from workbench.model import Model

LOSS_AGGREGATIONS = ("sequence", "token", "constant")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (N,) in groups of ``group_size`` consecutive rows -> advantages (N,).

    ``r - mean(group)``, divided by ``std(group) + eps`` (unbiased std) when ``scale``.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # (groups, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool: True for rows whose group's rewards are all equal (no learning signal)."""
    r = rewards.float().view(-1, group_size)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)  # (groups, 1)
    return same.expand_as(r).reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi: e^(ref-logp) - (ref-logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token.

    logp, old_logp: (N, T); adv: (N,) or (N, T). Returns (objective (N, T), clipped_low, clipped_high),
    the last two bool (N, T): where the clip bound (not the ratio) set the objective, i.e. where the
    gradient is cut because the ratio already moved past 1 - eps_low (A < 0) or 1 + eps_high (A > 0).
    """
    if adv.dim() == 1:
        adv = adv[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    objective = torch.minimum(unclipped, clipped)
    clipped_low = (ratio < 1.0 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1.0 + eps_high) & (adv > 0)
    return objective, clipped_low, clipped_high


def token_weights(mask: torch.Tensor, loss_agg: str, max_new_tokens: int) -> torch.Tensor:
    """(N, T) weights w with loss = sum(w * per_token_loss): the loss aggregation, made explicit.

    mask (N, T): 1 on the completion tokens that count (rows of dropped groups are all 0).
    ``sequence``: 1 / (|o_i| * n), ``token``: 1 / sum|o|, ``constant``: 1 / (n * max_new_tokens), with n
    the number of rows that have any token. Because the weights are computed for the whole batch
    first, splitting it into micro-batches gives exactly the same gradient.
    """
    mask = mask.float()
    lengths = mask.sum(dim=1)  # (N,)
    n_rows = (lengths > 0).sum().clamp(min=1)
    if loss_agg == "sequence":
        return mask / (lengths.clamp(min=1)[:, None] * n_rows)
    if loss_agg == "token":
        return mask / mask.sum().clamp(min=1)
    if loss_agg == "constant":
        return mask / (n_rows * max_new_tokens)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")


def token_logprobs(model: Model, ids: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N, T) -> (log-probability of each next token (N, T-1), logits (N, T-1, V) in float32).

    At ``temperature`` != 1 the logits are divided by it first: the log-probabilities are those of the
    distribution the rollouts were sampled from (as TRL does), so the importance ratio compares like
    with like. The returned logits are the tempered ones.
    """
    logp, logits, _ = _policy_forward(model, ids, temperature)
    return logp, logits


def _policy_forward(model: Model, ids: torch.Tensor, temperature: float = 1.0):
    """``token_logprobs`` plus the forward's routing statistics (for balancing)."""
    out = model(ids, compute_mtp=False)
    logits = out.logits[:, :-1].float() / temperature  # (N, T-1, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    return logp, logits, out.routing


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution: logits (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    adv: torch.Tensor,
    weights: torch.Tensor,
    cfg: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a (micro-)batch: sum(weights * -(surrogate - beta * KL)), and masked statistics.

    cfg: a ``GRPOConfig`` (its ``clip_eps``, ``eps_high`` and ``beta``)."""
    live = weights > 0
    # masked before exp: at a padded position a log-prob may be -inf or huge, and exp() of it would give
    # inf in the forward and nan in the backward (0 * inf), reaching every parameter
    logp = torch.where(live, logp, torch.zeros_like(logp))
    old_logp = torch.where(live, old_logp, torch.zeros_like(old_logp))
    objective, low, high = clipped_surrogate(logp, old_logp, adv, cfg.clip_eps, cfg.eps_high)
    if ref_logp is not None:
        kl = k3_kl(logp, torch.where(live, ref_logp, torch.zeros_like(ref_logp)))
    else:
        kl = torch.zeros_like(logp)
    per_token = -(objective - cfg.beta * kl)
    loss = torch.where(live, weights * per_token, torch.zeros_like(per_token)).sum()
    stats = {"kl_sum": kl.detach()[live].sum(), "clip_low": low[live].sum(), "clip_high": high[live].sum()}
    stats["tokens"] = live.sum()
    return loss, stats


__all__ = [
    "LOSS_AGGREGATIONS",
    "clipped_surrogate",
    "entropy_of",
    "group_advantages",
    "grpo_token_loss",
    "k3_kl",
    "token_logprobs",
    "token_weights",
    "uniform_groups",
]
