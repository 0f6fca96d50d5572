"""Tests of workbench.io.tokenizer: byte-level BPE, special tokens, the shipped tokenizer, save and load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import workbench.io.tokenizer as tokenizer_module
from workbench.data import generate_corpus
from workbench.io.tokenizer import (
    DEFAULT_TOKENIZER_PATH,
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def small_texts() -> list[str]:
    return [d.text for d in generate_corpus(300, seed=0)]


# ---- the shipped tokenizer ------------------------------------------------------------------------


def test_shipped_tokenizer_loads_with_2048_ids(shipped: Tokenizer):
    assert DEFAULT_TOKENIZER_PATH == REPO_ROOT / "data" / "tokenizer.json"
    assert shipped.vocab_size == len(shipped) == 2048
    assert (shipped.bos_id, shipped.eos_id, shipped.pad_id) == (0, 1, 2)
    assert "2048" in repr(shipped)


def test_special_tokens_are_single_ids(shipped: Tokenizer):
    ids = [shipped.token_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    for token, i in zip(SPECIAL_TOKENS, ids):
        assert shipped.encode(token) == [i]
        assert shipped.decode([i]) == token
    text = "<think>3 + 4 = 7</think><answer>7</answer>"
    ids = shipped.encode(text)
    assert ids[0] == shipped.token_id("<think>") and ids[-1] == shipped.token_id("</answer>")
    assert shipped.decode(ids) == text


def test_encode_adds_no_special_tokens(shipped: Tokenizer):
    ids = shipped.encode("hello world")
    assert shipped.bos_id not in ids and shipped.eos_id not in ids
    assert shipped.encode("") == []


def test_shipped_tokenizer_compresses_the_corpus(shipped: Tokenizer):
    texts = [d.text for d in generate_corpus(200, seed=5)]
    n_tokens = sum(len(ids) for ids in shipped.encode_batch(texts))
    assert sum(len(t) for t in texts) / n_tokens > 2.5  # characters per token
    assert len(shipped.encode("    return result")) <= 4


def test_shipped_file_is_reproduced_by_the_script(tmp_path: Path):
    out = tmp_path / "tokenizer.json"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "make_tokenizer.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == DEFAULT_TOKENIZER_PATH.read_bytes(), (
        "data/tokenizer.json is out of date: run python scripts/make_tokenizer.py"
    )


# ---- round trips ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_text(shipped: Tokenizer, text: str):
    assert shipped.decode(shipped.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "Answer: 4738 + 2695 = 7433",
        "def f(x):\n    return x  # two  spaces\n\n\ttab",
        "  leading and trailing spaces  ",
        "Grüße, 日本語, emoji 🎉🧠, and a zero-width joiner 👩‍💻",
        "\x00\x01 control characters \r\n",
    ],
)
def test_round_trip_examples(shipped: Tokenizer, text: str):
    assert shipped.decode(shipped.encode(text)) == text


def test_decode_inserts_no_spaces(shipped: Tokenizer):
    text = "print(total_prices([4, 9, 2], 5))"
    ids = shipped.encode(text)
    assert "".join(shipped.decode([i]) for i in ids) == text


def test_encode_batch_matches_encode(shipped: Tokenizer, small_texts: list[str]):
    assert shipped.encode_batch(small_texts[:20]) == [shipped.encode(t) for t in small_texts[:20]]
    assert shipped.encode_batch([]) == []


def test_decode_accepts_tensors_and_can_skip_structural_tokens(shipped: Tokenizer):
    ids = [shipped.bos_id, *shipped.encode("<think>hi</think>"), shipped.eos_id, shipped.pad_id]
    assert shipped.decode(torch.tensor(ids)) == "<|bos|><think>hi</think><|eos|><|pad|>"
    assert shipped.decode(ids, skip_special=True) == "<think>hi</think>"


def test_decode_rejects_ids_outside_the_vocabulary(shipped: Tokenizer):
    with pytest.raises(ValueError, match="2048 is outside"):
        shipped.decode([5, 2048])
    with pytest.raises(ValueError, match="-1 is outside"):
        shipped.decode([-1])
    with pytest.raises(KeyError):
        shipped.token_id("<not a token>")


# ---- training -------------------------------------------------------------------------------------


def test_training_is_deterministic(small_texts: list[str]):
    a = train_tokenizer(small_texts, vocab_size=512)
    b = train_tokenizer(iter(small_texts), vocab_size=512)
    assert a.vocab_size == 512
    assert a.inner.to_str() == b.inner.to_str()
    assert a.encode(small_texts[0]) == b.encode(small_texts[0])


def test_trained_tokenizer_has_the_special_tokens(small_texts: list[str]):
    tok = train_tokenizer(small_texts, vocab_size=400)
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert tok.decode(tok.encode("anything at all: ÿ")) == "anything at all: ÿ"


def test_training_rejects_bad_settings(small_texts: list[str]):
    with pytest.raises(ValueError, match="at least 263"):
        train_tokenizer(small_texts, vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(small_texts, min_frequency=0)


# ---- files ----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, small_texts: list[str]):
    tok = train_tokenizer(small_texts, vocab_size=400)
    path = tmp_path / "nested" / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(small_texts[:10]) == tok.encode_batch(small_texts[:10])
    assert load_tokenizer(path).encode("x = 1") == tok.encode("x = 1")
    first = path.read_bytes()
    loaded.save(path)  # overwriting works and gives the same bytes
    assert path.read_bytes() == first
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temporary file left behind


def test_missing_file_says_how_to_regenerate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tokenizer_module, "DEFAULT_TOKENIZER_PATH", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json.*python scripts/make_tokenizer.py"):
        load_tokenizer()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")


def test_invalid_file(tmp_path: Path, small_texts: list[str]):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid tokenizer file"):
        Tokenizer.load(bad)
    # a valid tokenizers file without our special tokens is rejected too
    tok = train_tokenizer(small_texts, vocab_size=400)
    tok.inner.save(str(tmp_path / "plain.json"))
    text = (tmp_path / "plain.json").read_text(encoding="utf-8").replace("<think>", "<thinq>")
    (tmp_path / "plain.json").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="<think>.*missing.*make_tokenizer"):
        Tokenizer.load(tmp_path / "plain.json")
