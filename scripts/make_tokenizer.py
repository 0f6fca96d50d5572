"""Regenerate the shipped tokenizer, data/tokenizer.json.

It is a byte-level BPE tokenizer trained on the synthetic corpus of workbench.data. Training is
deterministic, so running this script again with the same settings gives a byte-identical file:

    python scripts/make_tokenizer.py
    python scripts/make_tokenizer.py --vocab-size 4096 --out /tmp/tokenizer-4k.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout, without installing
    sys.path.insert(0, str(REPO_ROOT))

from workbench.data import generate_corpus  # noqa: E402
from workbench.io.tokenizer import (  # noqa: E402
    DEFAULT_TOKENIZER_PATH,
    SHIPPED_N_DOCS,
    SHIPPED_SEED,
    SHIPPED_VOCAB_SIZE,
    train_tokenizer,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train the byte-level BPE tokenizer on the synthetic corpus and save it as JSON. "
        "The defaults reproduce the shipped data/tokenizer.json exactly."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_TOKENIZER_PATH,
        help="where to write the tokenizer (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=SHIPPED_VOCAB_SIZE,
        help="total vocabulary size, special and byte tokens included (default: %(default)s)",
    )
    parser.add_argument(
        "--n-docs",
        type=int,
        default=SHIPPED_N_DOCS,
        help="number of synthetic documents to train on (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=SHIPPED_SEED, help="seed of the synthetic corpus (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    docs = generate_corpus(args.n_docs, seed=args.seed)
    tokenizer = train_tokenizer((d.text for d in docs), vocab_size=args.vocab_size)
    tokenizer.save(args.out)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch([d.text for d in docs]))
    n_chars = sum(len(d.text) for d in docs)
    print(
        f"wrote {args.out}: vocab_size={tokenizer.vocab_size}, trained on {args.n_docs} documents "
        f"(seed {args.seed}), {n_chars / n_tokens:.2f} characters per token, "
        f"{time.perf_counter() - start:.1f} s"
    )
    if tokenizer.vocab_size != args.vocab_size:
        print(
            f"warning: asked for {args.vocab_size} tokens but the corpus only supported "
            f"{tokenizer.vocab_size}; use more documents",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
