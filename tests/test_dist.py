"""Data parallel on gloo: DDP and FSDP2 take the same steps as one process on the same global batch, keep
the balancing biases identical on every rank, write the run folder once, and resume on another count.

Every distributed run here forks CPU processes joined by gloo (``workbench.dist.process.launch``); the
model is the tiny preset and runs are a few steps, so the default set takes well under a minute on two
cores. Results agree with one process to float tolerance (sums run in another order), and exactly where
they are integers (the expert loads, hence the biases).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from workbench import Model, ModelConfig
from workbench.dist.process import launch
from workbench.rl.sft import PairSampler, SFTConfig, cold_start_pairs, sft_batch, sft_train
from workbench.tasks import get_task
from workbench.train import TrainConfig, train
from workbench.train.run import read_metrics

TINY = ModelConfig.from_preset("tiny")
ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-5  # float32, a few AdamW steps: summation order only


def _tc(**kw) -> TrainConfig:
    base = dict(steps=3, batch_size=4, seq_len=32, warmup_steps=1, eval_every=0, eval_batches=1, device="cpu",
                bias_update_speed=0.01)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _pretrain(dataset, parallel: str, out=None, **kw):
    """One run (in whichever process calls it): its losses, weights and biases."""
    torch.manual_seed(0)
    tc = _tc(parallel=parallel, **{k: v for k, v in kw.items() if k not in ("stop_at", "resume")})
    res = train(TINY, tc, out, dataset=dataset, progress=False, stop_at=kw.get("stop_at"),
                resume=kw.get("resume", False))  # fmt: skip
    return {
        "losses": [r["loss"] for r in res.metrics],
        "rows": res.metrics,
        "state": {k: v.detach().clone() for k, v in res.model.state_dict().items()},
        "rank": dist.get_rank() if dist.is_initialized() else 0,
    }


def _assert_same_run(a: dict, b: dict) -> None:
    assert len(a["losses"]) == len(b["losses"])
    for x, y in zip(a["losses"], b["losses"]):
        assert abs(x - y) <= LOSS_RTOL * abs(y), (a["losses"], b["losses"])
    for name, ref in b["state"].items():
        got = a["state"][name]
        if name.endswith("e_score_correction_bias"):  # moved by sign steps of integer loads: exact
            assert torch.equal(got, ref), name
        else:
            assert torch.allclose(got, ref, rtol=0, atol=PARAM_ATOL), (name, float((got - ref).abs().max()))


def _biases(state: dict) -> list[torch.Tensor]:
    return [v for k, v in state.items() if k.endswith("e_score_correction_bias")]


@pytest.fixture(scope="module")
def one_process(small_dataset):
    return _pretrain(small_dataset, "none")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_take_the_steps_of_one(mode, small_dataset, one_process):
    ranks = launch(_pretrain, 2, small_dataset, mode)
    for r in ranks:
        _assert_same_run(r, one_process)
    for a, b in zip(_biases(ranks[0]["state"]), _biases(ranks[1]["state"])):
        assert torch.equal(a, b)  # every rank balanced on the same global loads
    assert any(b.abs().sum() > 0 for b in _biases(ranks[0]["state"]))  # and balancing did move them
    assert ranks[0]["rows"] == ranks[1]["rows"] or all(  # every rank logs the same global row
        {k: v for k, v in x.items() if k != "elapsed_s"} == {k: v for k, v in y.items() if k != "elapsed_s"}
        for x, y in zip(ranks[0]["rows"], ranks[1]["rows"])
    )


def _sft(pairs, parallel: str):
    torch.manual_seed(0)
    model = Model(TINY)
    cfg = SFTConfig(steps=3, batch_size=8, warmup_steps=1, device="cpu", parallel=parallel, bias_update_speed=0.01)
    res = sft_train(model, pairs, cfg, progress=False)
    return {"losses": [r["loss"] for r in res.metrics], "state": {k: v.clone() for k, v in model.state_dict().items()}}


def test_sft_shards_count_by_their_labelled_tokens():
    """SFT's shards hold different numbers of completion tokens: each is weighted by its share."""
    pairs = cold_start_pairs(get_task("add"), 32)
    from workbench.io.tokenizer import load_tokenizer

    _, labels = sft_batch(load_tokenizer(), [pairs[i] for i in PairSampler(len(pairs), 8, 0).next()])
    halves = [int((h != -100).sum()) for h in labels.chunk(2)]
    assert halves[0] != halves[1], "the test needs shards with different token counts"
    single = _sft(pairs, "none")
    for r in launch(_sft, 2, pairs, "ddp"):
        _assert_same_run(r, single)


