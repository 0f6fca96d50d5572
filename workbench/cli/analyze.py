"""The ``analyze`` command: a routing report of any checkpoint folder, as JSON and a self-contained HTML page.

``python -m workbench analyze --model DIR --corpus`` runs windows of each domain of the generated corpus
through the model; ``--text a.txt b.txt`` runs each file as its own source. The model is loaded whole
when it fits the device's memory and one decoder layer at a time otherwise (``--layered`` forces it), so a
671B checkpoint can be analysed on one GPU box. Writes OUT/routing.json and OUT/routing.html.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_DTYPES = ("auto", "bfloat16", "float16", "float32")
REPORT_FILES = ("routing.json", "routing.html")


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before anything is read or written."""
    for name in ("seq_len", "max_tokens", "batch_size", "corpus_docs"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "seq_len" else 1):
            raise ValueError(
                f"--{name.replace('_', '-')} must be at least {2 if name == 'seq_len' else 1}, got {value}"
            )
    for path in args.text or []:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--text {path}: no such file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; choose another output path")
    existing = [name for name in REPORT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}; pass --overwrite to replace the report, or choose another "
            "--out"
        )


def _sources(args: argparse.Namespace, tokenizer) -> dict[str, list[list[int]]]:
    from workbench.analysis.report import windows

    texts: dict[str, str] = {}
    if args.corpus:
        from workbench.data import generate_corpus

        for doc in generate_corpus(args.corpus_docs, seed=args.seed):
            texts[doc.domain] = texts.get(doc.domain, "") + doc.text + "\n\n"
    for path in args.text or []:
        p = Path(path)
        try:
            texts[p.name if p.name not in texts else str(p)] = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--text {path} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    sources = {}
    for name, text in texts.items():
        ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        try:
            sources[name] = windows(ids, args.seq_len, args.max_tokens)
        except ValueError as e:
            raise ValueError(f"source {name!r}: {e}") from None
    return sources


def cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from workbench.analysis.report import report_html, routing_report
    from workbench.atomic import atomic_write_text
    from workbench.cli.common import model_dir
    from workbench.io.layered import layered_or_whole
    from workbench.io.tokenizer import load_tokenizer, tokenizer_of
    from workbench.util import resolve_device

    if not args.corpus and not args.text:
        raise ValueError("give --corpus (the generated corpus, one source per domain) or --text FILE [FILE ...]")
    _check_args(args)
    folder = model_dir(args.model)
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    layered = True if args.layered else (False if args.whole else None)
    model, is_layered = layered_or_whole(folder, device, layered=layered, dtype=dtype, progress=not args.no_progress)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else tokenizer_of(model)
    sources = _sources(args, tokenizer)
    report = routing_report(model, sources, batch_size=args.batch_size, attn_mode=args.attn_mode,
                            progress=not args.no_progress)  # fmt: skip
    report["model"]["path"] = str(folder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "routing.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "routing.html", report_html(report, title=f"Routing report: {folder}"))
    summary = {
        "execution": report["execution"],
        "tokens": sum(s["tokens"] for s in report["sources"].values()),
        "max_vio_mean": round(report["max_vio"]["mean"], 4),
        "specialisation_mean": None if report["specialisation"] is None else round(report["specialisation"]["mean"], 4),
        "seconds": report["seconds"],
        "peak_rss_gib": round(report["memory"]["peak_rss_bytes"] / 1024**3, 3),
    }
    print(json.dumps(summary))
    print(f"report: {out / 'routing.json'}\npage: {out / 'routing.html'}")
    return 0


def add_subcommand(sub) -> None:
    a = sub.add_parser(
        "analyze",
        help="a routing report of any checkpoint (expert load, MaxVio, specialisation, shared experts)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run token windows through a checkpoint folder (ours, DeepSeek's V2/V2-Lite/V3/R1 in bf16 or FP8, or any "
            "deepseek_v3-type model) and report per MoE layer: the load of every routed expert, MaxVio, each "
            "source's expert usage and how specialised the sources are, and the shared experts' share of the "
            "output. Sources are the generated corpus's domains (--corpus) or your files (--text, one source each). "
            "A model that does not fit the device's memory runs one decoder layer at a time. Writes "
            "OUT/routing.json and OUT/routing.html (self-contained: plotly inlined)."
        ),
        epilog="example: python -m workbench analyze --model data/tiny-model --corpus --out runs/analyze",
    )
    a.add_argument("--model", required=True, help="a Hugging Face folder (or a run folder holding one)")
    src = a.add_argument_group("sources (at least one)")
    src.add_argument("--corpus", action="store_true", help="the generated corpus, one source per domain")
    src.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files, one source each")
    a.add_argument("--corpus-docs", type=int, default=300, help="documents of the generated corpus (default: 300)")
    a.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default: 0)")
    a.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: 128)")
    a.add_argument("--max-tokens", type=int, default=8192, help="tokens per source at most (default: 8192)")
    a.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8; larger batches "
                   "read a layered model from disk fewer times)")  # fmt: skip
    a.add_argument("--attn-mode", choices=["naive", "absorb"], help="MLA mode (default: the config's)")
    a.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights' dtype (default: the checkpoint's)")
    a.add_argument("--tokenizer", help="tokenizer.json (default: the model folder's own)")
    how = a.add_mutually_exclusive_group()
    how.add_argument("--layered", action="store_true", help="run one decoder layer at a time even if the model fits")
    how.add_argument("--whole", action="store_true", help="load the whole model (refused if it does not fit)")
    a.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    a.add_argument("--out", default="runs/analyze", help="output folder (default: runs/analyze)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing report in OUT")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_analyze)
