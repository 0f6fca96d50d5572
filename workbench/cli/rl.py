"""The R1 commands: ``grpo``, ``sft`` and ``distill`` (registered on ``python -m workbench``).

``add_subcommands(subparsers)`` adds the three subcommands to an ``argparse`` sub-parser set; each
subcommand's ``func`` returns an exit status. Every run writes into ``--out``: ``metrics.jsonl`` (one
JSON line per step), ``model/`` (a Hugging Face folder) and ``report.json`` (held-out accuracy before
and after, and the settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

_FMT = argparse.RawDescriptionHelpFormatter


def _model_dir(path: str) -> Path:
    """A Hugging Face folder, or a run folder holding one as ``model/`` or ``checkpoint/model``."""
    p = Path(path)
    for cand in (p, p / "model", p / "checkpoint" / "model"):
        if (cand / "config.json").exists():
            return cand
    raise FileNotFoundError(f"no model at {path!r} (looked for config.json in it, model/ and checkpoint/model/)")


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _write_report(out: Path, report: dict[str, Any]) -> None:
    from workbench.io.files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")


def _summary(ev: dict[str, Any]) -> str:
    return f"accuracy {ev['accuracy']:.3f}, format {ev['format']:.3f}, length {ev['length']:.1f}"


def _held_out_evaluator(args: argparse.Namespace, task, tok):
    """``ev(model)``: the held-out evaluation every command reports, with the command's sampling flags."""
    from workbench.rl.rollout import held_out_evaluator

    return held_out_evaluator(
        task,
        tok,
        args.eval_problems,
        seed=args.seed,
        n_samples=args.eval_samples,
        temperature=args.eval_temperature,
        max_new_tokens=args.max_new_tokens,
    )