def test_a_run_saved_on_two_processes_resumes_on_one_and_back(tmp_path, small_dataset):
    straight = _pretrain(small_dataset, "none", steps=4)
    launch(_pretrain, 2, small_dataset, "fsdp", tmp_path / "a", steps=4, stop_at=2)
    checkpoints = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"]  # written once, by rank 0, in the single-process layout
    resumed = _pretrain(small_dataset, "none", tmp_path / "a", steps=4, resume=True)
    _assert_same_run(resumed, straight)
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [1, 2, 3, 4]

    _pretrain(small_dataset, "none", tmp_path / "b", steps=4, stop_at=2)  # and one process -> two (DDP)
    ranks = launch(_pretrain, 2, small_dataset, "ddp", tmp_path / "b", steps=4, resume=True)
    _assert_same_run(ranks[0], straight)
    assert len(read_metrics(tmp_path / "b")) == 4


def test_a_refusal_on_rank_0_stops_every_rank(tmp_path, small_dataset):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(Exception, match="not empty and holds no training run"):
        launch(_pretrain, 2, small_dataset, "ddp", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_parallel_none_is_refused_when_several_processes_were_launched(monkeypatch, small_dataset):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="parallel='none'"):
        _pretrain(small_dataset, "none")


def test_an_uneven_batch_is_refused_with_the_fix(small_dataset):
    with pytest.raises(Exception, match="batch_size divisible by 2"):
        launch(_pretrain, 2, small_dataset, "ddp", batch_size=3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_four_processes_take_the_steps_of_one(mode, small_dataset, one_process, tmp_path):
    ranks = launch(_pretrain, 4, small_dataset, mode, tmp_path / "run", steps=3, stop_at=2)
    resumed = launch(_pretrain, 2, small_dataset, "fsdp" if mode == "ddp" else "ddp", tmp_path / "run", resume=True)
    _assert_same_run(resumed[0], one_process)  # saved on 4, resumed on 2 with the other wrapper
    for r in ranks[1:]:
        for a, b in zip(_biases(r["state"]), _biases(ranks[0]["state"])):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_torchrun_trains_data_parallel_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--n-docs", "200", "--eval-every", "0",
              "--eval-batches", "1", "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "workbench", "train", "--steps", "3", "--stop-at", "2", "--parallel", "fsdp", *common]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"step": 2') == 1  # the summary is printed once, by rank 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["parallel"] == "fsdp"
    again = subprocess.run([sys.executable, "-m", "workbench", "train", "--steps", "3", "--resume", *common],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


@pytest.mark.gpu
def test_nccl_group_of_one_trains_on_cuda(small_dataset):
    """The NCCL path: a group of one CUDA process through DDP (skipped without CUDA)."""
    result = _pretrain(small_dataset, "ddp", device="cuda")
    assert all(torch.isfinite(torch.tensor(result["losses"])))


def _grpo(parallel: str):
    from workbench.rl.grpo import GRPOConfig, grpo_train

    torch.manual_seed(0)
    model = Model(TINY)
    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=2, inner_steps=2, eval_problems=4, eval_samples=1,
                     max_new_tokens=8, eval_every=2, device="cpu", parallel=parallel)  # fmt: skip
    result = grpo_train(model, get_task("add"), cfg, progress=False)
    return {
        "losses": [r["loss"] for r in result.metrics],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _distill(parallel: str):
    from workbench.rl.distill import DistillConfig, logit_distill

    torch.manual_seed(1)
    teacher = Model(TINY)
    torch.manual_seed(0)
    model = Model(TINY)
    cfg = DistillConfig(steps=2, batch_size=4, device="cpu", parallel=parallel)
    rows = logit_distill(model, teacher, cold_start_pairs(get_task("add"), 16), cfg, progress=False)
    return {"losses": [r["loss"] for r in rows], "state": {k: v.clone() for k, v in model.state_dict().items()}}


def test_grpo_under_fsdp_takes_the_steps_of_one_process():
    """A trainer that does not shard (every rank samples and scores the whole batch) stays exact."""
    _assert_same_run(launch(_grpo, 2, "fsdp")[0], _grpo("none"))


@pytest.mark.slow
def test_logit_distillation_under_ddp_takes_the_steps_of_one_process():
    _assert_same_run(launch(_distill, 2, "ddp")[0], _distill("none"))
