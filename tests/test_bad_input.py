"""Every bad input answered: about two hundred hostile inputs, by class, through the API and the command line.

Each case does one bad thing in a fresh folder and must be answered *clearly*: refused with a message that
names the problem (a command exits non-zero with ``error: ...``, never a traceback), or, where a warning
is the right answer, warned by name; and every file that was there before is still there, unchanged
(``bad_input_sweep.tree`` compares names and hashes). ``bad_input_sweep`` judges the other outcomes
(vague, traceback, accepted, changed, hang, allocates) and ``scripts/count_bad_input.py`` counts them by
class on any version of the package, which is how the counts before and after a change are made.

Cases whose fix belongs to another area (checkpoint contents and model sizes: ``io.hf`` and
``model.accounting``; sampling values: ``model.generate``; prompt files: ``serve``) are marked xfail with
the owner, so that they turn green when that work lands. A case that would hang or allocate on a version
without the fix is stopped by a timer or by a guard on ``Model()`` (it never allocates).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import pytest
import torch
from bad_input_sweep import Case, cli, run_case, wb

# ---- helpers (looked up at call time, so the sweep also runs on the earlier layout) -------------------
QUICK = ("--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--n-docs", "60",
         "--no-progress", "--device", "cpu", "--eval-every", "0")  # fmt: skip
RUN = ("--out", "{tmp}/run")
RL = ("--checkpoint", "{model}", "--steps", "1", "--eval-problems", "2", "--eval-samples", "1",
      "--max-new-tokens", "4", "--no-progress", "--device", "cpu", "--out", "{tmp}/rl")  # fmt: skip
GRPO = ("grpo", *RL, "--prompts-per-step", "2", "--group-size", "2")
SFT = ("sft", *RL, "--n-examples", "4", "--batch-size", "2")
VERTICAL = ("vertical", "--base", "{model}", "--steps", "2", "--grpo-steps", "0", "--eval-problems", "2",
            "--old-eval-problems", "2", "--no-progress", "--device", "cpu", "--out", "{tmp}/v")  # fmt: skip


def config(**overrides):
    return wb("workbench.config").ModelConfig.from_preset("tiny", **overrides)


@functools.cache
def tiny_model():
    torch.manual_seed(0)
    return wb("workbench.model").Model(config(num_nextn_predict_layers=0)).eval()


def forward(*args, **kwargs):
    with torch.no_grad():
        return tiny_model()(*args, **kwargs)


def save_model(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    model = wb("workbench.model").Model(config(num_nextn_predict_layers=0, **overrides))
    wb("workbench.io.hf", "workbench.hf").save_hf(model, folder)
    return folder


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def config_json(folder: Path, value) -> None:
    """A folder holding a model's config.json replaced by ``value`` (a dict changed in place, or anything)."""
    save_model(folder)
    path = folder / "config.json"
    if callable(value):
        data = json.loads(path.read_text())
        value(data)
        value = data
    path.write_text(json.dumps(value))


def edit_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    save_model(folder)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def user_files(folder: Path) -> Path:
    write(folder / "thesis.tex", "years of work")
    write(folder / "data" / "results.csv", "1,2,3\n")
    return folder


def prompt_set(folder: Path, template: str, inputs: str = "[{a: 1}]") -> None:
    text = f"name: s\nprompts:\n  - name: greet\n    template: '{template}'\n    inputs: {inputs}\n"
    write(folder / "set.yaml", text)


def trained_run(folder: Path, *extra: str) -> None:
    from bad_input_sweep import _run_command

    code, err = _run_command(["train", *QUICK, "--out", str(folder / "run"), *extra])
    assert code == 0, err


def api(fn):
    """An API case: ``fn()`` is the bad call (it does not need the case's folder)."""
    return lambda tmp: fn()


IO_HF, ACCOUNTING = "io.hf (checkpoint refusals)", "model.accounting / io.hf (model-size checks)"
GENERATE, SERVE = "model.generate (sampling values)", "serve (prompt-file bounds)"


# ---- the cases ---------------------------------------------------------------------------------------
def _config_type_cases() -> list[Case]:
    k = "config: wrong type"
    bad = [("hidden_size", 96.0), ("hidden_size", "96"), ("hidden_size", True), ("num_hidden_layers", True),
           ("intermediate_size", 256.5), ("intermediate_size", "x"), ("moe_intermediate_size", "x"),
           ("n_routed_experts", 8.0), ("n_shared_experts", 1.5), ("n_shared_experts", "1"),
           ("num_experts_per_tok", True), ("n_group", 2.0), ("num_nextn_predict_layers", 1.0),
           ("num_nextn_predict_layers", "1"), ("first_k_dense_replace", "1"), ("rms_norm_eps", "1e-6"),
           ("mtp_loss_weight", "0.3"), ("initializer_range", "x"), ("tie_word_embeddings", "false"),
           ("norm_topk_prob", "no"), ("use_grouped_mm", "no"), ("fp8", "yes"), ("scoring_func", 1),
           ("attn_mode", ["naive"]), ("rope_scaling", [1]), ("q_lora_rank", 48.0), ("inactive_experts", "x"),
           ("vocab_size", None), ("max_position_embeddings", 512.0)]  # fmt: skip
    cases = [Case(k, f"ModelConfig({f}={v!r})", api(lambda f=f, v=v: config(**{f: v})), f) for f, v in bad]
    cases += [
        Case(k, "rope_scaling factor 'x'",
             api(lambda: config(rope_scaling={"type": "yarn", "factor": "x", "original_max_position_embeddings": 4})),
             "factor"),
        Case(k, "config.json hidden_size '96' (load_hf)",
             lambda tmp: wb("workbench.io.hf", "workbench.hf").load_hf(tmp / "m"), "hidden_size",
             prepare=lambda tmp: config_json(tmp / "m", lambda d: d.update(hidden_size="96"))),
        Case(k, "info --checkpoint with intermediate_size 256.5", cli("info", "--checkpoint", "{tmp}/m"),
             "intermediate_size",
             prepare=lambda tmp: config_json(tmp / "m", lambda d: d.update(intermediate_size=256.5))),
        Case(k, "train --set hidden_size=abc", cli("train", *QUICK, *RUN, "--set", "hidden_size=abc"), "hidden_size"),
        Case(k, "train --set hidden_size=1.5", cli("train", *QUICK, *RUN, "--set", "hidden_size=1.5"), "hidden_size"),
        Case(k, "train --set fp8=maybe", cli("train", *QUICK, *RUN, "--set", "fp8=maybe"), "fp8"),
        Case(k, "train --set rope_scaling=[1]", cli("train", *QUICK, *RUN, "--set", "rope_scaling=[1]"),
             "rope_scaling"),
        Case(k, "train --set rope_scaling with factor 'x'",
             cli("train", *QUICK, *RUN, "--set",
                 'rope_scaling={"type": "yarn", "factor": "x", "original_max_position_embeddings": 64}'), "factor"),
    ]  # fmt: skip
    return cases


