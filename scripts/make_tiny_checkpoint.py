"""Regenerate data/tiny-model: the `tiny` preset trained on the generated corpus (a few MB, Hugging Face layout,
with its tokenizer).

    python scripts/make_tiny_checkpoint.py            # same as `make tiny-checkpoint`

Deterministic on a CPU for a given torch build: seed 0, corpus seed 0, the settings below.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from workbench import ModelConfig
from workbench.io.hf import save_hf
from workbench.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "data" / "tiny-model"), help="output folder (default: data/tiny-model)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed (default: 0)")
    args = p.parse_args()
    tc = TrainConfig(steps=args.steps, seed=args.seed, device="cpu", eval_every=100)
    with tempfile.TemporaryDirectory() as run:
        result = train(ModelConfig.from_preset("tiny"), tc, run)
    last = result.metrics[-1]
    save_hf(result.model, args.out, overwrite=True)  # data/tiny-model is ours to regenerate
    print(
        f"wrote {args.out}: step {last['step']}, train loss {last['main_loss']:.3f}, "
        f"validation loss {last['eval_loss']:.3f}"
    )


if __name__ == "__main__":
    main()
