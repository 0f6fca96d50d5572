"""Nothing is lost: each way a run or an export could delete or overwrite what it did not write, refused.

Every case compares the file trees (names and hashes) before and after: a refusal changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from workbench import Model, ModelConfig, load_hf, save_hf
from workbench.cli import main as _main
from workbench.io.files import CheckpointError
from workbench.train import TrainConfig, train
from workbench.train.run import RunFolder, read_metrics


def main(argv: list[str]) -> int:
    """The command's exit status, whether it returns it or argparse exits with it (a refused flag)."""
    try:
        return _main(argv)
    except SystemExit as e:
        return int(e.code or 0)


TINY = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)
QUICK = ["--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--n-docs", "200",
         "--no-progress", "--device", "cpu", "--eval-every", "2"]  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` (links as their target) with the SHA-256 of its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            out[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _user_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "results.csv").write_text("1,2,3\n")
    return folder


# ---- 1. exporting and saving a model never removes what it did not write ----------------------------
def test_export_into_a_folder_of_user_files_is_refused_before_training(tmp_path, capsys):
    user = _user_files(tmp_path / "mine")
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main(["train", *QUICK, "--out", str(tmp_path / "run"), "--export", str(user), *extra]) == 2
        assert "not a model folder" in capsys.readouterr().err
        assert tree(tmp_path) == before  # nothing trained, nothing written, nothing removed


@pytest.mark.parametrize("where", ["same", "parent"])
def test_export_onto_the_run_itself_is_refused(tmp_path, capsys, where):
    run = tmp_path / "runs" / "a"
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    before = tree(tmp_path)
    target = run if where == "same" else run.parent
    args = ["train", *QUICK, "--out", str(run), "--resume", "--export", str(target), "--steps", "6"]
    assert main(args) == 2
    assert "holds the run" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_save_hf_replaces_only_a_model_folder_and_only_when_asked(tmp_path):
    model = Model(TINY)
    save_hf(model, tmp_path / "m")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, tmp_path / "m")
    assert tree(tmp_path) == before
    save_hf(model, tmp_path / "m", overwrite=True)  # a model folder, replaced on request
    user = _user_files(tmp_path / "u")
    (user / "config.json").write_text("{}")
    snapshot = tree(user)
    with pytest.raises(CheckpointError, match="not a model folder"):
        save_hf(model, user, overwrite=True)
    assert tree(user) == snapshot


# ---- 2. a diverged run keeps its last good checkpoint and exits non-zero ----------------------------
def test_a_diverging_command_exits_non_zero_and_keeps_the_finite_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(run), "--checkpoint-every", "1"]) == 0
    good = tree(run / "checkpoint" / "model")
    args = ["train", *QUICK, "--out", str(run), "--resume", "--steps", "200", "--lr", "1e4", "--grad-clip", "0"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume" in err  # other settings cannot resume this run: refused before anything
    assert main(["train", *QUICK, "--out", str(tmp_path / "r2"), "--steps", "200", "--lr", "1e4", "--grad-clip",
                 "0", "--warmup-steps", "0", "--checkpoint-every", "1"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "became" in err and "last good checkpoint" in err
    kept = load_hf(tmp_path / "r2" / "checkpoint" / "model")
    assert all(torch.isfinite(p).all() for p in kept.parameters())
    assert tree(run / "checkpoint" / "model") == good


@pytest.mark.parametrize(
    "flags",
    [["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "nan"], ["--grad-clip", "inf"],
     ["--set", "rope_theta=1e999"], ["--set", "routed_scaling_factor=nan"]],
)  # fmt: skip
def test_non_finite_hyper_parameters_are_refused_before_anything_runs(tmp_path, capsys, flags):
    assert main(["train", *QUICK, "--out", str(tmp_path / "run"), *flags]) == 2
    assert "finite" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- 3. --overwrite replaces the old run only once the new one has started ---------------------------
def test_overwrite_with_a_bad_argument_keeps_the_old_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    before = tree(run)
    for bad in (["--batch-size", "0"], ["--set", "n_group=3"], ["--seq-len", "100000"]):
        assert main(["train", *QUICK, "--out", str(run), "--overwrite", *bad]) == 2, bad
        capsys.readouterr()
        assert tree(run) == before, bad
    assert main(["train", *QUICK, "--out", str(run), "--resume", "--steps", "6"]) == 0  # and it still resumes
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))
    assert main(["train", *QUICK, "--out", str(run), "--overwrite", "--steps", "2"]) == 0  # a real restart
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


# ---- 4. a kill at any moment of a checkpoint write loses nothing ------------------------------------
@pytest.mark.parametrize("fail_at", range(6))
def test_a_kill_during_the_checkpoint_write_resumes_from_the_previous_one(
    tmp_path, small_dataset, fail_at, monkeypatch
):
    """Each filesystem step of writing checkpoint 4 (the rename of the finished folder, the new link, the
    swap of the link, the removal of the old checkpoint) is interrupted in turn, as a kill would."""
    tc = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=3, device="cpu",
                     checkpoint_every=2)  # fmt: skip
    straight = train(TINY, tc, tmp_path / "a", dataset=small_dataset, progress=False)

    import workbench.io.files as files
    import workbench.train.run as run_module

    calls = {"n": 0, "armed": False}
    real = {"replace": os.replace, "symlink": os.symlink, "rmtree": run_module.shutil.rmtree}

    def maybe_die(name):
        def op(*args, **kwargs):
            if calls["armed"]:
                if calls["n"] == fail_at:
                    calls["armed"] = False
                    raise KeyboardInterrupt("killed")
                calls["n"] += 1
            return real[name](*args, **kwargs)

        return op

    original_save = RunFolder.save_checkpoint

    def save(self, step, fill, keep=1):
        calls["armed"] = step == 4
        try:
            return original_save(self, step, fill, keep)
        finally:
            calls["armed"] = False

    monkeypatch.setattr(RunFolder, "save_checkpoint", save)
    monkeypatch.setattr(files.os, "replace", maybe_die("replace"))
    monkeypatch.setattr(run_module.os, "replace", maybe_die("replace"))
    monkeypatch.setattr(run_module.os, "symlink", maybe_die("symlink"))
    monkeypatch.setattr(run_module.shutil, "rmtree", maybe_die("rmtree"))
    with contextlib.suppress(KeyboardInterrupt):
        train(TINY, tc, tmp_path / "b", dataset=small_dataset, progress=False)
    monkeypatch.undo()
    latest = RunFolder(tmp_path / "b").latest()
    assert latest is not None  # never a moment without a complete checkpoint
    resumed = train(TINY, tc, tmp_path / "b", dataset=small_dataset, progress=False, resume=True)
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in straight.metrics]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not [p for p in (tmp_path / "b").rglob(".*tmp*")]  # temporary folders cleaned up


def test_the_earlier_layouts_kill_window_is_recovered(tmp_path, small_dataset):
    """The earlier layout renamed checkpoint/ away before putting the new one in place; a kill there left
    only .checkpoint.old-<pid>. Resume finds it."""
    tc = TrainConfig(steps=4, batch_size=4, seq_len=32, device="cpu", eval_every=0)
    train(TINY, tc, tmp_path, dataset=small_dataset, progress=False, stop_at=2)
    target = (tmp_path / "checkpoint").resolve()
    (tmp_path / "checkpoint").unlink()
    target.rename(tmp_path / ".checkpoint.old-1234")
    (tmp_path / "checkpoints").rmdir()
    done = train(TINY, tc, tmp_path, dataset=small_dataset, progress=False, resume=True)
    assert [r["step"] for r in done.metrics] == [1, 2, 3, 4]


def test_resume_without_a_run_is_an_error_and_a_log_without_checkpoint_is_kept(tmp_path, capsys):
    assert main(["train", *QUICK, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    before = tree(orphan)
    assert main(["train", *QUICK, "--out", str(orphan)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["train", *QUICK, "--out", str(orphan), "--resume"]) == 2
    assert "metrics log but no checkpoint" in capsys.readouterr().err
    assert tree(orphan) == before


def test_a_folder_of_user_files_is_never_a_run_folder(tmp_path, capsys):
    user = _user_files(tmp_path / "mine")
    before = tree(user)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["train", *QUICK, "--out", str(user), *extra]) == 2
        capsys.readouterr()
        assert tree(user) == before


# ---- 5. every command with --out follows the same rule -------------------------------------------------
_RL = ["--set", "hidden_size=32", "--set", "num_hidden_layers=1", "--set", "first_k_dense_replace=1",
       "--set", "intermediate_size=64", "--base-steps", "3", "--eval-problems", "4", "--eval-samples", "2",
       "--max-new-tokens", "8", "--no-progress", "--device", "cpu"]  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [["sft", "--steps", "2", "--batch-size", "4", "--n-examples", "8"],
     ["grpo", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2"]],
)  # fmt: skip
def test_rl_commands_refuse_an_earlier_run_unless_told(tmp_path, capsys, command):
    out = tmp_path / "run"
    assert main([*command, "--out", str(out), *_RL]) == 0
    capsys.readouterr()
    before = tree(out)
    assert main([*command, "--out", str(out), *_RL]) == 2
    assert "already holds" in capsys.readouterr().err
    assert tree(out) == before
    assert main([*command, "--out", str(out), *_RL, "--resume", "--steps", "3"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert main([*command, "--out", str(out), *_RL, "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