def _config_range_cases() -> list[Case]:
    k = "config: out of range"
    inf, nan = float("inf"), float("nan")
    bad = [("vocab_size", -1), ("hidden_size", 0), ("rms_norm_eps", nan), ("rms_norm_eps", 0.0), ("rope_theta", inf),
           ("routed_scaling_factor", nan), ("routed_scaling_factor", inf), ("routed_scaling_factor", 0.0),
           ("bias_update_speed", nan), ("bias_update_speed", inf), ("bias_update_speed", -1.0),
           ("seq_aux_loss_alpha", nan), ("mtp_loss_weight", nan), ("mtp_loss_weight", -0.5),
           ("initializer_range", nan), ("initializer_range", -1.0), ("n_shared_experts", -1),
           ("num_nextn_predict_layers", -1), ("first_k_dense_replace", 9), ("qk_rope_head_dim", 7)]  # fmt: skip
    cases = [Case(k, f"ModelConfig({f}={v!r})", api(lambda f=f, v=v: config(**{f: v})), f) for f, v in bad]
    for rs, field in [({"type": "yarn", "factor": nan, "original_max_position_embeddings": 64}, "factor"),
                      ({"type": "yarn", "factor": inf, "original_max_position_embeddings": 64}, "factor"),
                      ({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}, "factor"),
                      ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, "original_max"),
                      ({"type": "yarn", "factor": 4.0}, "original_max")]:  # fmt: skip
        cases.append(Case(k, f"rope_scaling={rs}", api(lambda rs=rs: config(rope_scaling=rs)), field))
    cases += [
        Case(k, "train --set rope_theta=1e999", cli("train", *QUICK, *RUN, "--set", "rope_theta=1e999"), "finite"),
        Case(k, "train --set routed_scaling_factor=nan",
             cli("train", *QUICK, *RUN, "--set", "routed_scaling_factor=nan"), "finite"),
        Case(k, "train --set n_group=3", cli("train", *QUICK, *RUN, "--set", "n_group=3"), "n_group"),
        Case(k, "train --set initializer_range=-1",
             cli("train", *QUICK, *RUN, "--set", "initializer_range=-1"), "initializer_range"),
    ]  # fmt: skip
    return cases


def _config_file_cases() -> list[Case]:
    k = "config file"
    MC = lambda: wb("workbench.config").ModelConfig  # noqa: E731
    load = lambda tmp: wb("workbench.io.hf", "workbench.hf").load_hf(tmp / "m")  # noqa: E731

    def knob_typo(d):
        d.setdefault("workbench", {})["bias_update_sped"] = 0.1

    cases = [
        Case(k, "from_hf of a list", api(lambda: MC().from_hf([1, 2])), "dict|config"),
        Case(k, "config.json holding a list", lambda tmp: MC().from_hf(tmp / "m"), "JSON object",
             prepare=lambda tmp: config_json(tmp / "m", [1, 2])),
        Case(k, "config.json holding a number", lambda tmp: MC().from_hf(tmp / "m"), "JSON object",
             prepare=lambda tmp: config_json(tmp / "m", 3)),
        Case(k, "config.json holding null (load_hf)", load, "JSON object",
             prepare=lambda tmp: config_json(tmp / "m", None)),
        Case(k, "info --checkpoint on a config.json holding a list", cli("info", "--checkpoint", "{tmp}/m"),
             "JSON object", prepare=lambda tmp: config_json(tmp / "m", [1])),
        Case(k, "config.json is a directory", lambda tmp: MC().from_hf(tmp / "c" / "config.json"),
             "config.json", prepare=lambda tmp: (tmp / "c" / "config.json").mkdir(parents=True)),
        Case(k, "config.json is not JSON", lambda tmp: MC().from_hf(tmp / "m"), "not valid JSON",
             prepare=lambda tmp: (save_model(tmp / "m"), write(tmp / "m" / "config.json", "{oops"))),
        Case(k, "config.json 'workbench' is a list", lambda tmp: MC().from_hf(tmp / "m"), "workbench",
             prepare=lambda tmp: config_json(tmp / "m", lambda d: d.update(workbench=[1]))),
        Case(k, "config.json misspells num_hidden_layers", lambda tmp: MC().from_hf(tmp / "m"),
             ("num_hidden_layer'", "did you mean 'num_hidden_layers'"), warn=True,
             prepare=lambda tmp: config_json(tmp / "m", lambda d: d.update(num_hidden_layer=2))),
        Case(k, "config.json misspells a training knob", lambda tmp: MC().from_hf(tmp / "m"),
             ("bias_update_sped", "did you mean 'bias_update_speed'"), warn=True,
             prepare=lambda tmp: config_json(tmp / "m", knob_typo)),
        Case(k, "info --checkpoint with a misspelled field (a warning)", cli("info", "--checkpoint", "{tmp}/m"),
             "did you mean 'kv_lora_rank'", warn=True,
             prepare=lambda tmp: config_json(tmp / "m", lambda d: d.update(kv_lora_rnak=8))),
        Case(k, "from_preset with a misspelled field", api(lambda: MC().from_preset("tiny", hiden_size=8)),
             "did you mean 'hidden_size'"),
        Case(k, "config.replace with a misspelled field", api(lambda: config().replace(n_groups=2)),
             "did you mean 'n_group'"),
        Case(k, "train --set hiden_size=8", cli("train", *QUICK, *RUN, "--set", "hiden_size=8"),
             "did you mean 'hidden_size'"),
        Case(k, "from_preset of a list", api(lambda: MC().from_preset(["tiny"])), "preset"),
        Case(k, "train --preset nope", cli("train", *QUICK, *RUN, "--preset", "nope"), "unknown preset"),
    ]  # fmt: skip
    return cases


