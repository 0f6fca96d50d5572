"""Training: the loss goes down, checkpoints are atomic, and a resumed run is the same run."""

from __future__ import annotations

import json

import pytest
import torch

from workbench import ModelConfig
from workbench.io.files import CheckpointError
from workbench.train import TrainConfig, lr_at, read_metrics, train

CONFIG = ModelConfig.from_preset("tiny")


def _tc(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_every=4, eval_batches=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss(small_dataset):
    result = train(
        CONFIG,
        _tc(steps=40, batch_size=8, seq_len=64, warmup_steps=5, eval_every=20),
        dataset=small_dataset,
        progress=False,
    )
    first, last = result.metrics[0], result.metrics[-1]
    assert last["eval_loss"] < first["main_loss"] - 2.0  # from ~ln(2048)=7.6 to well below
    assert last["main_loss"] < first["main_loss"] - 2.0
    assert {"loss", "main_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "max_vio", "tokens"} <= set(last)


def test_resume_is_exact(tmp_path, small_dataset):
    tc = _tc(steps=8, checkpoint_every=2)
    straight = train(CONFIG, tc, tmp_path / "a", dataset=small_dataset, progress=False)
    train(CONFIG, tc, tmp_path / "b", dataset=small_dataset, progress=False, stop_at=5)
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5]
    resumed = train(CONFIG, tc, tmp_path / "b", dataset=small_dataset, progress=False, resume=True)
    a = [m["loss"] for m in straight.metrics]
    b = [m["loss"] for m in resumed.metrics]
    assert len(b) == 8
    assert a == b  # bit for bit
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == list(range(1, 9))
    for (na, pa), (nb, pb) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_resume_refuses_a_different_run(tmp_path, small_dataset):
    train(CONFIG, _tc(steps=2), tmp_path, dataset=small_dataset, progress=False)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(CONFIG, _tc(steps=4, batch_size=2), tmp_path, dataset=small_dataset, progress=False, resume=True)
    with pytest.raises(CheckpointError, match="model config"):
        train(
            CONFIG.replace(n_routed_experts=16, n_group=4),
            _tc(steps=4),
            tmp_path,
            dataset=small_dataset,
            progress=False,
            resume=True,
        )


def test_checkpoint_folder_layout_and_metrics_log(tmp_path, small_dataset):
    train(CONFIG, _tc(steps=3), tmp_path, dataset=small_dataset, progress=False)
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "model" / "config.json").exists() and (ckpt / "model" / "model.safetensors").exists()
    assert (ckpt / "optimizer.safetensors").exists()
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval_loss" in rows[-1]


def test_schedule_warms_up_then_decays():
    tc = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, tc) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_bad_train_config_is_rejected():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)


def test_an_existing_run_is_not_overwritten_by_accident(tmp_path, small_dataset):
    train(CONFIG, _tc(steps=2), tmp_path, dataset=small_dataset, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="already holds a training run"):
        train(CONFIG, _tc(steps=2), tmp_path, dataset=small_dataset, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    train(CONFIG, _tc(steps=2), tmp_path, dataset=small_dataset, progress=False, overwrite=True)


def test_vocabulary_too_small_for_the_data_is_refused(small_dataset):
    with pytest.raises(ValueError, match="vocab_size"):
        train(CONFIG.replace(vocab_size=512), _tc(steps=1), dataset=small_dataset, progress=False)
