"""GRPO: Group Relative Policy Optimization, with the Dr. GRPO and DAPO variants as switches.

The idea (DeepSeekMath, then DeepSeek-R1)
-----------------------------------------
PPO needs a value network to tell a good action from a lucky one. GRPO drops it: for each prompt it
samples a *group* of G completions, scores each with the rule-based reward r_i, and uses the group as
its own baseline. Every token of completion i gets the same advantage

    A_i = (r_i - mean(r_1..G)) / std(r_1..G)            (std: unbiased, plus 1e-4)

so a completion is pushed up exactly when it did better than its siblings. The policy then takes
``inner_steps`` (mu) optimiser steps on the batch, maximising PPO's clipped surrogate per token t,

    ratio_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
    J_t     = min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i) - beta * KL_t

where pi_old is the policy that sampled the batch (so the first inner step has ratio 1) and KL_t is the
"k3" estimator of KL(pi || pi_ref) against the frozen starting model,

    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (>= 0, and 0 when the two agree)

The loss is -J averaged over tokens; *how* it is averaged is one of the switches below.

The switches (``GRPOConfig``)
-----------------------------
* ``scale_rewards`` (default True): divide by the group's std. **Dr. GRPO** ("Understanding R1-Zero-
  like training", Liu et al. 2025) sets it False: dividing by std up-weights groups that are nearly
  all right or all wrong, a difficulty bias.
* ``loss_agg``: ``"sequence"`` (GRPO: mean over a completion's tokens, then over completions; a long
  wrong answer is penalised less per token than a short one, so wrong answers drift longer),
  ``"token"`` (**DAPO**: one mean over all tokens of the batch), ``"constant"`` (**Dr. GRPO**: sum over
  tokens divided by completions x ``max_new_tokens``, a constant, so no length bias at all).
* ``clip_eps`` / ``clip_eps_high``: **DAPO's clip-higher** makes the upper bound looser
  (0.2 / 0.28), so that unlikely tokens with positive advantage can grow (it fights entropy collapse).
* ``drop_uniform_groups``: DAPO's dynamic sampling, simplified: groups whose rewards are all equal
  (zero advantage) are dropped from the loss. DAPO samples more prompts until the batch is full again;
  we train on a smaller batch instead.
* ``beta``: the KL weight (DeepSeekMath: 0.04; DAPO and Dr. GRPO use 0).

``GRPOConfig.variant("grpo" | "dr_grpo" | "dapo")`` sets the switches of each paper. With every switch
off (``beta=0``, ``inner_steps=1``, ``scale_rewards=False``) GRPO is REINFORCE with a per-prompt
mean baseline: with one inner step the ratio is 1 and the clip never acts.

Per step ``grpo_train`` logs (one JSON-friendly dict): reward, accuracy and format rate of the sampled
completions, response length, KL to the reference, clip fraction, entropy of the policy, the fraction of
groups that carried no signal, loss, gradient norm, and held-out accuracy every ``eval_every`` steps.
With ``sample_every`` > 0, every ``sample_every`` steps (and after the last) the row also holds
``samples``: the policy's greedy completions of the first ``sample_problems`` held-out problems, as
``{"question", "completion", "accuracy", "format"}`` dicts, to read how its writing changes during the
run. Greedy decoding draws no random numbers, so recording samples leaves the run itself unchanged.

What to expect at this scale
----------------------------
From the R1-Zero base (``base.py``), GRPO on ``add`` first teaches the *format*: the base reasons in
about half of its answers, and reasoning is more often right, so within ten or twenty steps nearly every
completion thinks first and the response length grows from about 13 to about 21 tokens. Then accuracy
keeps rising as the policy sharpens (entropy falls) on the reasoning it already had: at the ``laptop``
scale held-out accuracy went from 0.25 to 0.73 in 60 steps. A small policy is fragile: with a learning
rate of 5e-4 the same run *lost* accuracy (0.25 -> 0.06) while the format reward still rose, which is
why the default is 1e-4 with warmup, and a batch of 16 prompts x 8 samples to keep the gradient's noise
down.

Where it simplifies
-------------------
One process samples and trains (no separate inference engine); the sampler is our ``generate`` with
the latent cache, and the log-probabilities used for the ratio are recomputed by a full forward pass,
so sampler and trainer never disagree numerically. No reward model, no value model. The MoE routers'
balancing bias is not updated during RL (routing stays as pre-training left it). DeepSeek-R1 used
thousands of prompts per step and completions of thousands of tokens; we use a few dozen of each.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from workbench.config import ConfigError
from workbench.io.tokenizer import Tokenizer, tokenizer_of
from workbench.model import Model
from workbench.rl.grpo_objective import (
    LOSS_AGGREGATIONS,
    _policy_forward,
    clipped_surrogate,
    entropy_of,
    group_advantages,
    grpo_token_loss,
    k3_kl,
    token_logprobs,
    token_weights,
    uniform_groups,
)
from workbench.rl.rollout import (
    Rollouts,
    encode_prompt,
    evaluate,
    held_out_evaluator,
    pad_sequences,
    sample_completions,
    score,
    stop_ids,
)
from workbench.tasks import Example, Task
from workbench.tasks.rewards import combine
from workbench.train.loop import Update, fit
from workbench.train.optim import LoopConfig
from workbench.util import resolve_device


@dataclass
class GRPOConfig(LoopConfig):
    """Every knob of a GRPO run: the loop's (with RL's defaults) and GRPO's. Defaults: DeepSeekMath's
    GRPO at CI scale on the tiny model."""

    steps: int = 30  # rollout batches; each is followed by inner_steps optimiser steps
    lr: float = 1e-4  # RL gradients are noisy: a small model drifts (and forgets) at larger rates
    warmup_steps: int = 10  # optimiser steps of linear warmup, then constant (a fresh AdamW's first
    # steps move every weight by about lr whatever the gradient, which can wreck a small policy)
    schedule: str = "constant"
    weight_decay: float = 0.0
    eval_every: int = 10  # steps between held-out evaluations (0: only before and after)
    prompts_per_step: int = 16
    group_size: int = 8  # G: completions sampled per prompt
    inner_steps: int = 2  # mu: optimiser steps on each batch of rollouts
    beta: float = 0.04  # weight of the KL penalty to the reference model
    log_kl: bool = True  # keep a reference model to log the KL even when beta = 0 (one more forward)
    clip_eps: float = 0.2  # eps_low: the ratio is clipped below at 1 - clip_eps
    clip_eps_high: float | None = None  # eps_high (DAPO clip-higher: 0.28); None: same as clip_eps
    scale_rewards: bool = True  # divide advantages by the group std (GRPO); False: Dr. GRPO
    loss_agg: str = "sequence"  # "sequence" (GRPO), "token" (DAPO), "constant" (Dr. GRPO)
    drop_uniform_groups: bool = False  # DAPO dynamic sampling (as filtering): no loss on zero-signal groups
    accuracy_weight: float = 1.0  # reward = accuracy_weight * accuracy + format_weight * format
    format_weight: float = 0.5
    temperature: float = 1.0  # sampling temperature of the rollouts (and of the log-probabilities)
    top_p: float = 1.0
    max_new_tokens: int = 48  # completion budget (also the constant of loss_agg="constant")
    micro_batch_size: int = 0  # sequences per forward/backward (0: the whole batch at once)
    eval_problems: int = 64  # held-out (test split) problems
    eval_samples: int = 4  # samples per problem (pass@1 is their mean accuracy)
    eval_temperature: float = 1.0  # 0: greedy
    eval_seed: int = 0  # which held-out problems
    sample_every: int = 0  # steps between greedy samples of fixed held-out prompts in the metrics (0: none)
    sample_problems: int = 4  # how many held-out problems (the first ones) those samples answer
    pool_size: int = 4096  # training prompts are drawn from this many train-split problems

    resume_may_change: ClassVar[frozenset[str]] = LoopConfig.resume_may_change | {
        "eval_problems",
        "eval_samples",
        "eval_temperature",
        "eval_seed",
        "sample_every",
        "sample_problems",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompts_per_step", "inner_steps", "max_new_tokens", "eval_problems", "pool_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (the group is the baseline), got {self.group_size}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ConfigError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        for name in ("beta", "clip_eps", "sample_every", "micro_batch_size", "eval_samples", "eval_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_eps_high is not None and self.clip_eps_high < 0:
            raise ConfigError(f"clip_eps_high must be >= 0 or None, got {self.clip_eps_high}")
        if self.sample_problems < 1:
            raise ConfigError(f"sample_problems must be >= 1, got {self.sample_problems}")
        if not self.temperature > 0:
            raise ConfigError(
                f"temperature must be > 0 for training (the policy's log-probabilities are taken at the "
                f"sampling temperature), got {self.temperature}; use 1.0"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def updates_per_step(self) -> int:
        return self.inner_steps

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> GRPOConfig:
        """The switches of a paper: ``grpo`` (DeepSeekMath), ``dr_grpo`` (Liu et al.), ``dapo`` (Yu et al.)."""
        if name not in VARIANTS:
            raise ConfigError(f"unknown GRPO variant {name!r}; choose one of {', '.join(VARIANTS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown GRPOConfig field(s) {sorted(unknown)}")
        return cls(**{**VARIANTS[name], **overrides})


VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": dict(scale_rewards=True, loss_agg="sequence", clip_eps_high=None, drop_uniform_groups=False),
    "dr_grpo": dict(scale_rewards=False, loss_agg="constant", clip_eps_high=None, drop_uniform_groups=False),
    "dapo": dict(
        scale_rewards=True, loss_agg="token", clip_eps=0.2, clip_eps_high=0.28, drop_uniform_groups=True, beta=0.0
    ),
}


# =====================================================================================================
# The training loop
# =====================================================================================================


@dataclass
class GRPOResult:
    model: Model
    metrics: list[dict[str, Any]]  # one row per step
    before: dict[str, Any]  # held-out evaluation before the first step
    after: dict[str, Any]  # and after the last
    config: dict[str, Any] = field(default_factory=dict)


class GRPOTrainer:
    """A GRPO step: rollouts for ``prompts_per_step`` prompts, their advantages, ``inner_steps`` updates."""

    desc = "grpo"

    def __init__(self, task: Task, cfg: GRPOConfig, tok: Tokenizer, pool: list[Example], ref: Model | None, device):
        self.task, self.cfg, self.tok, self.pool, self.ref = task, cfg, tok, pool, ref
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.order_rng = random.Random(cfg.seed)
        self.order: list[int] = []
        self.stops = stop_ids(tok)
        self.before: dict[str, Any] | None = None
        # the first problems of the held-out set (``Task.sample`` draws prefix-stable)
        self.shown = task.sample(min(cfg.sample_problems, cfg.eval_problems), seed=cfg.eval_seed, split="test")

    def _next_prompts(self) -> list[Example]:
        batch = []
        for _ in range(self.cfg.prompts_per_step):
            if not self.order:
                self.order = list(range(len(self.pool)))
                self.order_rng.shuffle(self.order)
            batch.append(self.pool[self.order.pop()])
        return batch

    def step(self, model: Model, update: Update) -> dict[str, Any]:
        cfg, tok = self.cfg, self.tok
        # 1. rollouts: G completions for each of this step's prompts ----------------------------------
        batch = self._next_prompts()
        prompts = [encode_prompt(tok, self.task.prompt(ex)) for ex in batch]
        ro = sample_completions(model, prompts, cfg.group_size, max_new_tokens=cfg.max_new_tokens, stop=self.stops,
                                temperature=cfg.temperature, top_p=cfg.top_p, generator=self.gen)  # fmt: skip
        parts = score(self.task, batch, ro, tok)
        weights_of = {"accuracy": cfg.accuracy_weight, "format": cfg.format_weight}
        rewards = torch.tensor([combine(p, weights_of) for p in parts])  # (N,)

        # 2. advantages and the token weights of the loss ---------------------------------------------
        device = model.device
        adv = group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards).to(device)  # (N,)
        uniform = uniform_groups(rewards, cfg.group_size)
        ids, mask = pad_sequences(ro, tok.pad_id, device)  # (N, T), (N, T-1)
        if cfg.drop_uniform_groups:
            mask = mask * (~uniform).float().to(device)[:, None]
        weights = token_weights(mask, cfg.loss_agg, cfg.max_new_tokens)

        # 3. inner optimisation steps ----------------------------------------------------------------
        row = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.view(-1, cfg.group_size).std(dim=1).mean()),
            "accuracy": sum(p["accuracy"] for p in parts) / len(parts),
            "format": sum(p["format"] for p in parts) / len(parts),
            "response_length": sum(ro.lengths) / len(ro),
            "truncated": 1.0 - sum(ro.finished) / len(ro),
            "zero_signal_groups": float(uniform.view(-1, cfg.group_size)[:, 0].float().mean()),
            **self._train_on_batch(model, update, ids, mask, adv, weights),
        }
        if cfg.sample_every and (update.step == cfg.steps or update.step % cfg.sample_every == 0):
            row["samples"] = self.greedy_samples(model)
        return row

    def _train_on_batch(self, model: Model, update: Update, ids, mask, adv, weights) -> dict[str, Any]:
        """mu optimiser updates on one batch of rollouts; returns the step's training statistics."""
        cfg, N = self.cfg, ids.shape[0]
        mb = cfg.micro_batch_size or N
        chunks = [slice(i, min(N, i + mb)) for i in range(0, N, mb)]
        live_tokens = float((weights > 0).sum())
        out: dict[str, Any] = {"updated": live_tokens > 0}
        if live_tokens == 0:  # every group was uniform and dropped: nothing to learn from this batch
            out.update(kl=0.0, clip_frac=0.0, clip_frac_low=0.0, clip_frac_high=0.0, entropy=0.0)
            out.update(loss=0.0, grad_norm=0.0, lr=cfg.lr_at(update.count))
            return out
        tau = cfg.temperature
        with torch.no_grad():
            ref_logp = [token_logprobs(self.ref, ids[c], tau)[0] for c in chunks] if self.ref else [None] * len(chunks)
        old_logp: list[torch.Tensor] = []
        totals = {"kl_sum": 0.0, "clip_low": 0.0, "clip_high": 0.0, "tokens": 0.0, "loss": 0.0, "grad_norm": 0.0}
        entropy_sum = 0.0
        for inner in range(cfg.inner_steps):
            step_loss, counts = 0.0, None
            for k, c in enumerate(chunks):
                logp, logits, routing = _policy_forward(model, ids[c], tau)
                if inner == 0:  # the sampling policy is the current one: ratio = 1 on the first inner step
                    old_logp.append(logp.detach())
                    with torch.no_grad():
                        entropy_sum += float((entropy_of(logits) * mask[c]).sum())
                loss, st = grpo_token_loss(logp, old_logp[k], ref_logp[k], adv[c], weights[c], cfg)
                loss.backward()
                step_loss += float(loss.detach())
                batch_counts = [s.counts for s in routing]
                counts = batch_counts if counts is None else [a + b for a, b in zip(counts, batch_counts)]
                for key in ("kl_sum", "clip_low", "clip_high", "tokens"):
                    totals[key] += float(st[key])
            done = update(step_loss, counts)
            totals["loss"] += step_loss
            totals["grad_norm"] += done["grad_norm"]
        n_tok = max(1.0, totals["tokens"])
        out.update(
            loss=totals["loss"] / cfg.inner_steps,
            kl=totals["kl_sum"] / n_tok,
            clip_frac=(totals["clip_low"] + totals["clip_high"]) / n_tok,
            clip_frac_low=totals["clip_low"] / n_tok,
            clip_frac_high=totals["clip_high"] / n_tok,
            entropy=entropy_sum / max(1.0, float(mask.sum())),
            grad_norm=totals["grad_norm"] / cfg.inner_steps,
            lr=done["lr"],
        )
        return out

    def greedy_samples(self, model: Model) -> list[dict[str, Any]]:
        ev = evaluate(model, self.task, self.shown, self.tok, temperature=0.0, max_new_tokens=self.cfg.max_new_tokens,
                      return_samples=True)  # fmt: skip
        keys = ("question", "completion", "accuracy", "format")
        return [dict(zip(keys, sample)) for sample in ev["samples"]]

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        version, internal, gauss = self.order_rng.getstate()
        values = {
            "order_rng": [version, list(internal), gauss],
            "order": list(self.order),
            "generator": self.gen.get_state().tolist(),
            "before": self.before,
        }
        tensors = {f"ref.{k}": v for k, v in self.ref.state_dict().items()} if self.ref is not None else {}
        return values, tensors

    def load_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        version, internal, gauss = values["order_rng"]
        self.order_rng.setstate((version, tuple(internal), gauss))
        self.order = list(values["order"])
        self.gen.set_state(torch.tensor(values["generator"], dtype=torch.uint8))
        self.before = values.get("before")
        if self.ref is not None:
            self.ref.load_state_dict({k.removeprefix("ref."): v for k, v in tensors.items() if k.startswith("ref.")})