def _print_before_after(out: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    print(f"held-out before: {_summary(before)}")
    print(f"held-out after:  {_summary(after)}")
    print(f"metrics: {out / 'metrics.jsonl'}\nmodel: {out / 'model'}\nreport: {out / 'report.json'}")


def _load_or_pretrain(args: argparse.Namespace, task, out: Path, what: str = "base"):
    """The model to start from: ``--checkpoint``, or a base pre-trained now (saved to OUT/base)."""
    from workbench.io.hf import load_hf, save_hf
    from workbench.rl.base import pretrain_base, rl_model_config
    from workbench.train import TrainConfig
    from workbench.util import resolve_device

    if getattr(args, "checkpoint", None):
        return load_hf(_model_dir(args.checkpoint), device=resolve_device(args.device))
    config = rl_model_config(args.preset, **_parse_sets(args.set))
    tc = TrainConfig(
        steps=args.base_steps,
        batch_size=32,
        seq_len=64,
        lr=3e-3,
        warmup_steps=min(30, args.base_steps // 10),
        eval_every=0,
        seed=args.seed,
        device=args.device,
    )
    print(f"pre-training a {args.preset} {what} on the {task.name} corpus ({args.base_steps} steps) ...")
    result = pretrain_base(task, config, tc, think_fraction=args.think_fraction, progress=not args.no_progress)
    save_hf(result.model.cpu(), out / what)
    return result.model.to(resolve_device(args.device))


def _add_common(p: argparse.ArgumentParser, *, base: bool = True) -> None:
    from workbench.tasks import TASKS

    tasks = ", ".join(f"{name} ({t.description})" for name, t in TASKS.items())
    p.add_argument("--task", default="add", choices=list(TASKS), help=f"the task: {tasks} (default: add)")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, model/, report.json")
    if base:
        p.add_argument(
            "--preset", default="tiny", help="model preset of a base pre-trained here (default: tiny, without MTP)"
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="FIELD=VALUE",
            help="override a ModelConfig field of a base pre-trained here (repeatable)",
        )
        p.add_argument(
            "--base-steps", type=int, default=600, help="pre-training steps of a base made here (default: 600)"
        )
        p.add_argument(
            "--think-fraction",
            type=float,
            default=0.5,
            help="fraction of the base corpus written with <think> reasoning; the rest answers directly (default: 0.5)",
        )
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion budget in tokens (default: 48)")
    p.add_argument("--eval-problems", type=int, default=128, help="held-out problems evaluated (default: 128)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem (default: 4)")
    p.add_argument(
        "--eval-temperature",
        type=float,
        default=1.0,
        help="sampling temperature of evaluation; 0 = greedy (default: 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---- grpo ---------------------------------------------------------------------------------------
def cmd_grpo(args: argparse.Namespace) -> int:
    from workbench.io.hf import save_hf
    from workbench.io.tokenizer import load_tokenizer
    from workbench.rl.grpo import GRPOConfig, grpo_train
    from workbench.tasks import get_task

    task = get_task(args.task)
    out = Path(args.out)
    overrides = {
        "steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "group_size": args.group_size,
        "inner_steps": args.inner_steps,
        "lr": args.lr,
        "accuracy_weight": args.accuracy_weight,
        "format_weight": args.format_weight,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "eval_every": args.eval_every,
        "eval_problems": args.eval_problems,
        "eval_samples": args.eval_samples,
        "eval_temperature": args.eval_temperature,
        "seed": args.seed,
        "device": args.device,
    }
    for name in ("beta", "clip_eps", "clip_eps_high", "loss_agg"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.scale_rewards is not None:
        overrides["scale_rewards"] = args.scale_rewards
    if args.drop_uniform_groups is not None:
        overrides["drop_uniform_groups"] = args.drop_uniform_groups
    cfg = GRPOConfig.variant(args.variant, **overrides)
    model = _load_or_pretrain(args, task, out)
    result = grpo_train(model, task, cfg, tokenizer=load_tokenizer(), out_dir=out, progress=not args.no_progress)
    save_hf(result.model.cpu(), out / "model")
    report = {
        "task": task.name,
        "variant": args.variant,
        "before": result.before,
        "after": result.after,
        "config": dataclasses.asdict(cfg),
    }
    _write_report(out, report)
    _print_before_after(out, result.before, result.after)
    return 0


# ---- sft ----------------------------------------------------------------------------------------
def cmd_sft(args: argparse.Namespace) -> int:
    from workbench.io.hf import save_hf
    from workbench.io.tokenizer import load_tokenizer
    from workbench.rl.sft import SFTConfig, cold_start_pairs, rejection_sample, sft_train
    from workbench.tasks import get_task

    task = get_task(args.task)
    tok = load_tokenizer()
    out = Path(args.out)
    if args.data == "rejection" and not args.checkpoint:
        raise ValueError("--data rejection samples from a model: give it with --checkpoint")
    model = _load_or_pretrain(args, task, out)
    ev = _held_out_evaluator(args, task, tok)
    before = ev(model)
    extra: dict[str, Any] = {}
    if args.data == "traces":
        pairs = cold_start_pairs(task, args.n_examples, seed=args.seed)
    else:
        examples = task.sample(args.n_examples, seed=args.seed, split="train")
        pairs, stats = rejection_sample(
            model,
            task,
            examples,
            tokenizer=tok,
            n_samples=args.samples_per_prompt,
            keep_per_prompt=args.keep_per_prompt,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        extra["rejection_sampling"] = stats
        print(
            f"rejection sampling: kept {len(pairs)} verified completions "
            f"({stats['acceptance_rate']:.1%} of samples, {stats['problems_solved']:.1%} of problems)"
        )
        if not pairs:
            raise ValueError("no sample passed the verifier; nothing to fine-tune on")
    cfg = SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)
    sft_train(model, pairs, cfg, tokenizer=tok, out_dir=out, progress=not args.no_progress)
    after = ev(model)
    save_hf(model.cpu(), out / "model")
    _write_report(
        out,
        {
            "task": task.name,
            "data": args.data,
            "pairs": len(pairs),
            "before": before,
            "after": after,
            **extra,
            "config": dataclasses.asdict(cfg),
        },
    )
    _print_before_after(out, before, after)
    return 0


# ---- distill ------------------------------------------------------------------------------------
def cmd_distill(args: argparse.Namespace) -> int:
    import copy

    from workbench.io.hf import load_hf, save_hf
    from workbench.io.tokenizer import load_tokenizer
    from workbench.rl.distill import DistillConfig, compare_students, logit_distill, teacher_traces
    from workbench.rl.grpo import GRPOConfig
    from workbench.rl.sft import SFTConfig, sft_train
    from workbench.tasks import get_task
    from workbench.util import resolve_device

    task = get_task(args.task)
    tok = load_tokenizer()
    out = Path(args.out)
    device = resolve_device(args.device)
    teacher = load_hf(_model_dir(args.teacher), device=device)
    if args.student:
        student = load_hf(_model_dir(args.student), device=device)
    else:
        args.checkpoint = None
        student = _load_or_pretrain(args, task, out, what="student_base")

    if args.mode == "compare":
        report = compare_students(
            teacher,
            student,
            task,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            n_prompts=args.n_prompts,
            grpo=GRPOConfig(max_new_tokens=args.max_new_tokens, device=args.device),
            eval_problems=args.eval_problems,
            eval_samples=args.eval_samples,
            eval_temperature=args.eval_temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            tokenizer=tok,
            progress=not args.no_progress,
        )
        metrics = report.pop("metrics")
        for name, rows in metrics.items():
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        _write_report(out, {"task": task.name, "mode": "compare", **report})
        for name in ("teacher", "student_base", "sequence_distill", "logit_distill", "rl_only"):
            print(f"{name:>17}: {_summary(report[name])}")
        print(f"report: {out / 'report.json'}")
        return 0

    ev = _held_out_evaluator(args, task, tok)
    before = ev(student)
    pairs, stats = teacher_traces(
        teacher, task, args.n_prompts, tokenizer=tok, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    print(f"teacher traces: {len(pairs)} verified ({stats['acceptance_rate']:.1%} of samples)")
    if not pairs:
        raise ValueError("the teacher solved none of the training problems; train a stronger teacher")
    student = copy.deepcopy(student)
    if args.mode == "sequence":
        cfg = SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)
        sft_train(student, pairs, cfg, tokenizer=tok, out_dir=out, progress=not args.no_progress, desc="seq-distill")
    else:
        cfg = DistillConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            temperature=args.temperature,
            ce_weight=args.ce_weight,
            seed=args.seed,
            device=args.device,
        )
        logit_distill(student, teacher, pairs, cfg, tokenizer=tok, out_dir=out, progress=not args.no_progress)
    after = ev(student)
    save_hf(student.cpu(), out / "model")
    _write_report(
        out,
        {
            "task": task.name,
            "mode": args.mode,
            "teacher_traces": stats,
            "before": before,
            "after": after,
            "config": dataclasses.asdict(cfg),
        },
    )
    _print_before_after(out, before, after)
    return 0


# ---- registration -------------------------------------------------------------------------------
def _bool_flag(p: argparse.ArgumentParser, name: str, help_on: str, help_off: str) -> None:
    dest = name.replace("-", "_")
    g = p.add_mutually_exclusive_group()
    g.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=help_on)
    g.add_argument(f"--no-{name}", dest=dest, action="store_false", help=help_off)


def add_subcommands(subparsers) -> None:
    """Register ``grpo``, ``sft`` and ``distill`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    g = subparsers.add_parser(
        "grpo",
        help="reinforcement learning with GRPO and rule-based rewards (R1-Zero)",
        formatter_class=_FMT,
        description=(
            "Train a model on a verifiable task with GRPO: sample --group-size completions per prompt, reward each\n"
            "with rule-based accuracy and format rewards, use the group as the baseline (advantage = reward minus\n"
            "the group mean, divided by the group std), and take --inner-steps clipped policy-gradient steps with a\n"
            "k3 KL penalty (weight --beta) to the starting model. --variant picks the switches of GRPO\n"
            "(DeepSeekMath), Dr. GRPO (no std scaling, constant length normalisation) or DAPO (token-level loss,\n"
            "clip-higher 0.28, zero-signal groups dropped, no KL); the flags after it override single switches.\n\n"
            "Without --checkpoint, a base model is first pre-trained on a corpus of the task where only\n"
            "--think-fraction of the solutions show their reasoning (the R1-Zero starting point), saved to OUT/base.\n"
            "Writes OUT/metrics.jsonl (reward, accuracy, format rate, response length, KL, clip fraction, entropy\n"
            "per step; held-out accuracy every --eval-every steps), OUT/model and OUT/report.json."
        ),
        epilog="example: python -m workbench grpo --task add --out runs/r1zero --steps 60",
    )
    _add_common(g)
    g.add_argument("--checkpoint", help="start from this Hugging Face folder or run folder instead of a new base")
    g.add_argument(
        "--variant", default="grpo", choices=["grpo", "dr_grpo", "dapo"], help="which paper's switches (default: grpo)"
    )
    g.add_argument("--steps", type=int, default=60, help="rollout batches (default: 60)")
    g.add_argument("--prompts-per-step", type=int, default=8, help="prompts per batch (default: 8)")
    g.add_argument("--group-size", type=int, default=8, help="G, completions per prompt (default: 8)")
    g.add_argument("--inner-steps", type=int, default=2, help="mu, optimiser steps per batch (default: 2)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate, constant (default: 1e-3)")
    g.add_argument("--beta", type=float, help="KL weight (default: 0.04; dapo: 0)")
    g.add_argument("--clip-eps", type=float, help="lower clip range eps_low (default: 0.2)")
    g.add_argument("--clip-eps-high", type=float, help="upper clip range eps_high (default: eps_low; dapo: 0.28)")
    g.add_argument(
        "--loss-agg",
        choices=["sequence", "token", "constant"],
        help="loss averaging: per sequence then batch (grpo), over all tokens (dapo), "
        "sum / (rows * max-new-tokens) (dr_grpo)",
    )
    _bool_flag(g, "scale-rewards", "divide advantages by the group std (grpo, dapo)", "do not (dr_grpo)")
    _bool_flag(g, "drop-uniform-groups", "no loss on groups whose rewards are all equal (dapo)", "keep them")
    g.add_argument("--accuracy-weight", type=float, default=1.0, help="weight of the accuracy reward (default: 1)")
    g.add_argument("--format-weight", type=float, default=0.5, help="weight of the format reward (default: 0.5)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts (default: 1)")
    g.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations (default: 10)")
    g.set_defaults(func=cmd_grpo)

    s = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on reasoning traces: cold start, or rejection sampling",
        formatter_class=_FMT,
        description=(
            "Fine-tune on (prompt, completion) pairs with the loss on the completion only.\n"
            "--data traces: R1's cold start: --n-examples worked traces <think>...</think><answer>...</answer>\n"
            "  generated by the task's code.\n"
            "--data rejection: sample --samples-per-prompt completions from --checkpoint for --n-examples training\n"
            "  problems, keep those the verifier accepts (right answer and format), and fine-tune on them.\n"
            "Starts from --checkpoint, or from a base pre-trained here. Writes OUT/metrics.jsonl, OUT/model and\n"
            "OUT/report.json (held-out accuracy before and after)."
        ),
        epilog=(
            "example: python -m workbench sft --task add --data traces --n-examples 256 --out runs/cold\n"
            "         python -m workbench sft --task add --data rejection --checkpoint runs/r1/model --out runs/rs"
        ),
    )
    _add_common(s)
    s.add_argument("--checkpoint", help="the model to fine-tune (and to sample from, with --data rejection)")
    s.add_argument("--data", choices=["traces", "rejection"], default="traces", help="what to fine-tune on")
    s.add_argument("--n-examples", type=int, default=256, help="training problems used (default: 256)")
    s.add_argument(
        "--samples-per-prompt", type=int, default=4, help="rejection sampling: samples per problem (default: 4)"
    )
    s.add_argument(
        "--keep-per-prompt",
        type=int,
        default=1,
        help="rejection sampling: verified samples kept per problem (default: 1)",
    )
    s.add_argument("--steps", type=int, default=150, help="optimiser steps (default: 150)")
    s.add_argument("--batch-size", type=int, default=32, help="pairs per step (default: 32)")
    s.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    s.set_defaults(func=cmd_sft)

    d = subparsers.add_parser(
        "distill",
        help="distil a teacher's verified reasoning into a smaller student",
        formatter_class=_FMT,
        description=(
            "Distillation from --teacher into a student (--student, or a base of --preset pre-trained here).\n"
            "--mode sequence: SFT of the student on the teacher's verified traces (what DeepSeek-R1 did).\n"
            "--mode logits: on the same traces, minimise tau^2 KL(teacher || student) of the next-token\n"
            "  distributions at every completion position (plus --ce-weight times cross-entropy).\n"
            "--mode compare: both, and the same student trained by GRPO alone, each for --steps optimiser steps;\n"
            "  held-out accuracy of teacher, student base and the three students side by side in OUT/report.json."
        ),
        epilog=(
            "example: python -m workbench distill --task add --teacher runs/r1/model --preset tiny "
            "--set hidden_size=64 --mode compare --out runs/distill"
        ),
    )
    _add_common(d)
    d.add_argument("--teacher", required=True, help="the teacher: a Hugging Face folder or run folder")
    d.add_argument("--student", help="the student base (default: pre-train one here with --preset/--set)")
    d.add_argument("--mode", choices=["sequence", "logits", "compare"], default="compare", help="(default: compare)")
    d.add_argument("--n-prompts", type=int, default=1024, help="training problems the teacher solves (default: 1024)")
    d.add_argument("--steps", type=int, default=150, help="optimiser steps of each student (default: 150)")
    d.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    d.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    d.add_argument("--temperature", type=float, default=1.0, help="logits mode: softening temperature tau (default: 1)")
    d.add_argument("--ce-weight", type=float, default=0.0, help="logits mode: weight of cross-entropy (default: 0)")
    d.set_defaults(func=cmd_distill)


__all__ = ["add_subcommands", "cmd_distill", "cmd_grpo", "cmd_sft"]