def _model_input_cases() -> list[Case]:
    k = "model input"
    t = torch.tensor

    def bigger_vocab(tmp):
        save_model(tmp / "m", vocab_size=300)

    return [
        Case(k, "token id beyond the vocabulary", api(lambda: forward(t([[1, 5000]]))), "vocabulary"),
        Case(k, "negative token id", api(lambda: forward(t([[1, -1]]))), "vocabulary"),
        Case(k, "float ids", api(lambda: forward(t([[1.0, 2.0]]))), "integer"),
        Case(k, "bool ids", api(lambda: forward(t([[True, False]]))), "integer"),
        Case(k, "1-D ids", api(lambda: forward(t([1, 2]))), r"\(batch, seq_len\)"),
        Case(k, "a list, not a tensor", api(lambda: forward([[1, 2]])), "tensor"),
        Case(k, "no tokens", api(lambda: forward(torch.zeros(1, 0, dtype=torch.long))), "at least one token"),
        Case(k, "an empty batch", api(lambda: forward(torch.zeros(0, 3, dtype=torch.long))), "at least one token"),
        Case(k, "labels beyond the vocabulary", api(lambda: forward(t([[1, 2]]), labels=t([[1, 5000]]))), "vocabulary"),
        Case(k, "float labels", api(lambda: forward(t([[1, 2]]), labels=t([[1.0, 2.0]]))), "integer"),
        Case(k, "labels of another shape", api(lambda: forward(t([[1, 2]]), labels=t([[1, 2, 3]]))), "shape"),
        Case(k, "labels -100 (no loss) are fine", api(lambda: forward(t([[1, 2]]), labels=t([[-100, 2]]))), None),
        Case(k, "attention mode 'fast'", api(lambda: forward(t([[1, 2]]), attn_mode="fast")), "naive.*absorb"),
        Case(k, "positions past max_position_embeddings", api(lambda: forward(torch.ones(1, 300, dtype=torch.long))),
             "max_position_embeddings"),
        Case(k, "generate with a tokenizer larger than the model's vocabulary",
             cli("generate", "--checkpoint", "{tmp}/m", "--tokenizer", "{model}/tokenizer.json", "--prompt",
                 "Add 4821 and 379.", "--device", "cpu", "--max-new-tokens", "2"), "vocabulary", prepare=bigger_vocab),
    ]  # fmt: skip


def _file_cases() -> list[Case]:
    k = "files in place of files"
    text = lambda *paths: cli("train", *QUICK, *RUN, "--text-files", *paths)  # noqa: E731
    load_m = lambda tmp: wb("workbench.io.hf", "workbench.hf").load_hf(tmp / "m")  # noqa: E731

    @contextlib.contextmanager
    def one_mebibyte():
        module = wb("workbench.data.text_files")
        real = module.MAX_TEXT_BYTES
        module.MAX_TEXT_BYTES = 1 << 20
        try:
            yield
        finally:
            module.MAX_TEXT_BYTES = real

    def big(tmp):
        with open(tmp / "big.txt", "wb") as f:
            f.truncate(2 << 20)

    return [
        Case(k, "a FIFO as --text-files", text("{tmp}/pipe.txt"), "regular file", limit=10,
             prepare=lambda tmp: fifo(tmp / "pipe.txt")),
        Case(k, "a folder with no .txt", text("{tmp}/d"), r"no text|no \.txt", prepare=lambda tmp: (tmp / "d").mkdir()),
        Case(k, "a missing text file", text("{tmp}/nope.txt"), "no such file"),
        Case(k, "an empty text file", text("{tmp}/e.txt"), "no text", prepare=lambda tmp: write(tmp / "e.txt", "")),
        Case(k, "a binary text file", text("{tmp}/b.txt"), "UTF-8",
             prepare=lambda tmp: write(tmp / "b.txt", bytes(range(256)))),
        Case(k, "a text file larger than the limit", text("{tmp}/big.txt"), "max_bytes", prepare=big,
             context=one_mebibyte),
        Case(k, "load_text_files of a FIFO", lambda tmp: wb("workbench.data").load_text_files(tmp / "p.txt"),
             "regular file", limit=10, prepare=lambda tmp: fifo(tmp / "p.txt")),
        Case(k, "--out is a file", cli("train", *QUICK, "--out", "{tmp}/f"), "not a folder",
             prepare=lambda tmp: write(tmp / "f", "x")),
        Case(k, "--export is a file", cli("train", *QUICK, *RUN, "--export", "{tmp}/f"), "not a folder",
             prepare=lambda tmp: write(tmp / "f", "x")),
        Case(k, "generate --checkpoint is a file", cli("generate", "--checkpoint", "{tmp}/f", "--prompt", "x"),
             "not a model folder|is a file", prepare=lambda tmp: write(tmp / "f", "x")),
        Case(k, "generate --checkpoint is missing", cli("generate", "--checkpoint", "{tmp}/nope", "--prompt", "x"),
             "no model"),
        Case(k, "generate --tokenizer is missing",
             cli("generate", "--prompt", "x", "--tokenizer", "{tmp}/no.json", "--device", "cpu"), "tokenizer"),
        Case(k, "generate --tokenizer is not JSON",
             cli("generate", "--prompt", "x", "--tokenizer", "{tmp}/f", "--device", "cpu"), "tokenizer",
             prepare=lambda tmp: write(tmp / "f", "x")),
        Case(k, "load_hf of a folder without weights", load_m, "safetensors",
             prepare=lambda tmp: (save_model(tmp / "m"), (tmp / "m" / "model.safetensors").unlink())),
        Case(k, "load_hf of truncated weights", load_m, "truncated|corrupt|safetensors",
             prepare=lambda tmp: (save_model(tmp / "m"), os.truncate(tmp / "m" / "model.safetensors", 100))),
        Case(k, "ask --prompts is a folder", cli("ask", "--prompts", "{tmp}/d"), "directory|folder|file",
             prepare=lambda tmp: (tmp / "d").mkdir()),
        Case(k, "ask --prompts is missing", cli("ask", "--prompts", "{tmp}/no.yaml"), "no prompt set"),
        Case(k, "a FIFO as --prompts", cli("ask", "--prompts", "{tmp}/p.yaml", "--model", "{model}"),
             "regular file|FIFO", owner=SERVE, limit=5, prepare=lambda tmp: fifo(tmp / "p.yaml")),
    ]  # fmt: skip


