"""The one training loop: every trainer resumes exactly, balances a MoE, and stops cleanly when it diverges."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.io.files import CheckpointError
from workbench.rl.distill import DistillConfig, logit_distill
from workbench.rl.grpo import GRPOConfig, grpo_train
from workbench.rl.sft import SFTConfig, cold_start_pairs, sft_train
from workbench.tasks import get_task
from workbench.train import TrainConfig, train
from workbench.train.loop import TrainingDiverged
from workbench.train.optim import LoopConfig
from workbench.train.run import read_metrics

TINY = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)
ADD = get_task("add")


def _model(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model(TINY)


def _same_weights(a: Model, b: Model) -> None:
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


# ---- every loop resumes exactly -------------------------------------------------------------------
def test_sft_resumes_exactly(tmp_path):
    pairs = cold_start_pairs(ADD, 48)
    cfg = SFTConfig(steps=6, batch_size=8, device="cpu", checkpoint_every=2)
    straight = _model()
    a = sft_train(straight, pairs, cfg, out_dir=tmp_path / "a", progress=False)
    stopped = _model()  # a Ctrl-C at step 4 (simulated): the step-2 checkpoint is kept
    _interrupt_at(4, lambda: sft_train(stopped, pairs, cfg, out_dir=tmp_path / "b", progress=False))
    resumed = _model(5)  # other weights: they come from the checkpoint
    b = sft_train(resumed, pairs, cfg, out_dir=tmp_path / "b", progress=False, resume=True)
    assert _strip(a.metrics) == _strip(b.metrics)
    assert _strip(read_metrics(tmp_path / "b")) == _strip(a.metrics)
    _same_weights(straight, resumed)


def test_distillation_resumes_exactly_and_balances_a_moe_student(tmp_path):
    teacher = _model(1)
    pairs = cold_start_pairs(ADD, 48)
    cfg = DistillConfig(steps=6, batch_size=8, device="cpu", checkpoint_every=3, bias_update_speed=0.01)
    straight = _model()
    bias_before = [r.e_score_correction_bias.clone() for r in straight.routers()]
    a = logit_distill(straight, teacher, pairs, cfg, out_dir=tmp_path / "a", progress=False)
    assert any(not torch.equal(r.e_score_correction_bias, b) for r, b in zip(straight.routers(), bias_before))
    assert all("max_vio" in row for row in a)
    stopped = _model()  # a run interrupted at step 4, continued from its step-3 checkpoint
    _interrupt_at(4, lambda: logit_distill(stopped, teacher, pairs, cfg, out_dir=tmp_path / "c", progress=False))
    resumed = _model()
    b = logit_distill(resumed, teacher, pairs, cfg, out_dir=tmp_path / "c", progress=False, resume=True)
    assert _strip(a) == _strip(b)
    _same_weights(straight, resumed)


def test_grpo_resumes_exactly(tmp_path):
    cfg = GRPOConfig(steps=4, prompts_per_step=2, group_size=2, inner_steps=2, eval_problems=4, eval_samples=1,
                     max_new_tokens=8, eval_every=2, checkpoint_every=2, device="cpu")  # fmt: skip
    straight = _model()
    a = grpo_train(straight, ADD, cfg, out_dir=tmp_path / "a", progress=False)
    stopped = _model()
    _interrupt_at(3, lambda: grpo_train(stopped, ADD, cfg, out_dir=tmp_path / "b", progress=False))
    resumed = _model(5)  # other weights: the policy and the frozen reference both come from the checkpoint
    b = grpo_train(resumed, ADD, cfg, out_dir=tmp_path / "b", progress=False, resume=True)
    assert _strip(a.metrics) == _strip(b.metrics)
    assert a.before == b.before and a.after == b.after
    _same_weights(straight, resumed)


def test_pretraining_resume_from_an_earlier_layout_checkpoint(tmp_path, small_dataset):
    """A run folder written by the earlier layout (a plain checkpoint/ folder) resumes exactly."""
    tc = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=3, device="cpu",
                     checkpoint_every=3)  # fmt: skip
    straight = train(TINY, tc, tmp_path / "a", dataset=small_dataset, progress=False)
    train(TINY, tc, tmp_path / "b", dataset=small_dataset, progress=False, stop_at=3)
    link = tmp_path / "b" / "checkpoint"
    target = link.resolve()
    link.unlink()
    target.rename(link)  # the earlier layout: the checkpoint folder itself at OUT/checkpoint
    (tmp_path / "b" / "checkpoints").rmdir()
    resumed = train(TINY, tc, tmp_path / "b", dataset=small_dataset, progress=False, resume=True)
    assert _strip(straight.metrics) == _strip(resumed.metrics)
    _same_weights(straight.model, resumed.model)
    assert (tmp_path / "b" / "checkpoint").is_symlink()  # and the folder now has the new layout


# ---- divergence and interruption ------------------------------------------------------------------
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_dataset):
    tc = TrainConfig(steps=40, batch_size=4, seq_len=32, warmup_steps=0, lr=1e4, grad_clip=0.0, eval_every=0,
                     device="cpu", checkpoint_every=1)  # fmt: skip
    with pytest.raises(TrainingDiverged, match="step") as info:
        train(TINY, tc, tmp_path, dataset=small_dataset, progress=False)
    assert "last good checkpoint" in str(info.value)
    from workbench import load_hf

    kept = load_hf(tmp_path / "checkpoint" / "model")
    assert all(torch.isfinite(p).all() for p in kept.parameters())
    step = json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"]
    assert 1 <= step < 40 and max(r["step"] for r in read_metrics(tmp_path)) >= step


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("nan")), ("grad_clip", float("inf")),
     ("steps", 2.5), ("steps", True), ("warmup_steps", -1), ("schedule", "linear"), ("beta2", 1.0)],
)  # fmt: skip
def test_hyper_parameters_are_checked_before_anything_runs(field, value):
    with pytest.raises(ValueError, match=field):
        LoopConfig(**{field: value})


def _interrupt_at(step: int, run, expect: bool = True):
    """Run ``run()`` with a KeyboardInterrupt raised at the start of step ``step`` (as a Ctrl-C would)."""
    import workbench.train.loop as loop_module

    real = loop_module.Update.__call__
    calls = {"n": 0}

    def interrupting(self, *args, **kwargs):
        if self.step >= step:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *args, **kwargs)

    loop_module.Update.__call__ = interrupting
    try:
        if expect:
            with pytest.raises(KeyboardInterrupt, match="resume"):
                run()
        else:
            run()
    finally:
        loop_module.Update.__call__ = real


def test_interrupt_message_says_how_to_resume(tmp_path, small_dataset):
    tc = TrainConfig(steps=6, batch_size=4, seq_len=32, device="cpu", checkpoint_every=2, eval_every=0)
    with pytest.raises(KeyboardInterrupt, match=r"step 3.*kept.*resume"):
        _interrupt_at(3, lambda: train(TINY, tc, tmp_path, dataset=small_dataset, progress=False), expect=False)
    with pytest.raises(CheckpointError, match="already holds"):  # the kept run is not restarted by accident
        train(TINY, tc, tmp_path, dataset=small_dataset, progress=False)
    done = train(TINY, tc, tmp_path, dataset=small_dataset, progress=False, resume=True)
    assert [r["step"] for r in done.metrics] == [1, 2, 3, 4, 5, 6]


def test_the_loop_serves_a_frozen_model_copy_unchanged():
    """``fit`` trains what requires gradients: a reference copy made before stays as it was."""
    model = _model()
    ref = copy.deepcopy(model)
    sft_train(model, cold_start_pairs(ADD, 16), SFTConfig(steps=2, batch_size=4, device="cpu"), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
