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
  analyze   a routing report of any checkpoint (expert load, MaxVio, specialisation), whole or layer by layer

The settings of a run are the fields of its config dataclass (``TrainConfig``, ``GRPOConfig``, ...):
each is a flag (``--lr``, ``--group-size``) whose help is the field's documentation. ``--set FIELD=VALUE``
changes a model field the same way in every command. Bad input ends with ``error: ...`` naming the
problem and the fix, and exit status 2; a run that diverges or is interrupted keeps its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from workbench.cli.args import add_config_flags, config_from_args, finite_number, parse_sets, positive_int
from workbench.cli.common import (
    FORMATTER,
    add_model_flags,
    add_run_flags,
    load_model,
    model_config_from,
    model_dir,
)
from workbench.config import ConfigError, ModelConfig
from workbench.util import SHIPPED_DATA


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.io.files import check_output_folder
    from workbench.train import TrainConfig, train

    extra = {"attn_mode": args.attn_mode} if args.attn_mode else {}
    model_config = model_config_from(args, **extra)
    tc = config_from_args(TrainConfig, args)
    if args.export:  # refused now, not after the training
        from workbench.io.files import MODEL_FOLDER_FILES

        check_output_folder(args.export, overwrite=args.overwrite, protect=(args.out,), allowed=MODEL_FOLDER_FILES)
    dataset = None
    if args.text_files:
        from workbench.data import TokenDataset, load_text_files
        from workbench.io.tokenizer import load_tokenizer

        dataset = TokenDataset.from_documents(load_text_files(args.text_files), load_tokenizer(), seed=tc.data_seed)
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
    from workbench.dist.process import is_main_process

    if not is_main_process():  # under torchrun, rank 0 reports and exports; the others are done
        return 0
    last = result.metrics[-1] if result.metrics else {}
    summary = {k: last[k] for k in ("step", "main_loss", "mtp_loss", "eval_loss", "max_vio") if k in last}
    print(json.dumps(summary))
    print(f"metrics: {Path(args.out) / 'metrics.jsonl'}\ncheckpoint: {Path(args.out) / 'checkpoint'}")
    if args.export:
        from workbench.io.hf import save_hf

        save_hf(result.model.cpu(), args.export, overwrite=args.overwrite, protect=(args.out,))
        print(f"exported: {args.export}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from workbench.io.tokenizer import load_tokenizer, tokenizer_of
    from workbench.model.generate import generate, speculative_generate

    model = load_model(args.checkpoint, args.device)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else tokenizer_of(model)
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
        ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       eos_id=tok.eos_id, generator=gen)[0].tolist()  # fmt: skip
        print(tok.decode(ids[1:]))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from workbench.serve.prompts import format_rows, load_prompt_set, run_prompt_set

    prompt_set = load_prompt_set(args.prompts)
    if args.model is None and prompt_set.model is None:
        raise ValueError(f"{args.prompts} names no model; pass --model FOLDER")
    model = load_model(args.model or str(prompt_set.model), args.device)
    rows = run_prompt_set(
        model,
        prompt_set,
        names=args.name,
        overrides=parse_sets(args.set),
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


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from workbench.model.accounting import (
        count_params,
        flops_per_token,
        kv_cache_bytes_per_token,
        layered_bytes,
        model_bytes,
    )

    config = ModelConfig.from_hf(model_dir(args.checkpoint)) if args.checkpoint else model_config_from(args)
    counts = count_params(config)
    kv = kv_cache_bytes_per_token(config)
    flops = flops_per_token(config, context=args.context)
    weights = {
        "bfloat16": model_bytes(config, torch.bfloat16),
        "float32": model_bytes(config, torch.float32),
        "layer_by_layer_bfloat16": layered_bytes(config, torch.bfloat16),
    }
    report = {"params": counts, "weights_bytes": weights, "kv_cache_bytes_per_token_bf16": kv,
              "forward_flops_per_token": flops}  # fmt: skip
    if args.check_files:
        if not args.checkpoint:
            raise ValueError("--check-files needs --checkpoint FOLDER")
        from workbench.io.plan import plan_load

        plan = plan_load(model_dir(args.checkpoint), check_memory=False)  # headers only: nothing is loaded
        report["checkpoint"] = {"plan": plan.describe(), "files": len(plan.files), "stored_bytes": plan.stored_bytes(),
                                "fp8_tensors": plan.fp8_tensors, "notes": [text for _, text in plan.notes]}  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workbench.cli.demo import run_demo

    run_demo(out=args.out, steps=args.steps, device=args.device, progress=not args.no_progress)
    return 0


def _add_train(sub) -> None:
    from workbench.train import TrainConfig

    t = sub.add_parser(
        "train",
        help="pre-train a model",
        formatter_class=FORMATTER,
        description=(
            "Pre-train a DeepSeek-V3-style model (MLA + DeepSeekMoE + MTP) with AdamW, warmup + cosine decay, "
            "gradient clipping and auxiliary-loss-free balancing. Writes OUT/metrics.jsonl (one JSON line per step) "
            "and OUT/checkpoint (atomic; resumable exactly with --resume)."
        ),
        epilog=(
            "example: python -m workbench train --preset tiny --steps 300 --out runs/tiny\n"
            "data parallel: torchrun --nproc-per-node 2 -m workbench train --parallel ddp (or fsdp) ..."
        ),
    )
    add_model_flags(t)
    t.add_argument("--attn-mode", choices=["naive", "absorb"], help="MLA mode used in training (default: naive)")
    add_run_flags(t)
    t.add_argument("--stop-at", type=positive_int, metavar="STEP",
                   help="stop (with a checkpoint) after STEP; continue later with --resume")  # fmt: skip
    t.add_argument("--text-files", nargs="+", metavar="PATH",
                   help="train on your own UTF-8 text files or folders of *.txt, not the generated corpus")  # fmt: skip
    t.add_argument("--export", metavar="DIR", help="also write the final model as a Hugging Face folder (a new or "
                   "empty folder, or a model folder with --overwrite; never the run folder)")  # fmt: skip
    add_config_flags(t, TrainConfig, title="training (TrainConfig)")
    t.set_defaults(func=cmd_train)


def _add_generate(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="continue a prompt",
        description=(
            "Generate with the latent KV cache (absorbed MLA). Greedy by default; --temperature and --top-p sample; "
            "--speculative drafts with the MTP module and reports the acceptance rate (greedy)."
        ),
    )
    g.add_argument("--checkpoint", default=str(SHIPPED_DATA / "tiny-model"),
                   help="a Hugging Face folder or a run folder (default: the shipped data/tiny-model)")  # fmt: skip
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=finite_number, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=finite_number, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--speculative", action="store_true", help="draft with the MTP module (greedy only)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model folder's own)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    g.set_defaults(func=cmd_generate)


def _add_info(sub) -> None:
    i = sub.add_parser(
        "info",
        help="parameters, KV cache and FLOPs",
        description=(
            "Count parameters (total, active per token, MTP), KV cache bytes per token for MLA against "
            "MHA/GQA/MQA, and forward FLOPs per token."
        ),
    )
    add_model_flags(i, default_preset="deepseek-v3")
    i.add_argument("--checkpoint", help="read the config of this Hugging Face folder instead")
    i.add_argument(
        "--check-files",
        action="store_true",
        help="also plan the load of --checkpoint from its safetensors headers (every name, shape and dtype "
        "checked, nothing loaded): a quick check of a download",
    )
    i.add_argument("--context", type=positive_int, default=None, help="context length for attention FLOPs")
    i.set_defaults(func=cmd_info)


def _add_demo(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="the end-to-end tour on the tiny model",
        description=(
            "Train the tiny preset, report validation loss per domain, routing specialisation and MaxVio, generate a "
            "sample per domain, and measure MTP speculative decoding. Writes OUT/report.json."
        ),
    )
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--steps", type=positive_int, default=300, help="training steps (default: 300)")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)


def _add_ask(sub) -> None:
    a = sub.add_parser(
        "ask",
        help="run a prompt set and print the model's thinking and answer",
        description=(
            "Run the prompts of a prompt set file (YAML or JSON, see workbench.serve.prompts) and print, per input, "
            "the question, the model's thinking (<think>) and its answer (<answer>), and whether it is right when the "
            "set gives the expected answer."
        ),
    )
    a.add_argument("--prompts", required=True, metavar="FILE", help="the prompt set (.yaml, .yml or .json)")
    a.add_argument("--model", help="model folder (default: the set's 'model')")
    a.add_argument("--name", nargs="+", help="run only these prompts of the set")
    a.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="run each prompt once with this input instead of the file's, e.g. --set n=1994")  # fmt: skip
    a.add_argument("--max-new-tokens", type=positive_int, help="default: the set's, else 64")
    a.add_argument("--temperature", type=finite_number, help="0 = greedy (default: the set's, else 0)")
    a.add_argument("--top-p", type=finite_number, help="default: the set's, else 1.0")
    a.add_argument("--seed", type=int, help="sampling seed (default: the set's, else 0)")
    a.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    a.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    a.set_defaults(func=cmd_ask)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workbench", description=__doc__, formatter_class=FORMATTER)
    sub = p.add_subparsers(dest="command", required=True)

    from workbench.cli.analyze import add_subcommand as add_analyze
    from workbench.cli.rl import add_subcommands as add_rl  # grpo, sft, distill
    from workbench.cli.serve import add_subcommand as add_serve
    from workbench.cli.vertical import add_subcommand as add_vertical

    for add in (
        _add_train,
        _add_generate,
        _add_info,
        _add_demo,
        add_rl,
        add_vertical,
        _add_ask,
        add_serve,
        add_analyze,
    ):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns its exit status (0 done, 1 diverged, 2 bad input, 130 interrupted)."""
    from workbench.train.loop import TrainingDiverged

    args = build_parser().parse_args(argv)  # --help, or a flag argparse refuses: its message and SystemExit
    shown = warnings.formatwarning
    warnings.formatwarning = _plain_warning  # "warning: ..." without the source line of the library
    try:
        return args.func(args)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"stopped: {e}" if str(e) else "stopped (Ctrl-C)", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission: no traceback, the reason and the path
        print(f"error: {e.strerror or e} ({e.filename})" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"