def _device_cases() -> list[Case]:
    k = "device"
    util = lambda: wb("workbench.util", "workbench.train")  # noqa: E731
    return [
        Case(k, "train --device cuda:7", cli("train", *QUICK, *RUN, "--device", "cuda:7"), "cuda"),
        Case(k, "train --device tpu", cli("train", *QUICK, *RUN, "--device", "tpu"), "device 'tpu'"),
        Case(k, "train --device gpu", cli("train", *QUICK, *RUN, "--device", "gpu"), "device 'gpu'"),
        Case(k, "generate --device foo", cli("generate", "--prompt", "x", "--device", "foo"), "device 'foo'"),
        Case(k, "grpo --device foo", cli(*GRPO, "--device", "foo"), "device 'foo'"),
        Case(k, "vertical --device foo", cli(*VERTICAL, "--device", "foo"), "device 'foo'"),
        Case(k, "demo --device foo", cli("demo", "--steps", "2", "--out", "{tmp}/d", "--device", "foo"),
             "device 'foo'"),
        Case(k, "resolve_device('cuda:x')", api(lambda: util().resolve_device("cuda:x")), "cuda:x"),
        Case(k, "resolve_device(None)", api(lambda: util().resolve_device(None)), "device"),
    ]  # fmt: skip


def _run_setting_cases() -> list[Case]:
    k = "run settings"
    flags = [(("--lr", "nan"), "finite"), (("--lr", "inf"), "finite"), (("--lr", "-1"), "lr"), (("--lr", "0"), "lr"),
             (("--weight-decay", "nan"), "finite"), (("--weight-decay", "-1"), "weight_decay"),
             (("--grad-clip", "inf"), "finite"), (("--grad-clip", "-1"), "grad_clip"),
             (("--warmup-steps", "-1"), "warmup_steps"), (("--steps", "0"), "steps"), (("--steps", "-1"), "steps"),
             (("--batch-size", "0"), "batch_size"), (("--batch-size", "1.5"), "batch.size|integer"),
             (("--seq-len", "0"), "seq_len"), (("--seq-len", "100000"), "seq_len|max_position"),
             (("--n-docs", "0"), "n_docs"), (("--eval-every", "-1"), "eval_every"),
             (("--checkpoint-every", "-1"), "checkpoint_every"), (("--keep-checkpoints", "0"), "keep_checkpoints"),
             (("--min-lr-ratio", "2"), "min_lr_ratio"), (("--beta1", "1"), "beta1"), (("--beta2", "nan"), "finite"),
             (("--bias-update-speed", "-1"), "bias_update_speed"), (("--schedule", "linear"), "schedule"),
             (("--stop-at", "0"), "stop.at"), (("--seed", "1.5"), "seed|integer"),
             (("--attn-mode", "fast"), "attn.mode|invalid choice")]  # fmt: skip
    cases = [Case(k, f"train {' '.join(f)}", cli("train", *QUICK, *RUN, *f), rx) for f, rx in flags]
    grpo = [(("--group-size", "1"), "group_size"), (("--temperature", "0"), "temperature"),
            (("--beta", "nan"), "finite"), (("--beta", "-1"), "beta"), (("--clip-eps", "nan"), "finite"),
            (("--top-p", "0"), "top_p"), (("--loss-agg", "mean"), "loss_agg"),
            (("--prompts-per-step", "0"), "prompts_per_step"),
            (("--max-new-tokens", "0"), "max_new_tokens"), (("--eval-problems", "0"), "eval_problems"),
            (("--variant", "ppo"), "variant|invalid choice"), (("--task", "nope"), "task|invalid choice")]  # fmt: skip
    cases += [Case(k, f"grpo {' '.join(f)}", cli(*GRPO, *f), rx) for f, rx in grpo]
    cases += [
        Case(k, "sft --batch-size 0", cli(*SFT, "--batch-size", "0"), "batch_size"),
        Case(k, "demo --steps 0", cli("demo", "--steps", "0", "--out", "{tmp}/d", "--device", "cpu"), "steps"),
        Case(k, "demo --steps -1", cli("demo", "--steps", "-1", "--out", "{tmp}/d", "--device", "cpu"), "steps"),
        Case(k, "GRPOConfig(temperature=inf)",
             api(lambda: wb("workbench.rl.grpo").GRPOConfig(temperature=float("inf"))), "finite"),
        Case(k, "TrainConfig(steps=2.0)", api(lambda: wb("workbench.train").TrainConfig(steps=2.0)), "steps"),
        Case(k, "TrainConfig(lr='1e-3')", api(lambda: wb("workbench.train").TrainConfig(lr="1e-3")), "lr"),
    ]  # fmt: skip
    return cases


