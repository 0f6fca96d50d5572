"""Published DeepSeek-style tokenizers: a byte-level BPE with DeepSeek's pre-tokenizer and special tokens,
generated here (nothing is downloaded), read through ``tokenizers``, checked against transformers' reading of
the same folder, and carried with a checkpoint (its tokenizer_config.json, chat template included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from workbench import Model, ModelConfig
from workbench.data import generate_corpus
from workbench.io.hf import load_hf, save_hf
from workbench.io.tokenizer import load_tokenizer_files, tokenizer_of

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIALS = [BOS, EOS, "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
# DeepSeek-V3's pre-tokenizer: digits in runs of at most three, CJK runs, then words and punctuation
SPLITS = [
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
]
TEXTS = ["Add 4821 and 379: the answer is 5200.", "深度求索 では、モデルを学ぶ。", "def f(x):\n    return x ** 2\n",
         "Émile a mangé 12345 crêpes 🥞 hier!"]  # fmt: skip


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory) -> Path:
    """A tokenizer.json and tokenizer_config.json laid out as DeepSeek publishes them."""
    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    inner.train_from_iterator([d.text for d in generate_corpus(200, seed=5)] + TEXTS * 20, trainer=trainer)
    inner.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, inner.token_to_id(BOS))]
    )
    folder = tmp_path_factory.mktemp("deepseek-tokenizer")
    inner.save(str(folder / "tokenizer.json"))

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}  # fmt: skip

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(BOS),
        "eos_token": added(EOS),
        "pad_token": added(EOS),
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 131072,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
        "use_default_system_prompt": False,
        "chat_template": "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}<｜Assistant｜>"
        "{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


def test_published_tokenizer_reads_with_its_own_special_tokens(deepseek_folder):
    tok = load_tokenizer_files(deepseek_folder)
    assert tok is not None and not tok.is_workbench
    assert tok.id_to_token(tok.bos_id) == BOS and tok.id_to_token(tok.eos_id) == EOS
    assert tok.pad_id == tok.eos_id  # DeepSeek pads with the end-of-sentence token
    assert tok.token_id("<think>") != tok.token_id("</think>")
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.bos_id not in ids  # encode adds no special tokens; callers put bos where they want it
    pieces = [p for p, _ in tok.inner.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == ["123", "45"]  # digits in runs of at most three: no token spans the boundary


def test_published_tokenizer_agrees_with_transformers(deepseek_folder):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(deepseek_folder))
    ours = load_tokenizer_files(deepseek_folder)
    assert theirs.bos_token_id == ours.bos_id and theirs.eos_token_id == ours.eos_id
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        assert theirs.encode(text) == [ours.bos_id, *ours.encode(text)]  # its template adds bos; ours leaves it out


def test_a_checkpoint_carries_the_published_tokenizer(deepseek_folder, tmp_path):
    tok = load_tokenizer_files(deepseek_folder)
    config = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size + 4)
    model = Model(config)
    model.tokenizer = tok
    save_hf(model, tmp_path / "m")
    written = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text(encoding="utf-8"))
    original = json.loads((deepseek_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert written == original  # the chat template and the special tokens as published
    loaded = load_hf(tmp_path / "m")
    assert loaded.tokenizer.bos_id == tok.bos_id and loaded.tokenizer.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert tokenizer_of(loaded) is loaded.tokenizer
    ids = torch.tensor([[tok.bos_id, *tok.encode(TEXTS[0])]])
    assert loaded(ids).logits.shape == (1, ids.shape[1], config.vocab_size)


def test_a_tokenizer_config_naming_a_token_that_does_not_exist_is_refused(deepseek_folder, tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((deepseek_folder / "tokenizer.json").read_bytes())
    config = json.loads((deepseek_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["bos_token"] = "<｜no such token｜>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="no token '<｜no such token｜>'"):
        load_tokenizer_files(folder)
    config["bos_token"] = 7
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="bos_token must be a string"):
        load_tokenizer_files(folder)
