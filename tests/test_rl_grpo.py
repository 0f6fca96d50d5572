"""GRPO end to end: a CI-scale R1-Zero run that really raises held-out accuracy, and quick smoke tests of
the training loops (GRPO, SFT, rejection sampling, logit distillation) on a very small model."""

from __future__ import annotations

import math
import time

import pytest
import torch

from workbench import Model
from workbench.io.tokenizer import load_tokenizer
from workbench.rl.base import base_documents, rl_model_config
from workbench.rl.distill import DistillConfig, distill_kl, logit_distill
from workbench.rl.grpo import GRPOConfig, grpo_train
from workbench.rl.pipeline import get_scale, make_base
from workbench.rl.rollout import Rollouts
from workbench.rl.sft import SFTConfig, cold_start_pairs, rejection_sample, sft_train
from workbench.tasks import get_task


def _small_model(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model(rl_model_config(hidden_size=32, num_hidden_layers=1, first_k_dense_replace=1, intermediate_size=64))


def _small_grpo(**kw) -> GRPOConfig:
    values = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8, eval_problems=4, eval_samples=2)
    values.update(kw)
    return GRPOConfig(device="cpu", **values)


def test_grpo_loop_logs_every_metric_and_is_deterministic():
    task = get_task("add")
    runs = [grpo_train(_small_model(), task, _small_grpo(), progress=False) for _ in range(2)]
    a, b = runs
    keys = ("reward", "accuracy", "format", "response_length", "kl", "clip_frac", "entropy", "loss", "grad_norm")
    for row in a.metrics:
        assert all(k in row and math.isfinite(row[k]) for k in keys), row
        assert row["kl"] >= 0 and 0 <= row["clip_frac"] <= 1 and row["entropy"] >= 0
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["format"] <= 1 and 1 <= row["response_length"] <= 8
    assert [r["reward"] for r in a.metrics] == [r["reward"] for r in b.metrics]
    assert [r["loss"] for r in a.metrics] == [r["loss"] for r in b.metrics]
    assert a.metrics[-1]["eval_accuracy"] == a.after["accuracy"]


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_every_variant_trains(variant):
    cfg = GRPOConfig.variant(
        variant, **{k: v for k, v in vars(_small_grpo()).items() if k in ("steps", "max_new_tokens")}
    )
    cfg.prompts_per_step, cfg.group_size, cfg.eval_problems, cfg.eval_samples, cfg.device = 2, 4, 4, 2, "cpu"
    res = grpo_train(_small_model(), get_task("countdown"), cfg, progress=False)
    assert len(res.metrics) == cfg.steps


def test_cold_start_sft_learns_the_format():
    task, tok = get_task("add"), load_tokenizer()
    model = _small_model()
    res = sft_train(model, cold_start_pairs(task, 64), SFTConfig(steps=40, batch_size=16, lr=3e-3, device="cpu"),
                    tokenizer=tok, progress=False)  # fmt: skip
    first, last = res.metrics[0]["main_loss"], res.metrics[-1]["main_loss"]
    assert last < 0.7 * first


def test_rejection_sampling_keeps_only_verified_samples(monkeypatch):
    task, tok = get_task("add"), load_tokenizer()
    examples = task.sample(2, seed=0)
    good = [task.trace(ex) for ex in examples]
    wrong = task.trace(examples[1]).replace("</think>", "</think>").rsplit("<answer>", 1)[0] + "<answer>0</answer>"
    texts = [good[0], good[0], "<answer>" + examples[0].answer + "</answer>", wrong]  # 2 samples per problem

    def fake_sampler(model, prompts, n, **kw):
        return Rollouts(prompts=list(prompts), prompt_index=[0, 0, 1, 1], completions=[tok.encode(t) for t in texts],
                        finished=[True] * 4)  # fmt: skip

    monkeypatch.setattr("workbench.rl.rollout.sample_completions", fake_sampler)
    pairs, stats = rejection_sample(_small_model(), task, examples, tokenizer=tok, n_samples=2, keep_per_prompt=2)
    # problem 0: the trace twice (kept once) and a format-less answer (rejected); problem 1: a wrong answer
    assert pairs == [(task.prompt(examples[0]), good[0])]
    assert stats["acceptance_rate"] == 0.5 and stats["problems_solved"] == 0.5


def test_logit_distillation_moves_the_student_toward_the_teacher():
    task, tok = get_task("add"), load_tokenizer()
    teacher, student = _small_model(1), _small_model(2)
    pairs = cold_start_pairs(task, 32)
    metrics = logit_distill(student, teacher, pairs, DistillConfig(steps=25, batch_size=16, lr=3e-3, device="cpu"),
                            tokenizer=tok, progress=False)  # fmt: skip
    assert metrics[-1]["kl"] < 0.5 * metrics[0]["kl"]
    logits = torch.randn(2, 3, 7)
    assert float(distill_kl(logits, logits, torch.ones(2, 3))) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_kl(torch.randn(2, 3, 7), logits, torch.ones(2, 3))) > 0


def test_base_corpus_mixes_reasoning_and_direct_answers():
    docs = base_documents(get_task("add"), 400, think_fraction=0.25)
    share = sum(d.domain == "think" for d in docs) / len(docs)
    assert 0.18 < share < 0.32
    assert all(("<think>" in d.text) == (d.domain == "think") for d in docs)
    held_out = {ex.question for ex in get_task("add").sample(300, split="test")}
    assert not any(d.text.split("\n")[0].removeprefix("User: ") in held_out for d in docs)


# ---- the CI-scale run ---------------------------------------------------------------------------
# Measured with `python scripts/rl_ci_check.py --seeds 0 1 2 --threads 1` (the CI scale: 800 base steps,
# 50 GRPO steps, 128 held-out problems x 4 samples at T = 1), held-out accuracy before -> after:
#   seed 0: 0.248 -> 0.742 (+0.494)   seed 1: 0.336 -> 0.551 (+0.215)   seed 2: 0.480 -> 0.842 (+0.361)
# The evaluation itself wobbles: on one CI-scale base, std 0.026 over five sampling seeds (same problems)
# and 0.029 over five draws of problems. The test runs seed 0 and asks for +0.10: less than half the
# smallest gain of any seed, and more than 3x the evaluation's own noise.
MARGIN = 0.1


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_at_ci_scale():
    """R1-Zero at CI scale: pre-train a base on the add corpus, GRPO it, compare held-out accuracy."""
    t0 = time.perf_counter()
    task, scale = get_task("add"), get_scale("ci")
    base = make_base(task, scale, seed=0, progress=False)
    cfg = scale.grpo_config(seed=0)
    res = grpo_train(base, task, cfg, progress=False)
    before, after = res.before, res.after
    rewards = [r["reward"] for r in res.metrics]
    print(
        f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
        f"format {before['format']:.3f} -> {after['format']:.3f}, "
        f"reward {rewards[0]:.3f} -> {rewards[-1]:.3f}, {time.perf_counter() - t0:.0f} s"
    )
    # accuracy on held-out problems rises by much more than the run-to-run noise
    assert after["accuracy"] > before["accuracy"] + MARGIN, (before, after)
    # R1-Zero's signature: the model learns to reason in the format, and its answers get longer
    assert after["format"] > 0.9 > before["format"]
    assert after["length"] > before["length"] + 3
    # the reward curve rises
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.15
    assert time.perf_counter() - t0 < 600