def _command_argument_cases() -> list[Case]:
    k = "command arguments"

    def earlier_vertical(tmp):
        save_model(tmp / "v" / "model")
        write(tmp / "v" / "report.json", "{}")

    cases = [
        Case(k, "sft --n-examples 0", cli(*SFT, "--n-examples", "0"), "n.examples"),
        Case(k, "sft --n-examples -1", cli(*SFT, "--n-examples", "-1"), "n.examples"),
        Case(k, "sft --samples-per-prompt 0", cli(*SFT, "--data", "rejection", "--samples-per-prompt", "0"),
             "samples.per.prompt"),
        Case(k, "sft --keep-per-prompt 0", cli(*SFT, "--data", "rejection", "--keep-per-prompt", "0"),
             "keep.per.prompt"),
        Case(k, "sft --data rejection without --checkpoint",
             cli("sft", "--data", "rejection", "--out", "{tmp}/rl", "--device", "cpu"), "checkpoint"),
        Case(k, "distill --n-prompts 0",
             cli("distill", "--teacher", "{model}", "--student", "{model}", "--mode", "sequence", "--n-prompts", "0",
                 "--steps", "1", "--out", "{tmp}/rl", "--device", "cpu", "--no-progress"), "n.prompts"),
        Case(k, "distill --teacher missing",
             cli("distill", "--teacher", "{tmp}/nope", "--out", "{tmp}/rl", "--device", "cpu"), "no model"),
        Case(k, "distill --mode compare --resume",
             cli("distill", "--teacher", "{model}", "--mode", "compare", "--resume", "--out", "{tmp}/rl",
                 "--device", "cpu"), "cannot be resumed"),
        Case(k, "grpo --checkpoint missing", cli(*GRPO, "--checkpoint", "{tmp}/nope"), "no model"),
        Case(k, "sft with a bad --set for its base", cli("sft", "--out", "{tmp}/rl", "--set", "n_group=3", "--device",
                                                          "cpu", "--no-progress"), "n_group"),
        Case(k, "distill --student missing",
             cli("distill", "--teacher", "{model}", "--student", "{tmp}/nope", "--mode", "sequence", "--out",
                 "{tmp}/rl", "--device", "cpu"), "no model"),
        Case(k, "vertical --new-experts -2", cli(*VERTICAL, "--method", "newexp", "--new-experts", "-2"),
             r"new.experts"),
        Case(k, "vertical --method nope", cli(*VERTICAL, "--method", "nope"), "method"),
        Case(k, "vertical --esft-p 0", cli(*VERTICAL, "--method", "esft_gate", "--esft-p", "0"), "esft_p|p "),
        Case(k, "vertical --esft-p 1.5", cli(*VERTICAL, "--method", "esft_gate", "--esft-p", "1.5"), "esft_p|p "),
        Case(k, "vertical --old-rate 2", cli(*VERTICAL, "--old-rate", "2"), "old_rate"),
        Case(k, "vertical --old-rate nan", cli(*VERTICAL, "--old-rate", "nan"), "finite"),
        Case(k, "vertical --replay 1.5", cli(*VERTICAL, "--replay", "1.5"), "replay"),
        Case(k, "vertical --replay nan", cli(*VERTICAL, "--replay", "nan"), "finite"),
        Case(k, "vertical --lr nan", cli(*VERTICAL, "--lr", "nan"), "finite"),
        Case(k, "vertical --lr -1", cli(*VERTICAL, "--lr", "-1"), "lr"),
        Case(k, "vertical --steps 0", cli(*VERTICAL, "--steps", "0"), "steps"),
        Case(k, "vertical --grpo-steps -1", cli(*VERTICAL, "--grpo-steps", "-1"), "grpo.steps"),
        Case(k, "vertical --task nope", cli(*VERTICAL, "--task", "nope"), "unknown task|task"),
        Case(k, "vertical --old-task nope", cli(*VERTICAL, "--old-task", "nope"), "unknown task|task"),
        Case(k, "vertical --base missing", cli(*VERTICAL, "--base", "{tmp}/nope"), "no checkpoint|no model"),
        Case(k, "generate --max-new-tokens -1", cli("generate", "--prompt", "x", "--max-new-tokens", "-1"),
             "max.new.tokens"),
        Case(k, "generate --max-new-tokens 0", cli("generate", "--prompt", "x", "--max-new-tokens", "0"),
             "max.new.tokens"),
        Case(k, "generate --temperature nan", cli("generate", "--prompt", "x", "--temperature", "nan"),
             "temperature.*finite"),
        Case(k, "generate --temperature -1", cli("generate", "--prompt", "x", "--temperature", "-1", "--device", "cpu"),
             "temperature"),
        Case(k, "generate --top-p 0", cli("generate", "--prompt", "x", "--temperature", "1", "--top-p", "0",
                                          "--device", "cpu"), "top_p"),
        Case(k, "generate --top-p nan", cli("generate", "--prompt", "x", "--top-p", "nan"), "top.p.*finite"),
        Case(k, "generate --prompt beyond max_position_embeddings",
             cli("generate", "--prompt", "x " * 400, "--device", "cpu", "--max-new-tokens", "2"), "max_position"),
        Case(k, "info --context -1", cli("info", "--context", "-1"), "context"),
        Case(k, "info --context 0", cli("info", "--preset", "tiny", "--context", "0"), "context"),
        Case(k, "info --preset nope", cli("info", "--preset", "nope"), "unknown preset"),
        Case(k, "ask --name unknown", cli("ask", "--prompts", "{tmp}/set.yaml", "--model", "{model}", "--name", "zz",
                                          "--device", "cpu"), "no prompt named",
             prepare=lambda tmp: prompt_set(tmp, "What is {a}?")),
        Case(k, "ask --set without =", cli("ask", "--prompts", "{tmp}/set.yaml", "--model", "{model}", "--set", "a",
                                           "--device", "cpu"), "FIELD=VALUE",
             prepare=lambda tmp: prompt_set(tmp, "What is {a}?")),
        Case(k, "ask without a model", cli("ask", "--prompts", "{tmp}/set.yaml"), "no model",
             prepare=lambda tmp: prompt_set(tmp, "What is {a}?")),
        Case(k, "ask --max-new-tokens 0", cli("ask", "--prompts", "{tmp}/set.yaml", "--model", "{model}",
                                              "--max-new-tokens", "0"), "max.new.tokens",
             prepare=lambda tmp: prompt_set(tmp, "What is {a}?")),
        Case(k, "vertical --out holds someone's files", cli(*VERTICAL), "not empty.*nothing was written",
             prepare=lambda tmp: user_files(tmp / "v")),
        Case(k, "vertical --out is a file", cli(*VERTICAL), "not a folder", prepare=lambda tmp: write(tmp / "v", "x")),
        Case(k, "vertical --out holds an earlier vertical (no --overwrite)", cli(*VERTICAL), "overwrite|not empty",
             prepare=earlier_vertical),
        Case(k, "vertical --overwrite onto someone's files", cli(*VERTICAL, "--overwrite"),
             "not empty.*nothing was written", prepare=lambda tmp: user_files(tmp / "v")),
        Case(k, "demo --out holds someone's files", cli("demo", "--steps", "2", "--out", "{tmp}/d", "--device", "cpu",
                                                         "--no-progress"), "not empty|nothing there",
             prepare=lambda tmp: user_files(tmp / "d")),
    ]  # fmt: skip
    return cases


