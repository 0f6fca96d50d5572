"""Byte-level BPE tokenizer: text to integer ids and back, exactly.

Byte-level BPE in brief
-----------------------
A model sees integers, not text. Byte-level Byte-Pair Encoding (BPE), used by GPT-2 and, with a
vocabulary of 128K, by DeepSeek-V3, gets there in two steps:

1. **Bytes.** Text is encoded as UTF-8, so every string is a sequence of the 256 possible byte values.
   These 256 bytes are the starting vocabulary. Any text at all (any language, emoji, binary junk) can be
   written with them: there is no "unknown token".
2. **Merges.** Training counts which pair of adjacent tokens is most frequent in a corpus, adds that
   pair as one new token, and repeats until the vocabulary reaches its target size. Common pieces such as
   ``" the"``, ``"    return"`` or ``"Answer:"`` end up as single tokens, so a typical text needs far
   fewer ids than it has bytes. Encoding replays the learned merges, in order, on new text.

Before merging, a regular expression (GPT-2's) splits text into words, numbers and punctuation runs, so
merges never glue the end of one word onto the next. The ``ByteLevel`` decoder maps the byte tokens back
to bytes and decodes them as UTF-8, so ``decode(encode(text)) == text`` for every string, with no spaces
added or removed.

Special tokens
--------------
``<|bos|>``/``<|eos|>`` mark where a document begins and ends, ``<|pad|>`` fills unused positions, and
``<think>``, ``</think>``, ``<answer>``, ``</answer>`` delimit reasoning and answers in the R1-style
lessons. Each is one id (ids 0 to 6 in a tokenizer trained here), and none is ever split by BPE.

The shipped tokenizer (``data/tokenizer.json``) has 2048 ids and was trained on
``generate_corpus(4000, seed=1234)``; ``scripts/make_tokenizer.py`` rebuilds it byte for byte.

A checkpoint carries its tokenizer
----------------------------------
Token ids mean nothing without the tokenizer that made them, so a model folder holds its tokenizer next
to the weights: ``tokenizer.json`` and ``tokenizer_config.json`` (the special tokens, in the form
transformers' ``PreTrainedTokenizerFast`` reads). ``save_hf`` writes them and ``load_hf`` reads them
into ``model.tokenizer``; training sets ``model.tokenizer`` to the tokenizer of its data.
``tokenizer_of(model)`` is the one rule every caller uses: the tokenizer passed in, else the model's
own, else (only for a model that came without one, e.g. built from a config) the shipped tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from workbench.atomic import atomic_write_bytes, atomic_write_json
from workbench.util import SHIPPED_DATA

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
THINK = "<think>"
THINK_END = "</think>"
ANSWER = "<answer>"
ANSWER_END = "</answer>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, THINK, THINK_END, ANSWER, ANSWER_END)

# the settings of the shipped tokenizer (scripts/make_tokenizer.py uses these)
SHIPPED_VOCAB_SIZE = 2048
SHIPPED_N_DOCS = 4000
SHIPPED_SEED = 1234
DEFAULT_TOKENIZER_PATH = SHIPPED_DATA / "tokenizer.json"
REGENERATE_HINT = "Regenerate it with: python scripts/make_tokenizer.py"


class Tokenizer:
    """A thin wrapper around a ``tokenizers.Tokenizer`` with our special tokens.

    ``encode`` never adds special tokens by itself; callers (for example ``TokenDataset``) put
    ``bos_id``/``eos_id`` where they want them.
    """

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if inner.token_to_id(t) is None]
        if missing:
            raise ValueError(f"not a workbench tokenizer: special token(s) {missing} are missing. {REGENERATE_HINT}")
        self.inner = inner

    # ---- encoding and decoding ------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (runs in parallel in Rust: use this for corpora)."""
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets we never use
        encode = getattr(self.inner, "encode_batch_fast", self.inner.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of `ids`. Accepts a list or a 1-D tensor. `skip_special` drops bos/eos/pad."""
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array
            ids = ids.tolist()
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if skip_special:
            structural = {self.bos_id, self.eos_id, self.pad_id}
            ids = [i for i in ids if i not in structural]
        return self.inner.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        """The id of one token string, such as ``"<think>"``."""
        i = self.inner.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not a single token of this tokenizer")
        return i

    def id_to_token(self, i: int) -> str:
        """The token string of an id (byte-level form: a leading space shows as 'Ġ')."""
        token = self.inner.id_to_token(i)
        if token is None:
            raise KeyError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return token

    # ---- properties -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    # ---- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as JSON, atomically (a temporary file in the same folder, then a rename)."""
        atomic_write_bytes(Path(path), self.inner.to_str(pretty=True).encode("utf-8") + b"\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer saved by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(path)!r}")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"{str(path)!r} is not a valid tokenizer file ({err}). {REGENERATE_HINT}") from err
        return cls(inner)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`. The same texts always give the same tokenizer.

    `vocab_size` counts everything: the 7 special tokens, the 256 byte tokens and the learned merges.
    If the texts are too small to support that many merges (every merge must occur at least
    `min_frequency` times), the vocabulary comes out smaller.
    """
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be at least {floor} (7 special tokens + 256 bytes), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(inner)


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def save_tokenizer_files(tokenizer: Tokenizer, folder: str | Path, model_max_length: int | None = None) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens) into a model folder."""
    folder = Path(folder)
    tokenizer.save(folder / TOKENIZER_FILE)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [THINK, THINK_END, ANSWER, ANSWER_END],
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    atomic_write_json(folder / TOKENIZER_CONFIG_FILE, config)


def load_tokenizer_files(folder: str | Path) -> Tokenizer | None:
    """The tokenizer a model folder carries (``tokenizer.json``), or None when it has none."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.exists():
        return None
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a regular file; a model folder's tokenizer.json must be a file")
    return Tokenizer.load(path)


def tokenizer_of(model, tokenizer: Tokenizer | None = None) -> Tokenizer:
    """The tokenizer to use with ``model``: ``tokenizer`` if given, else the one the model carries
    (``model.tokenizer``, set by ``load_hf`` and by training), else the shipped one. Refuses a tokenizer
    with more ids than the model's vocabulary."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        tok = load_tokenizer()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and tok.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is {vocab}; use the tokenizer the "
            "model was trained with (a model folder carries it as tokenizer.json)"
        )
    return tok


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizer; by default the shipped one, ``data/tokenizer.json`` at the repository root."""
    path = DEFAULT_TOKENIZER_PATH if path is None else Path(path)
    if not path.is_file():
        hint = REGENERATE_HINT if path == DEFAULT_TOKENIZER_PATH else "Check the path."
        raise FileNotFoundError(f"no tokenizer file at {str(path)!r}. {hint}")
    return Tokenizer.load(path)
