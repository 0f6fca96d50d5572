"""What a training run cost in FLOPs, from its config and its metrics log: a fair axis for comparisons.

Comparing two recipes "on the same number of steps" hides that their steps cost different amounts: a
step of MTP training runs an extra block and an extra output head, a step of logit distillation runs
the teacher too, a step of GRPO first *samples* a group of completions token by token. These functions
count the FLOPs of what each run did, with ``model.accounting.flops_per_token`` (2 FLOPs per active
weight per token forward, plus attention; backward twice the forward):

* ``pretrain_flops(config, steps, tokens_per_step)``: forward + backward of every token, with the MTP
  modules when the config has them (the MTP block and its pass through the shared output head);
* ``sft_flops(config, metrics, prompt_tokens, batch_size)``: forward + backward of prompt and completion
  of every pair in every batch (the loss skips the prompt, the compute does not);
* ``logit_distill_flops(student, teacher, ...)``: the same plus one teacher forward per token;
* ``grpo_flops(config, metrics, prompt_tokens, cfg)``: per step, sampling ``prompts x G`` completions
  (one forward per token), the reference model's forward (for the KL), and ``inner_steps`` forward +
  backward passes over the batch.

Where it simplifies: element-wise work, the optimiser and the evaluation are left out; the attention
term uses half of each sequence's length as its context; sampling with a KV cache is counted as one
forward per token (which it is for the weight matmuls).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workbench.config import ModelConfig
from workbench.model.accounting import flops_per_token


def _forward(config: ModelConfig, seq_len: float, include_mtp: bool = False) -> float:
    ctx = max(1, int(seq_len // 2))
    return flops_per_token(config, context=ctx, training=False, include_mtp=include_mtp)["total"]


def _check(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")


def pretrain_flops(config: ModelConfig, steps: int, batch_size: int, seq_len: int) -> float:
    """Forward + backward of ``steps x batch_size x seq_len`` tokens (MTP included when configured)."""
    _check(steps=steps, batch_size=batch_size, seq_len=seq_len)
    per_token = 3.0 * _forward(config, seq_len, include_mtp=config.num_nextn_predict_layers > 0)
    return per_token * steps * batch_size * seq_len


def mtp_overhead(config: ModelConfig, seq_len: int) -> float:
    """Extra training FLOPs per token of the MTP modules, as a fraction of the model without them."""
    _check(seq_len=seq_len)
    with_mtp = _forward(config, seq_len, include_mtp=True)
    without = _forward(config, seq_len, include_mtp=False)
    return with_mtp / without - 1.0


def sft_flops(config: ModelConfig, metrics: Sequence[dict[str, Any]], prompt_tokens: float, batch_size: int) -> float:
    """Forward + backward of every (prompt, completion) pair an SFT run trained on."""
    _check(prompt_tokens=prompt_tokens, batch_size=batch_size)
    total = 0.0
    for row in metrics:
        if "completion_tokens" not in row:
            continue
        seq = prompt_tokens + row["completion_tokens"] / batch_size
        total += 3.0 * _forward(config, seq) * batch_size * seq
    if total == 0.0:
        raise ValueError("no SFT step in the metrics (rows with completion_tokens)")
    return total


def logit_distill_flops(
    student: ModelConfig,
    teacher: ModelConfig,
    metrics: Sequence[dict[str, Any]],
    prompt_tokens: float,
    batch_size: int,
    completion_tokens: float,
) -> float:
    """Student forward + backward and teacher forward on every pair (``completion_tokens``: their mean length)."""
    _check(prompt_tokens=prompt_tokens, batch_size=batch_size, completion_tokens=completion_tokens)
    steps = sum(1 for row in metrics if "kl" in row)
    if steps == 0:
        raise ValueError("no logit-distillation step in the metrics (rows with kl)")
    seq = prompt_tokens + completion_tokens
    per_token = 3.0 * _forward(student, seq) + _forward(teacher, seq)
    return per_token * steps * batch_size * seq


def grpo_flops(config: ModelConfig, metrics: Sequence[dict[str, Any]], prompt_tokens: float, cfg: Any) -> float:
    """Sampling, the reference forward and ``inner_steps`` forward + backward passes of every GRPO step."""
    _check(prompt_tokens=prompt_tokens)
    n_seq = cfg.prompts_per_step * cfg.group_size
    ref = 1.0 if (cfg.beta > 0 or cfg.log_kl) else 0.0
    total = 0.0
    for row in metrics:
        if "response_length" not in row:
            continue
        seq = prompt_tokens + row["response_length"]
        forward = _forward(config, seq) * n_seq * seq
        total += forward * (1.0 + ref + 3.0 * cfg.inner_steps)
    if total == 0.0:
        raise ValueError("no GRPO step in the metrics (rows with response_length)")
    return total


__all__ = ["grpo_flops", "logit_distill_flops", "mtp_overhead", "pretrain_flops", "sft_flops"]
