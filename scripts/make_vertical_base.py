"""Regenerate data/add-base (the base that lesson 9 and the vertical comparison specialise) or data/read-base.

    python scripts/make_vertical_base.py            # data/add-base: about 9 minutes on one CPU thread
    python scripts/make_vertical_base.py --read     # data/read-base: with reading drills, about 15 minutes

It is the R1 lessons' ``add`` base (``workbench.rl.pipeline.make_base``: the ``tiny`` preset without MTP,
4000 solved addition problems, half of them with worked reasoning, batches of 32 x 64 tokens at lr 3e-3)
trained for 2400 steps instead of the laptop scale's 800. At 800 steps it adds about half of held-out
problems greedily, too noisy to measure a 1-point forgetting budget; at 2400 steps it adds almost all of
them, directly. The checkpoint is about 3 MB (float32, Hugging Face layout, with its tokenizer), so CI and
the lesson load it instead of pre-training it again.

``--read`` mixes 12000 reading drills (``workbench.tasks.recall``: copy a digit string, find a record by
its key; half of them with the trace that names the record) into the same corpus, trains 4800 steps and
writes ``data/read-base``. The add base reads by position only, and no method of specialising it learnt the
``lookup`` vertical (3%, full fine-tuning included); the read base has formed content-based reading in
pre-training, so the vertical comparison measures ``lookup`` on it (``scripts/vertical_compare.py run --plan
lookup``). Its old task is still addition, measured the same way. What it took: 4000 drills over 2400 steps
did not generalise (held-out record finding 2%); 12000 over 4800 steps generalise (54%, copying 100%, and
addition kept at 99.8%).

Deterministic on a CPU for a given torch build: seed 0, the settings below.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from workbench.io.hf import save_hf
from workbench.rl.base import base_documents, base_train_config, pretrain_base, rl_model_config
from workbench.rl.pipeline import get_scale
from workbench.tasks import get_task

READ_DOCS = 12000  # reading drills mixed in by --read (three times the addition documents)
READ_STEPS = 4800  # --read's default: twice the add base's steps, so addition keeps its share of them

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--read", action="store_true", help=f"mix {READ_DOCS} reading drills in (data/read-base)")
    p.add_argument("--out", help="output folder (default: data/add-base, or data/read-base with --read)")
    p.add_argument("--steps", type=int, help=f"pre-training steps (default: 2400, or {READ_STEPS} with --read)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = p.parse_args()
    if args.steps is None:
        args.steps = READ_STEPS if args.read else 2400
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    out = Path(args.out) if args.out else ROOT / "data" / ("read-base" if args.read else "add-base")
    if args.out:  # a folder of the user's: refused unless empty or a model folder (checked before training)
        from workbench.io.files import MODEL_FOLDER_FILES, check_output_folder

        try:
            check_output_folder(out, overwrite=True, allowed=MODEL_FOLDER_FILES)
        except (OSError, ValueError) as e:
            p.error(f"--out: {e}")
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    scale = replace(get_scale("laptop"), base_steps=args.steps, think_fraction=0.5)
    extra = base_documents(get_task("recall"), READ_DOCS, seed=args.seed, think_fraction=0.5) if args.read else []
    tc = base_train_config(scale.base_steps, seed=args.seed)
    model = pretrain_base(get_task("add"), rl_model_config(scale.preset), tc, think_fraction=scale.think_fraction,
                          extra=extra, progress=True).model  # fmt: skip
    save_hf(model, out, overwrite=True)  # data/add-base and data/read-base are ours to regenerate
    print(f"wrote {out}: {args.steps} steps in {time.perf_counter() - t:.0f} s, {model.num_parameters():,} params")


if __name__ == "__main__":
    main()