def _run_folder_cases() -> list[Case]:
    k = "run folder"

    def corrupt_metrics(tmp):
        trained_run(tmp)
        path = tmp / "run" / "metrics.jsonl"
        lines = path.read_text().splitlines()
        lines[1] = "{oops"
        path.write_text("\n".join(lines) + "\n")

    def corrupt_state(tmp):
        trained_run(tmp)
        state = (tmp / "run" / "checkpoint").resolve() / "state.json"
        state.write_text("[not json")

    return [
        Case(k, "--resume with a corrupt metrics line", cli("train", *QUICK, *RUN, "--resume", "--steps", "3"),
             ("metrics.jsonl", "line 2"), prepare=corrupt_metrics),
        Case(k, "--resume with a corrupt state.json", cli("train", *QUICK, *RUN, "--resume", "--steps", "3"),
             "state.json", prepare=corrupt_state),
        Case(k, "--resume where there is no run", cli("train", *QUICK, *RUN, "--resume"), "no checkpoint to resume"),
        Case(k, "train into someone's folder", cli("train", *QUICK, "--out", "{tmp}/mine"), "holds no training run",
             prepare=lambda tmp: user_files(tmp / "mine")),
        Case(k, "train --export into someone's folder", cli("train", *QUICK, *RUN, "--export", "{tmp}/mine"),
             "not a model folder", prepare=lambda tmp: user_files(tmp / "mine")),
        Case(k, "read_metrics of a folder as metrics.jsonl",
             lambda tmp: wb("workbench.train.run").read_metrics(tmp / "r"), "regular file",
             prepare=lambda tmp: (tmp / "r" / "metrics.jsonl").mkdir(parents=True)),
    ]  # fmt: skip


def _library_argument_cases() -> list[Case]:
    k = "library arguments"
    tasks = lambda: wb("workbench.tasks", "workbench.rl.tasks")  # noqa: E731
    aha = lambda: wb("workbench.rl.aha")  # noqa: E731
    text = lambda: wb("workbench.data")  # noqa: E731
    tok = lambda: wb("workbench.io.tokenizer", "workbench.tokenizer").load_tokenizer()  # noqa: E731
    add = lambda: tasks().get_task("add")  # noqa: E731

    def a_text_file(tmp):
        write(tmp / "a.txt", "hello world")

    return [
        Case(k, "Task.sample('3')", api(lambda: add().sample("3")), r"\bn\b"),
        Case(k, "Task.sample(2.5)", api(lambda: add().sample(2.5)), r"\bn\b"),
        Case(k, "Task.sample(-1)", api(lambda: add().sample(-1)), r"\bn\b"),
        Case(k, "Task.sample(10**7) of 8,100 problems", api(lambda: add().sample(10**7)), "at most|fewer", limit=20),
        Case(k, "get_task(None)", api(lambda: tasks().get_task(None)), "unknown task"),
        Case(k, "load_text_files(None)", api(lambda: text().load_text_files(None)), "paths"),
        Case(k, "load_text_files(3)", api(lambda: text().load_text_files(3)), "paths"),
        Case(k, "load_text_files(chunk_chars=2.5)", lambda tmp: text().load_text_files(tmp / "a.txt", chunk_chars=2.5),
             "chunk_chars", prepare=a_text_file),
        Case(k, "load_text_files(chunk_chars='5')", lambda tmp: text().load_text_files(tmp / "a.txt", chunk_chars="5"),
             "chunk_chars", prepare=a_text_file),
        Case(k, "load_text_files(domain=3)", lambda tmp: text().load_text_files(tmp / "a.txt", domain=3), "domain",
             prepare=a_text_file),
        Case(k, "aha patterns_in(None)", api(lambda: aha().patterns_in(None)), "string"),
        Case(k, "aha patterns_in(bytes)", api(lambda: aha().patterns_in(b"wait")), "string"),
        Case(k, "aha_search of one string", api(lambda: aha().aha_search("wait, wait")), "list"),
        Case(k, "aha_search([None])", api(lambda: aha().aha_search([None])), "string"),
        Case(k, "aha_search(max_examples=-1)", api(lambda: aha().aha_search(["wait"], max_examples=-1)),
             "max_examples"),
        Case(k, "steps_of(3)", api(lambda: aha().steps_of(3)), "string"),
        Case(k, "tokenizer.encode(None)", api(lambda: tok().encode(None)), "string"),
        Case(k, "tokenizer.decode('ab')", api(lambda: tok().decode("ab")), "token ids"),
        Case(k, "tokenizer.decode([1.5])", api(lambda: tok().decode([1.5])), "integer"),
        Case(k, "tokenizer.decode([99999])", api(lambda: tok().decode([99999])), "vocabulary"),
        Case(k, "update_expert_bias with counts of the wrong shape",
             api(lambda: tiny_model().update_expert_bias([torch.zeros(3)] * len(tiny_model().routers()))), "shape"),
        Case(k, "grow_experts(2, '1')",
             api(lambda: wb("workbench.model").Model(config()).grow_experts(2, "1")), "live_layers"),
        Case(k, "add_expert(n=-2)",
             api(lambda: wb("workbench.vertical", "workbench.extend").add_expert(tiny_model(), -2)), r"\bn\b"),
    ]  # fmt: skip


