"""Command line: ``python -m workbench <command> --help``.

Commands:
  train     pre-train a model on the generated multi-domain corpus (or your own text files)
  generate  continue a prompt with a trained model (latent KV cache; optional MTP speculation)
  info      parameter counts, active parameters, KV cache bytes and FLOPs of a preset or checkpoint
  demo      the end-to-end tour: train the tiny model, evaluate it, generate, speculate, look at routing
  grpo      R1-style reinforcement learning with rule-based rewards (GRPO, Dr. GRPO, DAPO switches)
  sft       supervised fine-tuning: cold start on reasoning traces, or on rejection-sampled outputs
  distill   a teacher's verified traces (and logits) into a smaller student, with the comparison
  vertical  add experts to a trained MoE and teach only them a new domain (cold start, then GRPO)
  ask       run a prompt set (YAML/JSON) and print the model's thinking and answer
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from workbench.config import ConfigError, ModelConfig
from workbench.util import SHIPPED_DATA


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        if key not in names:
            raise ConfigError(f"--set: unknown config field {key!r}; fields are: {', '.join(sorted(names))}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw  # a bare string such as absorb
    return out


def _model_dir(path: str) -> Path:
    """Accept a Hugging Face folder, a run folder (out/checkpoint/model) or a checkpoint folder."""
    p = Path(path)
    for candidate in (p, p / "model", p / "checkpoint" / "model"):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"no model at {path}: expected config.json there, in model/ or in checkpoint/model/")


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.train import TrainConfig, train

    overrides = _parse_overrides(args.set or [])
    if args.attn_mode:
        overrides["attn_mode"] = args.attn_mode
    model_config = ModelConfig.from_preset(args.preset, **overrides)
    tc = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        n_docs=args.n_docs,
        data_seed=args.data_seed,
        device=args.device,
        grad_clip=args.grad_clip,
        weight_decay=args.weight_decay,
    )
    dataset = None
    if args.text_files:
        from workbench.data import TokenDataset, load_text_files
        from workbench.io.tokenizer import load_tokenizer

        dataset = TokenDataset.from_documents(load_text_files(args.text_files), load_tokenizer(), seed=args.data_seed)
    result = train(
        model_config,
        tc,
        args.out,
        dataset=dataset,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_at=args.stop_at,
        progress=not args.no_progress,
    )
    last = result.metrics[-1] if result.metrics else {}
    summary = {k: last[k] for k in ("step", "main_loss", "mtp_loss", "eval_loss", "max_vio") if k in last}
    print(json.dumps(summary))
    print(f"metrics: {Path(args.out) / 'metrics.jsonl'}\ncheckpoint: {Path(args.out) / 'checkpoint'}")
    if args.export:
        from workbench.io.hf import save_hf

        save_hf(result.model.cpu(), args.export)
        print(f"exported: {args.export}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from workbench.io.hf import load_hf
    from workbench.io.tokenizer import load_tokenizer
    from workbench.model.generate import generate, speculative_generate
    from workbench.util import resolve_device

    model = load_hf(_model_dir(args.checkpoint), device=resolve_device(args.device))
    tok = load_tokenizer(args.tokenizer)
    prompt = [tok.bos_id, *tok.encode(args.prompt)]
    if args.speculative:
        res = speculative_generate(model, prompt, args.max_new_tokens, eos_id=tok.eos_id)
        ids = res.tokens[0].tolist()
        print(tok.decode(ids[1:]))
        print(
            f"[speculative: {res.accepted}/{res.drafted} drafts accepted ({res.acceptance_rate:.0%}), "
            f"{res.tokens_per_forward:.2f} tokens per main forward]",
            file=sys.stderr,
        )
    else:
        gen = torch.Generator(device=model.device).manual_seed(args.seed)
        ids = generate(
            model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_id=tok.eos_id,
            generator=gen,
        )[0].tolist()
        print(tok.decode(ids[1:]))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from workbench.io.hf import load_hf
    from workbench.serve.prompts import format_rows, load_prompt_set, run_prompt_set
    from workbench.util import resolve_device

    prompt_set = load_prompt_set(args.prompts)
    if args.model is None and prompt_set.model is None:
        raise ValueError(f"{args.prompts} names no model; pass --model FOLDER")
    model = load_hf(_model_dir(args.model or str(prompt_set.model)), device=resolve_device(args.device))
    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            overrides[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            overrides[key] = raw
    rows = run_prompt_set(
        model,
        prompt_set,
        names=args.name,
        overrides=overrides,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_rows(rows))
        checked = [r["correct"] for r in rows if r["correct"] is not None]
        if checked:
            print(f"{sum(checked)}/{len(checked)} answers right")
    return 0


def cmd_vertical(args: argparse.Namespace) -> int:
    from workbench.vertical import run_vertical

    report = run_vertical(
        args.base,
        args.task,
        args.out,
        replay_task=None if args.replay_task == "corpus" else args.replay_task,
        scale=args.scale,
        n=args.n,
        layers=args.layers,
        init=args.init,
        old_rate=args.old_rate,
        steps=args.steps,
        replay=args.replay,
        lr=args.lr,
        grpo_steps=args.grpo_steps,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(json.dumps(report["summary"], indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from workbench.model.accounting import count_params, flops_per_token, kv_cache_bytes_per_token

    if args.checkpoint:
        config = ModelConfig.from_hf(_model_dir(args.checkpoint))
    else:
        config = ModelConfig.from_preset(args.preset, **_parse_overrides(args.set or []))
    counts = count_params(config)
    kv = kv_cache_bytes_per_token(config)
    flops = flops_per_token(config, context=args.context)
    print(
        json.dumps(
            {"params": counts, "kv_cache_bytes_per_token_bf16": kv, "forward_flops_per_token": flops},
            indent=2,
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workbench.cli.demo import run_demo

    run_demo(out=args.out, steps=args.steps, device=args.device, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m workbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    presets = ", ".join(ModelConfig.preset_names())

    t = sub.add_parser(
        "train",
        help="pre-train a model",
        description=(
            "Pre-train a DeepSeek-V3-style model (MLA + DeepSeekMoE + MTP) with AdamW, warmup + cosine decay, "
            "gradient clipping and auxiliary-loss-free balancing. Writes OUT/metrics.jsonl (one JSON line per step) "
            "and OUT/checkpoint (atomic; resumable)."
        ),
    )
    t.add_argument("--preset", default="tiny", help=f"model size: {presets} (default: tiny)")
    t.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a ModelConfig field, e.g. --set n_routed_experts=16 (repeatable)",
    )
    t.add_argument("--attn-mode", choices=["naive", "absorb"], help="MLA mode used in training (default: naive)")
    t.add_argument("--steps", type=int, default=300, help="optimiser steps in total (default: 300)")
    t.add_argument("--out", required=True, help="run folder for metrics.jsonl and checkpoint/")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    t.add_argument("--warmup-steps", type=int, default=30, help="linear warmup steps (default: 30)")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 disables (default: 1.0)")
    t.add_argument("--eval-every", type=int, default=50, help="steps between validation losses (default: 50)")
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between checkpoints; 0 = only at the end (default: 0)",
    )
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch sampling (default: 0)")
    t.add_argument("--n-docs", type=int, default=4000, help="documents in the generated corpus (default: 4000)")
    t.add_argument("--data-seed", type=int, default=0, help="seed of the generated corpus (default: 0)")
    t.add_argument(
        "--text-files",
        nargs="+",
        metavar="PATH",
        help="train on your own UTF-8 text files or folders of *.txt instead of the generated corpus",
    )
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ... (default: auto)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint; same losses as never stopping")
    t.add_argument("--overwrite", action="store_true", help="start afresh even if OUT already holds a run")
    t.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="stop (with a checkpoint) after STEP, to continue later with --resume",
    )
    t.add_argument("--export", metavar="DIR", help="also write the final model as a Hugging Face folder")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser(
        "generate",
        help="continue a prompt",
        description=(
            "Generate with the latent KV cache (absorbed MLA). Greedy by default; --temperature and --top-p sample; "
            "--speculative drafts with the MTP module and reports the acceptance rate (greedy)."
        ),
    )
    g.add_argument(
        "--checkpoint",
        default=str(SHIPPED_DATA / "tiny-model"),
        help="a Hugging Face folder or a run folder (default: the shipped data/tiny-model)",
    )
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--speculative", action="store_true", help="draft with the MTP module (greedy only)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the shipped data/tokenizer.json)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "info",
        help="parameters, KV cache and FLOPs",
        description=(
            "Count parameters (total, active per token, MTP) on the meta device, KV cache bytes per token for MLA "
            "against MHA/GQA/MQA, and forward FLOPs per token."
        ),
    )
    i.add_argument("--preset", default="deepseek-v3", help=f"{presets} (default: deepseek-v3)")
    i.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field")
    i.add_argument("--checkpoint", help="read the config of this Hugging Face folder instead")
    i.add_argument("--context", type=int, default=None, help="context length for attention FLOPs")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser(
        "demo",
        help="the end-to-end tour on the tiny model",
        description=(
            "Train the tiny preset, report validation loss per domain, routing specialisation and MaxVio, generate a "
            "sample per domain, and measure MTP speculative decoding. Writes OUT/report.json."
        ),
    )
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    from workbench.cli.rl import add_subcommands  # R1: grpo, sft, distill

    add_subcommands(sub)

    v = sub.add_parser(
        "vertical",
        help="grow a trained MoE by new experts and train only them on a new domain",
        description=(
            "Add experts to every MoE layer of a trained model (workbench.vertical), wake them for the new domain, "
            "train only them (and their router rows, and the rows of tokens the base never saw) on the task's worked "
            "problems mixed with replay of the base corpus, then optionally GRPO restricted to the same parameters. "
            "Writes OUT/model (a Hugging Face folder with vertical.json) and OUT/report.json."
        ),
    )
    v.add_argument("--base", help="the trained model to grow (default: pre-train the R1 base of --replay-task)")
    v.add_argument("--task", default="sub", help="the new domain, a task of workbench.tasks (default: sub)")
    v.add_argument(
        "--replay-task",
        default="add",
        help="the task the base knows (its documents are replayed and its accuracy watched); 'corpus' for a "
        "five-domain model such as data/tiny-model (default: add)",
    )
    v.add_argument("--scale", default="laptop", help="scale of the base pre-training when --base is not given")
    v.add_argument("--out", default="runs/vertical", help="output folder (default: runs/vertical)")
    v.add_argument("--n", type=int, default=None, help="new experts per layer (default: 2 x n_group, two per group)")
    v.add_argument("--layers", type=int, nargs="+", help="MoE layers to grow (default: all of the main model)")
    v.add_argument("--init", default="copy", choices=["copy", "average", "random"], help="initialisation")
    v.add_argument("--old-rate", type=float, default=0.05, help="forgetting budget at wake-up: the share of old-domain "
                   "tokens allowed onto the new experts (default: 0.05)")  # fmt: skip
    v.add_argument("--steps", type=int, default=3000, help="cold-start steps on the new domain (default: 3000)")
    v.add_argument("--replay", type=float, default=0.75, help="share of replayed old-domain tokens (default: 0.75)")
    v.add_argument("--lr", type=float, default=3e-3, help="learning rate of the LM stage (default: 3e-3)")
    v.add_argument("--grpo-steps", type=int, default=20, help="GRPO steps after the cold start (default: 20)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    v.add_argument("--overwrite", action="store_true", help="replace OUT/model if it exists")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_vertical)

    a = sub.add_parser(
        "ask",
        help="run a prompt set and print the model's thinking and answer",
        description=(
            "Run the prompts of a prompt set file (YAML or JSON, see workbench.serve.prompts) and print, per input, "
            "the "
            "question, the model's thinking (<think>) and its answer (<answer>), and whether it is right when the set "
            "gives the expected answer."
        ),
    )
    a.add_argument("--prompts", required=True, metavar="FILE", help="the prompt set (.yaml, .yml or .json)")
    a.add_argument("--model", help="model folder (default: the set's 'model')")
    a.add_argument("--name", nargs="+", help="run only these prompts of the set")
    a.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="run each prompt once with this input instead of the file's, e.g. --set n=1994")  # fmt: skip
    a.add_argument("--max-new-tokens", type=int, help="default: the set's, else 64")
    a.add_argument("--temperature", type=float, help="0 = greedy (default: the set's, else 0)")
    a.add_argument("--top-p", type=float, help="default: the set's, else 1.0")
    a.add_argument("--seed", type=int, help="sampling seed (default: the set's, else 0)")
    a.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    a.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    a.set_defaults(func=cmd_ask)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
