"""Regenerate data/add-base: the base that lesson 9 and the vertical comparison specialise.

    python scripts/make_vertical_base.py            # about 9 minutes on one CPU thread

It is the R1 lessons' ``add`` base (``workbench.rl.pipeline.make_base``: the ``tiny`` preset without MTP,
4000 solved addition problems, half of them with worked reasoning, batches of 32 x 64 tokens at lr 3e-3)
trained for 2400 steps instead of the laptop scale's 800. At 800 steps it adds about half of held-out
problems greedily, too noisy to measure a 1-point forgetting budget; at 2400 steps it adds almost all of
them, directly. The checkpoint is about 3 MB (float32, Hugging Face layout, with its tokenizer), so CI and
the lesson load it instead of pre-training it again.

Deterministic on a CPU for a given torch build: seed 0, the settings below.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from workbench.io.hf import save_hf
from workbench.rl.pipeline import get_scale, make_base
from workbench.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "data" / "add-base"), help="output folder (default: data/add-base)")
    p.add_argument("--steps", type=int, default=2400, help="pre-training steps (default: 2400)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    scale = replace(get_scale("laptop"), base_steps=args.steps, think_fraction=0.5)
    model = make_base(get_task("add"), scale, seed=args.seed, progress=False)
    save_hf(model, args.out, overwrite=True)  # data/add-base is ours to regenerate
    print(f"wrote {args.out}: {args.steps} steps in {time.perf_counter() - t:.0f} s, {model.num_parameters():,} params")


if __name__ == "__main__":
    main()