def _text_scan_cases() -> list[Case]:
    """Hostile strings: every scan must finish fast (the limits are generous; linear scans take milliseconds)."""
    k = "text scans"
    aha = lambda: wb("workbench.rl.aha")  # noqa: E731
    rewards = lambda: wb("workbench.tasks.rewards", "workbench.rl.rewards")  # noqa: E731
    tasks = lambda: wb("workbench.tasks", "workbench.rl.tasks")  # noqa: E731
    countdown = lambda: tasks().get_task("countdown")  # noqa: E731
    problem = lambda: countdown().sample(1)[0]  # noqa: E731
    n = 40_000
    aha_inputs = {"'1+1 =' and 40,000 spaces": "1+1 =" + " " * n + "x", "'1', 40,000 spaces, '='": "1" + " " * n + "=",
                  "'1+', 40,000 spaces": "1+" + " " * n + "x", "40,000 '(' then '= 1'": "(" * n + "= 1",
                  "20,000 '1 + '": "1 + " * (n // 2) + "= x", "40,000 '<answer>'": "<answer>" * n,
                  "'h' and 40,000 'm'": "h" + "m" * n, "20,000 '= 1 '": "= 1 " * (n // 2)}  # fmt: skip
    cases = [Case(k, f"aha on {name}", api(lambda s=s: aha().patterns_in(s, s)), None, limit=3)
             for name, s in aha_inputs.items()]  # fmt: skip
    big = 10**6
    cases += [
        Case(k, "format_reward on 50,000 '<think>'", api(lambda: rewards().format_reward("<think>" * 50_000)), None,
             limit=3),
        Case(k, "format_reward on a million spaces after the tags",
             api(lambda: rewards().format_reward("<think>a</think><answer>1</answer>" + " " * big + "x")), None,
             limit=3),
        Case(k, "extract_answer on 50,000 '<answer>'", api(lambda: rewards().extract_answer("<answer>" * 50_000)), None,
             limit=3),
        Case(k, "parse_int on a million spaces", api(lambda: tasks().parse_int(" " * big)), None, limit=3),
        Case(k, "parse_int on a million digits", api(lambda: tasks().parse_int("1" * big)), None, limit=3),
        Case(k, "parse_roman on a million 'M '", api(lambda: tasks().parse_roman("M " * big)), None, limit=3),
        Case(k, "parse_expression on 100,000 '('", api(lambda: tasks().parse_expression("(" * 100_000)), None, limit=3),
        Case(k, "reward of a megabyte of junk", api(lambda: countdown().reward("<answer>(" * 100_000, problem())), None,
             limit=5),
        Case(k, "load_text_files of one 20 MB paragraph",
             lambda tmp: wb("workbench.data").load_text_files(tmp / "p.txt"), None, limit=10,
             prepare=lambda tmp: write(tmp / "p.txt", "word " * 4_000_000)),
    ]  # fmt: skip
    return cases


def _interrupt_cases() -> list[Case]:
    @contextlib.contextmanager
    def ctrl_c_at_step_3():
        trainer = wb("workbench.train.pretrain").LMTrainer
        real, calls = trainer.step, []

        def step(self, model, update):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(self, model, update)

        trainer.step = step
        try:
            yield
        finally:
            trainer.step = real

    def kept_and_resumable(tmp):
        from bad_input_sweep import _run_command

        run = wb("workbench.train.run").RunFolder(tmp / "run")
        assert run.latest() is not None and run.latest().name == "step-000002", run.latest()
        code, err = _run_command(["train", *QUICK, "--out", str(tmp / "run"), "--steps", "4", "--checkpoint-every", "1",
                                  "--resume"])  # fmt: skip
        assert code == 0, err
        assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]

    return [
        Case("interrupt", "Ctrl-C at step 3", cli("train", *QUICK, *RUN, "--steps", "4", "--checkpoint-every", "1"),
             ("step 3", "--resume"), code=130, writes=True, after=kept_and_resumable, context=ctrl_c_at_step_3),
    ]  # fmt: skip


def _checkpoint_content_cases() -> list[Case]:
    k = "checkpoint contents"
    load = lambda tmp: wb("workbench.io.hf", "workbench.hf").load_hf(tmp / "m")  # noqa: E731
    name = "model.embed_tokens.weight"

    def poison(value):
        return lambda tmp: edit_tensors(tmp / "m", lambda t: t[name].view(-1).__setitem__(0, value))

    def as_dtype(dtype):
        return lambda tmp: edit_tensors(tmp / "m", lambda t: t.__setitem__(name, t[name].to(dtype)))

    def outside(prefix):
        def make(tmp):
            save_model(tmp / "m")
            weights = tmp / "m" / "model.safetensors"
            target = tmp / "elsewhere" / "w.safetensors"
            target.parent.mkdir()
            weights.rename(target)
            from safetensors import safe_open

            with safe_open(str(target), "pt") as f:
                names = list(f.keys())
            where = "../elsewhere/w.safetensors" if prefix == ".." else str(target)
            index = {"metadata": {}, "weight_map": dict.fromkeys(names, where)}
            write(tmp / "m" / "model.safetensors.index.json", json.dumps(index))

        return make

    return [
        Case(k, "NaN weights", load, "nan|finite", warn=True, owner=IO_HF, prepare=poison(float("nan"))),
        Case(k, "Inf weights", load, "inf|finite", warn=True, owner=IO_HF, prepare=poison(float("inf"))),
        Case(k, "integer weights", load, "int|dtype", warn=True, owner=IO_HF, prepare=as_dtype(torch.int32)),
        Case(k, "boolean weights", load, "bool|dtype", warn=True, owner=IO_HF, prepare=as_dtype(torch.bool)),
        Case(k, "an index naming ../ files", load, r"outside|\.\.", owner=IO_HF, prepare=outside("..")),
        Case(k, "an index naming an absolute path", load, "outside|absolute", owner=IO_HF, prepare=outside("/")),
    ]  # fmt: skip


def _model_size_cases() -> list[Case]:
    k = "model size"

    def huge_folder(tmp):
        save_model(tmp / "m")
        v3 = wb("workbench.config").ModelConfig.from_preset("deepseek-v3").to_hf()
        write(tmp / "m" / "config.json", json.dumps(v3))

    size = r"GB|GiB|bytes|memory"
    return [
        Case(k, "train --preset deepseek-v3", cli("train", *QUICK, *RUN, "--preset", "deepseek-v3"), size,
             owner=ACCOUNTING),
        Case(k, "train --set num_hidden_layers=2000000",
             cli("train", *QUICK, *RUN, "--set", "num_hidden_layers=2000000"), size, owner=ACCOUNTING, limit=10),
        Case(k, "train --set max_position_embeddings=10**12",
             cli("train", *QUICK, *RUN, "--set", "max_position_embeddings=1000000000000"), size, owner=ACCOUNTING),
        Case(k, "info --set num_hidden_layers=2000000",
             cli("info", "--preset", "tiny", "--set", "num_hidden_layers=2000000"), None, owner=ACCOUNTING, limit=5),
        Case(k, "load_hf of a 671B config over tiny weights",
             lambda tmp: wb("workbench.io.hf", "workbench.hf").load_hf(tmp / "m"), "shape|size|" + size,
             owner=ACCOUNTING, prepare=huge_folder),
    ]  # fmt: skip


def _sampling_cases() -> list[Case]:
    k = "sampling values"
    # a tiny temperature (1e-30) is not refused: it has a defined meaning, the greedy limit, tested in
    # tests/test_generate.py (sample_next subtracts the row's maximum before dividing, so nothing overflows)
    gen = lambda **kw: wb("workbench.model.generate", "workbench.generate").generate(tiny_model(), [1, 2], 4, **kw)  # noqa: E731
    return [
        Case(k, "generate(temperature=nan)", api(lambda: gen(temperature=float("nan"))), "temperature", owner=GENERATE),
        Case(k, "generate(top_p=nan)", api(lambda: gen(temperature=1.0, top_p=float("nan"))), "top_p"),
        Case(k, "generate(max_new_tokens=-1)",
             api(lambda: wb("workbench.model.generate", "workbench.generate").generate(tiny_model(), [1, 2], -1)),
             "max_new_tokens", owner=GENERATE),
    ]  # fmt: skip


def _prompt_set_cases() -> list[Case]:
    k = "prompt sets"
    load = lambda tmp: wb("workbench.serve.prompts", "workbench.prompts").load_prompt_set(tmp / "set.yaml")  # noqa: E731
    named = ("set.yaml", "greet")

    def alias_bomb(tmp):
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 7)]  # 10**7 leaves
        lines += ["name: s", "description: *a6", "prompts: [{name: greet, template: hi}]"]
        write(tmp / "set.yaml", "\n".join(lines) + "\n")

    return [
        Case(k, "a positional field {}", load, named, owner=SERVE, prepare=lambda tmp: prompt_set(tmp, "What is {}?")),
        Case(k, "a numbered field {0}", load, named, prepare=lambda tmp: prompt_set(tmp, "What is {0}?")),
        Case(k, "an unclosed field {a", load, named, prepare=lambda tmp: prompt_set(tmp, "What is {a?")),
        Case(k, "an unknown conversion {a!z}", load, named, owner=SERVE, prepare=lambda tmp: prompt_set(tmp, "{a!z}")),
        Case(k, "a format width of 999,999,999", load, named, owner=SERVE,
             prepare=lambda tmp: prompt_set(tmp, "{a:>999999999}")),
        Case(k, "a bad format spec {a:digitz}", load, named, owner=SERVE,
             prepare=lambda tmp: prompt_set(tmp, "{a:digitz}")),
        Case(k, "positional field at run time (ask)", cli("ask", "--prompts", "{tmp}/set.yaml", "--model", "{model}",
                                                          "--device", "cpu"), named, owner=SERVE,
             prepare=lambda tmp: prompt_set(tmp, "What is {}?")),
        Case(k, "YAML nested 10,000 deep", load, ("set.yaml", "deep|nest"), owner=SERVE,
             prepare=lambda tmp: write(tmp / "set.yaml", "[" * 10_000)),
        Case(k, "YAML aliases expanding to 10**7 items", load, ("set.yaml", "alias|expand|large|size"), owner=SERVE,
             limit=10, prepare=alias_bomb),
        Case(k, "a 64 MB prompt file", load, ("set.yaml", "bytes|large|size"), owner=SERVE, limit=10,
             prepare=lambda tmp: os.truncate(write(tmp / "set.yaml", ""), 64 << 20)),
        Case(k, "inputs that are not a list", load, named, prepare=lambda tmp: prompt_set(tmp, "{a}", inputs="3")),
        Case(k, "an input missing a field", load, named, prepare=lambda tmp: prompt_set(tmp, "{a} {b}")),
    ]  # fmt: skip


