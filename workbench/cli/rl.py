"""The R1 commands: ``grpo``, ``sft`` and ``distill`` (registered on ``python -m workbench``).

Every run writes into ``--out``: ``metrics.jsonl`` (one JSON line per step), its checkpoints (resumable
with ``--resume``), ``model/`` (a Hugging Face folder) and ``report.json`` (held-out accuracy before and
after, and the settings). A folder that holds a run is refused unless ``--resume`` or ``--overwrite``.
Each command's settings are its config's fields (``GRPOConfig``, ``SFTConfig``, ``DistillConfig``), one
flag each; the held-out evaluation is ``HeldOut``'s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.cli.args import add_config_flags, config_from_args, given_fields, parse_sets, positive_int
from workbench.cli.common import FORMATTER, add_run_flags, claim_out, load_model, write_report


@dataclass
class HeldOut:
    """How every command measures a model: the same held-out problems before and after."""

    eval_problems: int = 128  # held-out (test split) problems evaluated
    eval_samples: int = 4  # samples per held-out problem (pass@1 is their mean accuracy)
    eval_temperature: float = 1.0  # sampling temperature of evaluation; 0 = greedy
    max_new_tokens: int = 48  # completion budget in tokens


@dataclass
class Base:
    """A base model pre-trained here when no model is given: the R1-Zero starting point."""

    preset: str = "tiny"  # model preset of the base (tiny, small, gpu; without MTP)
    base_steps: int = 600  # pre-training steps of the base
    think_fraction: float = 0.5  # share of the base corpus written with <think> reasoning; the rest answers directly


def _summary(ev: dict[str, Any]) -> str:
    return f"accuracy {ev['accuracy']:.3f}, format {ev['format']:.3f}, length {ev['length']:.1f}"


def _held_out_evaluator(args: argparse.Namespace, task, tok, seed: int):
    from workbench.rl.rollout import held_out_evaluator

    h = config_from_args(HeldOut, args)
    return held_out_evaluator(task, tok, h.eval_problems, seed=seed, n_samples=h.eval_samples,
                              temperature=h.eval_temperature, max_new_tokens=h.max_new_tokens)  # fmt: skip


def _print_before_after(out: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    print(f"held-out before: {_summary(before)}")
    print(f"held-out after:  {_summary(after)}")
    print(f"metrics: {out / 'metrics.jsonl'}\nmodel: {out / 'model'}\nreport: {out / 'report.json'}")


def _start(args: argparse.Namespace, cfg, checkpoint: str | None):
    """What a run starts from, checked before OUT is claimed (a refused run leaves no trace there): the
    device, the held-out settings, and the model given (loaded now) or the recipe of a base to pre-train."""
    from workbench.config import ModelConfig
    from workbench.rl.base import rl_model_config
    from workbench.util import resolve_device

    resolve_device(cfg.device)
    config_from_args(HeldOut, args)
    if checkpoint:
        return load_model(checkpoint, cfg.device)
    base = config_from_args(Base, args)
    return base, rl_model_config(base.preset, **parse_sets(args.set, ModelConfig))


def _starting_model(args: argparse.Namespace, task, out: Path, plan: str, cfg, start, what: str = "base"):
    """The model a run starts from: the one given; or, resuming, the base it pre-trained (OUT/<what>); or a
    base pre-trained now (``start`` is its recipe, from ``_start``) and saved to OUT/<what>."""
    from workbench.io.hf import save_hf
    from workbench.rl.base import base_train_config, pretrain_base
    from workbench.util import resolve_device

    if not isinstance(start, tuple):
        return start
    if plan == "resume" and (out / what / "config.json").is_file():
        return load_model(out / what, cfg.device)
    base, config = start
    tc = base_train_config(base.base_steps, seed=cfg.seed, device=cfg.device)
    print(f"pre-training a {base.preset} {what} on the {task.name} corpus ({base.base_steps} steps) ...")
    result = pretrain_base(task, config, tc, think_fraction=base.think_fraction, progress=not args.no_progress)
    save_hf(result.model.cpu(), out / what, overwrite=True)  # inside the run folder claimed for this run
    return result.model.to(resolve_device(cfg.device))


def _add_common(p: argparse.ArgumentParser, config_cls: type, *, base: bool = True, held_out: bool = True) -> None:
    from workbench.tasks import TASKS

    tasks = ", ".join(f"{name} ({t.description})" for name, t in TASKS.items())
    p.add_argument("--task", default="add", choices=list(TASKS), help=f"the task: {tasks} (default: add)")
    add_run_flags(p)
    if base:
        add_config_flags(p, Base, title="the base pre-trained here when no model is given")
        p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="a ModelConfig field of a base pre-trained here (repeatable)")  # fmt: skip
    exclude = tuple(f.name for f in dataclasses.fields(HeldOut)) if held_out else ()
    add_config_flags(p, config_cls, title=f"settings ({config_cls.__name__})", exclude=exclude)
    if held_out:
        add_config_flags(p, HeldOut, title="held-out evaluation")


# ---- grpo ---------------------------------------------------------------------------------------
def cmd_grpo(args: argparse.Namespace) -> int:
    from workbench.io.hf import save_hf
    from workbench.rl.grpo import GRPOConfig, grpo_train
    from workbench.tasks import get_task

    task = get_task(args.task)
    cfg = GRPOConfig.variant(args.variant, **given_fields(GRPOConfig, args))
    out = Path(args.out)
    start = _start(args, cfg, args.checkpoint)
    plan = claim_out(args, "grpo")
    model = _starting_model(args, task, out, plan, cfg, start)
    result = grpo_train(model, task, cfg, out_dir=out, progress=not args.no_progress, resume=plan == "resume",
                        overwrite=plan == "fresh" or plan == "replace")  # fmt: skip
    save_hf(result.model.cpu(), out / "model", overwrite=True)
    report = {"task": task.name, "variant": args.variant, "before": result.before, "after": result.after,
              "config": dataclasses.asdict(cfg)}  # fmt: skip
    write_report(out, report)
    _print_before_after(out, result.before, result.after)
    return 0


# ---- sft ----------------------------------------------------------------------------------------
def cmd_sft(args: argparse.Namespace) -> int:
    from workbench.io.hf import save_hf
    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.sft import SFTConfig, cold_start_pairs, rejection_sample, sft_train
    from workbench.tasks import get_task

    task = get_task(args.task)
    cfg = config_from_args(SFTConfig, args)
    if args.data == "rejection" and not args.checkpoint:
        raise ValueError("--data rejection samples from a model: give it with --checkpoint")
    out = Path(args.out)
    start = _start(args, cfg, args.checkpoint)
    plan = claim_out(args, "sft")
    model = _starting_model(args, task, out, plan, cfg, start)
    tok = tokenizer_of(model)
    ev = _held_out_evaluator(args, task, tok, cfg.seed)
    before = ev(model)
    extra: dict[str, Any] = {}
    if args.data == "traces":
        pairs = cold_start_pairs(task, args.n_examples, seed=cfg.seed)
    else:
        examples = task.sample(args.n_examples, seed=cfg.seed, split="train")
        pairs, stats = rejection_sample(model, task, examples, tokenizer=tok, n_samples=args.samples_per_prompt,
                                        keep_per_prompt=args.keep_per_prompt,
                                        max_new_tokens=config_from_args(HeldOut, args).max_new_tokens,
                                        seed=cfg.seed)  # fmt: skip
        extra["rejection_sampling"] = stats
        print(f"rejection sampling: kept {len(pairs)} verified completions "
              f"({stats['acceptance_rate']:.1%} of samples, {stats['problems_solved']:.1%} of problems)")  # fmt: skip
        if not pairs:
            raise ValueError("no sample passed the verifier; nothing to fine-tune on")
    sft_train(model, pairs, cfg, tokenizer=tok, out_dir=out, progress=not args.no_progress,
              resume=plan == "resume", overwrite=plan != "resume")  # fmt: skip
    after = ev(model)
    save_hf(model.cpu(), out / "model", overwrite=True)
    write_report(out, {"task": task.name, "data": args.data, "pairs": len(pairs), "before": before, "after": after,
                       **extra, "config": dataclasses.asdict(cfg)})  # fmt: skip
    _print_before_after(out, before, after)
    return 0


# ---- distill ------------------------------------------------------------------------------------
def cmd_distill(args: argparse.Namespace) -> int:
    from workbench.atomic import atomic_write_text
    from workbench.io.hf import save_hf
    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.distill import DistillConfig, compare_students, logit_distill, teacher_traces
    from workbench.rl.grpo import GRPOConfig
    from workbench.rl.sft import SFTConfig, sft_train
    from workbench.tasks import get_task

    task = get_task(args.task)
    cfg = config_from_args(DistillConfig, args)
    if args.mode == "compare" and args.resume:
        raise ValueError("--mode compare trains three students in one go and cannot be resumed; run it again")
    out = Path(args.out)
    teacher = load_model(args.teacher, cfg.device)
    start = _start(args, cfg, args.student)
    plan = claim_out(args, "distill")
    student = _starting_model(args, task, out, plan, cfg, start, what="student_base")
    tok = tokenizer_of(teacher)

    if args.mode == "compare":
        h = config_from_args(HeldOut, args)
        report = compare_students(teacher, student, task, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                  n_prompts=args.n_prompts, grpo=GRPOConfig(max_new_tokens=h.max_new_tokens,
                                  device=cfg.device), eval_problems=h.eval_problems, eval_samples=h.eval_samples,
                                  eval_temperature=h.eval_temperature, max_new_tokens=h.max_new_tokens,
                                  seed=cfg.seed, tokenizer=tok, progress=not args.no_progress)  # fmt: skip
        metrics = report.pop("metrics")
        report.pop("models"), report.pop("pairs")  # trained models and traces do not go into a JSON report
        for name, rows in metrics.items():
            atomic_write_text(out / name / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        write_report(out, {"task": task.name, "mode": "compare", **report})
        for name in ("teacher", "student_base", "sequence_distill", "logit_distill", "rl_only"):
            print(f"{name:>17}: {_summary(report[name])}")
        print(f"report: {out / 'report.json'}")
        return 0

    ev = _held_out_evaluator(args, task, tok, cfg.seed)
    before = ev(student)
    h = config_from_args(HeldOut, args)
    pairs, stats = teacher_traces(teacher, task, args.n_prompts, tokenizer=tok, max_new_tokens=h.max_new_tokens,
                                  seed=cfg.seed)  # fmt: skip
    print(f"teacher traces: {len(pairs)} verified ({stats['acceptance_rate']:.1%} of samples)")
    if not pairs:
        raise ValueError("the teacher solved none of the training problems; train a stronger teacher")
    student = copy.deepcopy(student)
    run = {"out_dir": out, "progress": not args.no_progress, "resume": plan == "resume", "overwrite": plan != "resume"}
    if args.mode == "sequence":
        sft_cfg = SFTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SFTConfig)})
        sft_train(student, pairs, sft_cfg, tokenizer=tok, desc="seq-distill", **run)
    else:
        logit_distill(student, teacher, pairs, cfg, tokenizer=tok, **run)
    after = ev(student)
    save_hf(student.cpu(), out / "model", overwrite=True)
    write_report(out, {"task": task.name, "mode": args.mode, "teacher_traces": stats, "before": before,
                       "after": after, "config": dataclasses.asdict(cfg)})  # fmt: skip
    _print_before_after(out, before, after)
    return 0


# ---- registration -------------------------------------------------------------------------------
def add_subcommands(subparsers) -> None:
    """Register ``grpo``, ``sft`` and ``distill`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    from workbench.rl.distill import DistillConfig
    from workbench.rl.grpo import VARIANTS, GRPOConfig
    from workbench.rl.sft import SFTConfig

    g = subparsers.add_parser(
        "grpo",
        help="reinforcement learning with GRPO and rule-based rewards (R1-Zero)",
        formatter_class=FORMATTER,
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
    g.add_argument("--checkpoint", help="start from this Hugging Face folder or run folder instead of a new base")
    g.add_argument("--variant", default="grpo", choices=list(VARIANTS), help="which paper's switches (default: grpo)")
    _add_common(g, GRPOConfig, held_out=False)
    g.set_defaults(func=cmd_grpo)

    s = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on reasoning traces: cold start, or rejection sampling",
        formatter_class=FORMATTER,
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
    s.add_argument("--checkpoint", help="the model to fine-tune (and to sample from, with --data rejection)")
    s.add_argument("--data", choices=["traces", "rejection"], default="traces", help="what to fine-tune on")
    s.add_argument("--n-examples", type=positive_int, default=256, help="training problems used (default: 256)")
    s.add_argument("--samples-per-prompt", type=positive_int, default=4, help="rejection sampling: samples per problem "
                   "(default: 4)")  # fmt: skip
    s.add_argument("--keep-per-prompt", type=positive_int, default=1,
                   help="rejection sampling: verified samples kept per problem (default: 1)")  # fmt: skip
    _add_common(s, SFTConfig)
    s.set_defaults(func=cmd_sft)

    d = subparsers.add_parser(
        "distill",
        help="distil a teacher's verified reasoning into a smaller student",
        formatter_class=FORMATTER,
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
    d.add_argument("--teacher", required=True, help="the teacher: a Hugging Face folder or run folder")
    d.add_argument("--student", help="the student base (default: pre-train one here with --preset/--set)")
    d.add_argument("--mode", choices=["sequence", "logits", "compare"], default="compare", help="(default: compare)")
    d.add_argument(
        "--n-prompts", type=positive_int, default=1024, help="training problems the teacher solves (default: 1024)"
    )
    _add_common(d, DistillConfig)
    d.set_defaults(func=cmd_distill)


__all__ = ["Base", "HeldOut", "add_subcommands"]
