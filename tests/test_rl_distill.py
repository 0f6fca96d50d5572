"""compare_students: the same student several ways at stated or tuned learning rates, models returned."""

from __future__ import annotations

import pytest
import torch

from workbench import Model
from workbench.io.tokenizer import load_tokenizer
from workbench.rl import distill
from workbench.rl.base import rl_model_config
from workbench.rl.distill import compare_students
from workbench.rl.grpo import GRPOConfig
from workbench.rl.rollout import evaluate
from workbench.rl.sft import cold_start_pairs
from workbench.tasks import get_task


def _small_model(seed: int) -> Model:
    torch.manual_seed(seed)
    return Model(rl_model_config(hidden_size=32, num_hidden_layers=1, first_k_dense_replace=1, intermediate_size=64))


@pytest.fixture
def traces(monkeypatch):
    """An untrained teacher solves nothing: let its 'verified traces' be the task's own worked traces."""
    task = get_task("add")
    pairs = cold_start_pairs(task, 8)

    def fake(teacher, task, n_prompts, **kw):
        return pairs, {"acceptance_rate": 1.0, "problems_solved": 1.0, "pairs": float(len(pairs))}

    monkeypatch.setattr(distill, "teacher_traces", fake)
    return task, pairs


def _run(task, **kw):
    grpo = GRPOConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, device="cpu")
    args = dict(steps=2, batch_size=4, grpo=grpo, eval_problems=4, eval_samples=1, max_new_tokens=8, progress=False)
    return compare_students(_small_model(1), _small_model(2), task, **{**args, **kw})


def test_a_grid_of_one_rate_trains_every_method_at_that_rate(traces):
    task, pairs = traces
    report = _run(task, lr_grid=[5e-3])
    assert report["lr"] == dict.fromkeys(distill.METHODS, 5e-3) and report["tuning"] == {}
    assert report["pairs"] == pairs and set(report["models"]) == set(distill.METHODS)
    # GRPO ran at the grid's rate, not at its own smaller default (the warmup keeps it below the peak)
    rl_rates = [row["lr"] for row in report["metrics"]["rl_only"]]
    assert GRPOConfig().lr < max(rl_rates) <= 5e-3
    # the returned model is the one that was evaluated
    examples = task.sample(4, seed=0, split="test")
    again = evaluate(report["models"]["sequence_distill"], task, examples, load_tokenizer(), n_samples=1,
                     temperature=1.0, max_new_tokens=8)  # fmt: skip
    assert again["accuracy"] == report["sequence_distill"]["accuracy"]
    assert again["length"] == report["sequence_distill"]["length"]


def test_a_grid_tunes_each_method_and_keeps_its_best_rate(traces):
    task, _ = traces
    report = _run(task, lr_grid=[1e-4, 1e-3], tune_problems=4, methods=["sequence_distill", "rl_only"])
    assert set(report["tuning"]) == {"sequence_distill", "rl_only"} and "logit_distill" not in report
    for method, scores in report["tuning"].items():
        assert set(scores) == {1e-4, 1e-3}
        assert scores[report["lr"][method]] == max(scores.values())


def test_without_a_grid_rl_keeps_its_own_rate(traces):
    task, _ = traces
    report = _run(task, lr=1e-3, methods=["sequence_distill", "rl_only"])
    assert report["lr"] == {"sequence_distill": 1e-3, "rl_only": GRPOConfig().lr}
    assert _run(task, lr=1e-3, rl_lr=5e-4, methods=["rl_only"])["lr"] == {"rl_only": 5e-4}


@pytest.mark.parametrize("bad", [{"methods": ["sft"]}, {"methods": []}, {"lr_grid": []}, {"lr_grid": [0.0]}])
def test_bad_options_say_what_is_wrong(traces, bad):
    task, _ = traces
    with pytest.raises(ValueError, match="methods|lr_grid"):
        _run(task, **bad)
