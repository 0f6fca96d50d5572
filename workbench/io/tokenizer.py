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

Published tokenizers
--------------------
DeepSeek's checkpoints ship their own byte-level BPE (128K merges for V3/R1, 100K for V2) as a
``tokenizer.json`` that ``tokenizers`` reads directly: a sequence of regex splits (digits in runs of at
most three, CJK runs, words and punctuation) before the byte-level step, and special tokens such as
``<｜begin▁of▁sentence｜>`` and ``<｜end▁of▁sentence｜>``, which ``tokenizer_config.json`` names as the
``bos_token`` / ``eos_token`` (as a string or an ``{"content": ...}`` object). ``load_tokenizer_files`` reads
both, so ``bos_id`` and ``eos_id`` are that tokenizer's own; ``pad_id`` falls back to ``eos_id`` where
none is named, and tokens such as ``<think>`` exist only if the tokenizer has them (``token_id`` says so).
The tokenizer config is kept as it was (chat template included) and written back when the model is saved.

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

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """inner: the ``tokenizers`` object. bos / eos / pad: the special tokens' strings (default: ours, and
        then every one of ``SPECIAL_TOKENS`` must exist); a published tokenizer names its own (pad defaults to
        eos). config: its ``tokenizer_config.json``, kept to be written back with the model."""
        if bos is None and eos is None:
            missing = [t for t in SPECIAL_TOKENS if inner.token_to_id(t) is None]
            if missing:
                raise ValueError(
                    f"not a workbench tokenizer: special token(s) {missing} are missing. {REGENERATE_HINT}"
                )
            bos, eos, pad = BOS, EOS, PAD
        if bos is None or eos is None:
            raise ValueError("name both the bos and the eos token (or neither, for a workbench tokenizer)")
        pad = eos if pad is None else pad
        missing = [t for t in dict.fromkeys((bos, eos, pad)) if inner.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the tokenizer has no token {missing[0]!r}, which its configuration names as special")
        self.inner = inner
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.config = dict(config) if config else None

    # ---- encoding and decoding ------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a string, got {type(text).__name__}; decode bytes first (bytes.decode())")
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
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode needs a sequence of token ids, got {type(ids).__name__}")
        ids = list(ids)
        odd = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int)), None)
        if odd is not None:
            raise TypeError(f"token ids must be integers, got {odd!r} ({type(odd).__name__})")
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
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.pad_token)

    @property
    def is_workbench(self) -> bool:
        """Whether this is a tokenizer trained here (our special tokens), not a published one."""
        return self.bos_token == BOS and self.config is None

    # ---- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as JSON, atomically (a temporary file in the same folder, then a rename)."""
        atomic_write_bytes(Path(path), self.inner.to_str(pretty=True).encode("utf-8") + b"\n")

    @classmethod
    def load(cls, path: str | Path, **specials: Any) -> Tokenizer:
        """Read a ``tokenizer.json`` (saved by `save`, or published). specials: see ``__init__``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(path)!r}")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"{str(path)!r} is not a valid tokenizer file ({err}). {REGENERATE_HINT}") from err
        return cls(inner, **specials)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r} ({self.bos_id}), eos_id={self.eos_id})"


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
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens) into a model folder; a published
    tokenizer's own configuration (chat template included) is written back as it was read."""
    folder = Path(folder)
    tokenizer.save(folder / TOKENIZER_FILE)
    if tokenizer.config is not None:
        config = dict(tokenizer.config)
        if model_max_length is not None:
            config.setdefault("model_max_length", model_max_length)
        atomic_write_json(folder / TOKENIZER_CONFIG_FILE, config)
        return
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
    """The tokenizer a model folder carries (``tokenizer.json``, with the special tokens that
    ``tokenizer_config.json`` names), or None when it has none."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.exists():
        return None
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a regular file; a model folder's tokenizer.json must be a file")
    config_path = Path(folder) / TOKENIZER_CONFIG_FILE
    config: dict[str, Any] | None = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(config_path)!r} is not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"{str(config_path)!r} must hold a JSON object")
    specials = (
        {key: _token_text(config, f"{key}_token", config_path) for key in ("bos", "eos", "pad")} if config else {}
    )
    if not config or specials.get("bos") in (None, BOS):
        return Tokenizer.load(path)  # ours (or one that names no special tokens: ours are then required)
    return Tokenizer.load(path, **specials, config=config)


def _token_text(config: dict[str, Any], key: str, where: Path) -> str | None:
    """A special token as tokenizer_config.json names it: a string, or an AddedToken object."""
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{str(where)!r}: {key} must be a string or an object with 'content', got {value!r}")


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
