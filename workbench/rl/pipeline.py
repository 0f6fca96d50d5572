"""The three R1 recipes end to end, at a named scale: R1-Zero, R1, and distillation into a smaller model.

* **R1-Zero**: base -> GRPO. Nothing but reinforcement learning with rule-based rewards.
* **R1**: base -> cold-start SFT on a few hundred worked traces -> GRPO -> rejection sampling (keep
  the verified samples of the RL model) -> SFT of the *base* on them -> a short final GRPO.
  (DeepSeek-R1 fine-tuned V3-Base again on the rejection-sampled data, then ran a last RL stage for
  all scenarios; we keep that shape.)
* **Distillation**: the R1 model is the teacher; a smaller student base is trained by sequence-level
  distillation, by logit distillation, and by GRPO alone, for the same number of optimiser steps.

Every stage is evaluated on the same held-out problems with the same sampling settings, so the numbers
of one report can be compared with each other. ``SCALES`` holds two sizes: ``ci`` (minutes on two CPU
cores, what the slow test runs) and ``laptop`` (the lesson's default, some ten minutes on a laptop).

Where it simplifies: R1's cold start used thousands of long human-readable traces, its RL ran for
thousands of steps on two reward types (rules for reasoning, a reward model for general questions),
its rejection-sampled SFT set had 800k samples. We keep the order of the stages and their purpose.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from workbench.io.tokenizer import Tokenizer, load_tokenizer
from workbench.model import Model
from workbench.rl.base import base_train_config, pretrain_base, rl_model_config
from workbench.rl.distill import compare_students
from workbench.rl.grpo import GRPOConfig, grpo_train
from workbench.rl.rollout import held_out_evaluator
from workbench.rl.sft import SFTConfig, cold_start_pairs, rejection_sample, sft_train
from workbench.tasks import Task


@dataclass
class Scale:
    """How big every stage is."""

    preset: str = "tiny"
    base_steps: int = 800  # pre-training steps of the base (batch 32 x 64 tokens)
    think_fraction: float = 0.5  # share of base documents that show their reasoning
    grpo: dict[str, Any] = field(default_factory=dict)  # GRPOConfig overrides
    cold_start_examples: int = 256
    cold_start_steps: int = 100
    rs_prompts: int = 512  # rejection sampling: training problems
    rs_samples: int = 4  # samples per problem
    rs_sft_steps: int = 150
    final_grpo_steps: int = 10
    student_overrides: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "num_hidden_layers": 2})
    distill_steps: int = 120
    distill_prompts: int = 1024
    eval_problems: int = 128
    eval_samples: int = 4
    eval_temperature: float = 1.0
    max_new_tokens: int = 48

    def grpo_config(self, **overrides: Any) -> GRPOConfig:
        values = {
            "max_new_tokens": self.max_new_tokens,
            "eval_problems": self.eval_problems,
            "eval_samples": self.eval_samples,
            "eval_temperature": self.eval_temperature,
        }
        values.update(self.grpo)
        values.update(overrides)
        return GRPOConfig(**values)


SCALES: dict[str, Scale] = {
    "ci": Scale(
        base_steps=800,
        grpo={"steps": 50, "eval_every": 0},
        cold_start_examples=128,
        cold_start_steps=40,
        rs_prompts=128,
        rs_sft_steps=40,
        final_grpo_steps=5,
        distill_steps=40,
        distill_prompts=256,
        eval_problems=128,
    ),
    "laptop": Scale(base_steps=800, grpo={"steps": 60, "eval_every": 10}),
}


def get_scale(name: str | Scale) -> Scale:
    if isinstance(name, Scale):
        return name
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    return SCALES[name]


def make_base(
    task: Task, scale: str | Scale = "laptop", *, seed: int = 0, student: bool = False, progress: bool = True
) -> Model:
    """Pre-train the R1-Zero base (or, with ``student``, the smaller student base) for ``task``."""
    s = get_scale(scale)
    config = rl_model_config(s.preset, **(s.student_overrides if student else {}))
    tc = base_train_config(s.base_steps, seed=seed)
    return pretrain_base(task, config, tc, think_fraction=s.think_fraction, progress=progress).model


def _evaluator(task: Task, s: Scale, tok: Tokenizer, seed: int):
    return held_out_evaluator(
        task,
        tok,
        s.eval_problems,
        seed=seed,
        n_samples=s.eval_samples,
        temperature=s.eval_temperature,
        max_new_tokens=s.max_new_tokens,
    )


def run_r1_zero(
    task: Task, base: Model, scale: str | Scale = "laptop", *, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """base -> GRPO. Returns stages [(name, held-out evaluation)], the GRPO metrics and the model."""
    s = get_scale(scale)
    tok = load_tokenizer()
    model = copy.deepcopy(base)
    t = time.perf_counter()
    res = grpo_train(model, task, s.grpo_config(seed=seed, eval_seed=seed), tokenizer=tok, progress=progress)
    return {
        "stages": [("base", res.before), ("grpo", res.after)],
        "metrics": {"grpo": res.metrics},
        "seconds": time.perf_counter() - t,
        "model": model,
    }


def run_r1(
    task: Task, base: Model, scale: str | Scale = "laptop", *, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """base -> cold start -> GRPO -> rejection sampling -> SFT of the base -> short GRPO."""
    s = get_scale(scale)
    tok = load_tokenizer()
    ev = _evaluator(task, s, tok, seed)
    stages: list[tuple[str, dict[str, Any]]] = [("base", ev(base))]
    metrics: dict[str, Any] = {}
    t = time.perf_counter()

    model = copy.deepcopy(base)
    pairs = cold_start_pairs(task, s.cold_start_examples, seed=seed)
    cold = SFTConfig(steps=s.cold_start_steps, seed=seed)
    metrics["cold_start"] = sft_train(model, pairs, cold, tokenizer=tok, progress=progress, desc="cold-start").metrics
    stages.append(("cold_start", ev(model)))

    res = grpo_train(model, task, s.grpo_config(seed=seed, eval_seed=seed), tokenizer=tok, progress=progress)
    metrics["grpo"] = res.metrics
    stages.append(("grpo", res.after))

    examples = task.sample(s.rs_prompts, seed=seed + 1, split="train")
    rs_pairs, rs_stats = rejection_sample(
        model, task, examples, tokenizer=tok, n_samples=s.rs_samples, max_new_tokens=s.max_new_tokens, seed=seed
    )
    final = copy.deepcopy(base)
    sft_data = rs_pairs + pairs  # the verified RL samples plus the cold-start traces
    sft = SFTConfig(steps=s.rs_sft_steps, seed=seed)
    metrics["rejection_sft"] = sft_train(final, sft_data, sft, tokenizer=tok, progress=progress, desc="rs-sft").metrics
    stages.append(("rejection_sft", ev(final)))

    if s.final_grpo_steps > 0:
        g = s.grpo_config(seed=seed + 1, eval_seed=seed, steps=s.final_grpo_steps, eval_every=0)
        res2 = grpo_train(final, task, g, tokenizer=tok, progress=progress)
        metrics["final_grpo"] = res2.metrics
        stages.append(("final_grpo", res2.after))
    return {
        "stages": stages,
        "metrics": metrics,
        "rejection_sampling": rs_stats,
        "seconds": time.perf_counter() - t,
        "model": final,
    }


def run_distillation(
    task: Task,
    teacher: Model,
    scale: str | Scale = "laptop",
    *,
    student_base: Model | None = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Teacher -> smaller student three ways (``distill.compare_students``), same steps each.

    ``options`` go to ``compare_students`` (``lr``, ``rl_lr``, ``lr_grid``, ``tune_problems``, ``methods``)."""
    s = get_scale(scale)
    if student_base is None:
        student_base = make_base(task, s, seed=seed, student=True, progress=progress)
    g = s.grpo_config(seed=seed, eval_every=0)
    return compare_students(
        teacher,
        student_base,
        task,
        steps=s.distill_steps,
        n_prompts=s.distill_prompts,
        grpo=g,
        eval_problems=s.eval_problems,
        eval_samples=s.eval_samples,
        eval_temperature=s.eval_temperature,
        max_new_tokens=s.max_new_tokens,
        seed=seed,
        progress=progress,
        **options,
    )


def stage_table(stages: list[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table of held-out accuracy, format rate and length per stage."""
    lines = [f"{'stage':<16} {'accuracy':>9} {'format':>7} {'length':>7}"]
    for name, ev in stages:
        lines.append(f"{name:<16} {ev['accuracy']:>9.3f} {ev['format']:>7.3f} {ev['length']:>7.1f}")
    return "\n".join(lines)


def scale_dict(scale: str | Scale) -> dict[str, Any]:
    return asdict(get_scale(scale))


__all__ = [
    "SCALES",
    "Scale",
    "get_scale",
    "make_base",
    "run_distillation",
    "run_r1",
    "run_r1_zero",
    "scale_dict",
    "stage_table",
]