CASES: list[Case] = [
    *_config_type_cases(),
    *_config_range_cases(),
    *_config_file_cases(),
    *_model_input_cases(),
    *_file_cases(),
    *_device_cases(),
    *_run_setting_cases(),
    *_command_argument_cases(),
    *_run_folder_cases(),
    *_library_argument_cases(),
    *_text_scan_cases(),
    *_interrupt_cases(),
    *_checkpoint_content_cases(),
    *_model_size_cases(),
    *_sampling_cases(),
    *_prompt_set_cases(),
]


# Cases whose fix belonged to other work; every one of them has landed, so none is excused any more. A case
# whose owner's fix is still pending goes here by id, with the reason, until it passes.
PENDING: dict[str, str] = {}


def _param(case: Case):
    reason = PENDING.get(case.id)
    marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_answered_clearly_and_changes_nothing(case, tmp_path):
    outcome = run_case(case, tmp_path / "case")
    assert outcome.verdict == "clear", f"{outcome.verdict}: {outcome.message}"


def test_the_cases_have_distinct_names():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.slow
def test_vertical_overwrite_replaces_its_own_earlier_run_and_nothing_else(tmp_path):
    """``vertical --overwrite`` used to train for minutes and then fail: it never passed the overwrite on to
    the model folder. Now a second run replaces the first one's delta; without --overwrite it is refused
    before any work, changing nothing."""
    from bad_input_sweep import Command, _run_command, tree

    argv = Command(VERTICAL).resolved(tmp_path)
    assert _run_command(argv)[0] == 0
    first = tree(tmp_path / "v")
    assert "delta.safetensors" in first and "delta.json" in first
    code, err = _run_command(argv)
    assert code == 2 and "overwrite" in err and tree(tmp_path / "v") == first
    code, err = _run_command([*argv, "--overwrite", "--seed", "1"])
    assert code == 0, err
    second = tree(tmp_path / "v")
    assert set(second) == set(first) and second["delta.safetensors"] != first["delta.safetensors"]