def grpo_train(
    model: Model,
    task: Task,
    cfg: GRPOConfig | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    ref_model: Model | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    train_examples: list[Example] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    balance_masks: list[torch.Tensor | None] | None = None,
) -> GRPOResult:
    """Train ``model`` on ``task`` with GRPO (in place); returns it with per-step metrics and before/after.

    ref_model: the frozen reference of the KL term (default: a copy of ``model`` as it starts).
    out_dir: the run folder (metrics.jsonl, checkpoints; see ``workbench.train.loop.fit``), resumable.
    train_examples: the prompts to train on (default: ``pool_size`` train-split problems).
    """
    cfg = cfg or GRPOConfig()
    tok = tokenizer_of(model, tokenizer)
    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.beta > 0 or cfg.log_kl:
        ref = ref_model if ref_model is not None else copy.deepcopy(model)
        ref.to(device).eval().requires_grad_(False)
    else:
        ref = None
    pool = train_examples or task.sample(min(cfg.pool_size, cfg.steps * cfg.prompts_per_step), cfg.seed, "train")
    trainer = GRPOTrainer(task, cfg, tok, pool, ref, device)
    run_eval = held_out_evaluator(task, tok, cfg.eval_problems, seed=cfg.eval_seed, n_samples=cfg.eval_samples,
                                  temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    evaluations: list[dict[str, Any]] = []

    def evaluate_now(m: Model) -> dict[str, float]:
        ev = run_eval(m)
        evaluations.append(ev)
        return {k: v for k, v in ev.items() if isinstance(v, float)}

    if not resume:
        trainer.before = run_eval(model)
    result = fit(model, cfg, trainer, out_dir=out_dir, evaluate=evaluate_now, resume=resume, overwrite=overwrite,
                 progress=progress, balance_masks=balance_masks)  # fmt: skip
    after = evaluations[-1] if evaluations else trainer.before
    return GRPOResult(model=model, metrics=result.metrics, before=trainer.before, after=after, config=asdict(cfg))


def rollout_table(task: Task, examples: list[Example], rollouts: Rollouts, tok: Tokenizer) -> list[dict[str, Any]]:
    """Every completion with its question and rewards, to read what the policy writes."""
    parts = score(task, examples, rollouts, tok)
    return [
        {"question": examples[p].question, "completion": text, **r, "length": len(c)}
        for p, text, r, c in zip(rollouts.prompt_index, rollouts.texts, parts, rollouts.completions)
    ]


__all__ = [
    "LOSS_AGGREGATIONS",
    "VARIANTS",
    "GRPOConfig",
    "GRPOResult",
    "clipped_surrogate",
    "entropy_of",
    "group_advantages",
    "grpo_token_loss",
    "grpo_train",
    "k3_kl",
    "rollout_table",
    "token_logprobs",
    "token_weights",
    "uniform_groups",
]
