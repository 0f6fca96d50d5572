"""Tests of workbench.data: the synthetic corpus, loading text files, and token batches."""

from __future__ import annotations

import ast
import datetime
import json
import math
import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from workbench.data import (
    DOMAIN_GENERATORS,
    DOMAINS,
    Document,
    TokenDataset,
    generate_corpus,
    load_text_files,
)
from workbench.io.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return generate_corpus(500, seed=3)


@pytest.fixture(scope="module")
def dataset(corpus, tokenizer) -> TokenDataset:
    return TokenDataset.from_documents(corpus, tokenizer, val_fraction=0.2, seed=0)


def docs_of(corpus: list[Document], domain: str) -> list[str]:
    return [d.text for d in corpus if d.domain == domain]


# ---- the corpus -----------------------------------------------------------------------------------


def test_domains_are_the_generators():
    assert len(DOMAINS) >= 4
    assert tuple(DOMAIN_GENERATORS) == DOMAINS
    assert {"arithmetic", "code", "story", "records"} <= set(DOMAINS)


def test_same_seed_same_corpus_and_different_seed_differs():
    assert generate_corpus(60, seed=5) == generate_corpus(60, seed=5)
    assert generate_corpus(60, seed=5) != generate_corpus(60, seed=6)


def test_global_random_state_is_not_used():
    random.seed(123)
    before = random.getstate()
    generate_corpus(30, seed=1)
    assert random.getstate() == before
    random.seed(999)  # changing global state must not change the corpus either
    a = generate_corpus(30, seed=1)
    random.seed(1000)
    assert generate_corpus(30, seed=1) == a


def test_balanced_and_shuffled():
    docs = generate_corpus(103, seed=0)
    counts = Counter(d.domain for d in docs)
    assert set(counts) == set(DOMAINS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == 103
    round_robin = [DOMAINS[i % len(DOMAINS)] for i in range(103)]
    assert [d.domain for d in docs] != round_robin


def test_subset_of_domains():
    docs = generate_corpus(10, seed=0, domains=("story", "code"))
    assert Counter(d.domain for d in docs) == {"story": 5, "code": 5}
    assert {d.domain for d in generate_corpus(3, domains="code")} == {"code"}


@pytest.mark.parametrize("n_docs", [0, -3])
def test_bad_n_docs(n_docs):
    with pytest.raises(ValueError, match="n_docs"):
        generate_corpus(n_docs)


def test_bad_domains():
    with pytest.raises(ValueError, match="unknown domain.*known domains: arithmetic"):
        generate_corpus(5, domains=("arithmetic", "poetry"))
    with pytest.raises(ValueError, match="at least one"):
        generate_corpus(5, domains=())
    with pytest.raises(ValueError, match="duplicates"):
        generate_corpus(5, domains=("code", "code"))


def test_documents_are_varied(corpus):
    for domain in DOMAINS:
        texts = docs_of(corpus, domain)
        assert len(set(texts)) >= 0.95 * len(texts), domain
        assert all(100 <= len(t) <= 1500 for t in texts), domain


def test_arithmetic_documents_are_correct(corpus):
    for text in docs_of(corpus, "arithmetic"):
        assert "=" in text and any(c.isdigit() for c in text)
        answers = re.findall(r"^Answer: (\d+) ([-+*]) (\d+) = (\d+)$", text, flags=re.M)
        assert 2 <= len(answers) <= 4
        for a, op, b, result in answers:
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(result) == expected
        # every worked step "x + y = s" / "x * y + c = p" is itself true arithmetic
        for expr, value in re.findall(r"(\d+(?: [-+*] \d+)+) = (\d+)", text):
            assert eval(expr) == int(value), (expr, value)


def test_code_documents_run_and_their_comments_are_true(corpus):
    for text in docs_of(corpus, "code"):
        ast.parse(text)  # valid Python
        assert "def " in text or "class " in text
        assert all(len(line) - len(line.lstrip(" ")) in (0, 4, 8, 12) for line in text.splitlines())
        printed: list[str] = []
        exec(compile(text, "<doc>", "exec"), {"print": lambda v, out=printed: out.append(repr(v))})
        assert printed == re.findall(r"  # (.+)$", text, flags=re.M)


def test_story_documents_are_prose(corpus):
    for text in docs_of(corpus, "story"):
        assert not any(c.isdigit() for c in text)
        assert not any(s in text for s in ("def ", "=", "{", "User:", "    "))
        assert text.count(".") >= 5 and text[0].isupper()


def test_records_documents_are_structured(corpus):
    for text in docs_of(corpus, "records"):
        header, *rows = text.splitlines()
        assert re.fullmatch(r"# (orders|employees|payments|weather)\.(csv|jsonl)", header)
        if header.endswith(".jsonl"):
            records = [json.loads(r) for r in rows]
        else:
            names, *values = [r.split(",") for r in rows]
            assert all(len(v) == len(names) for v in values)
            records = [dict(zip(names, v)) for v in values]
        assert 3 <= len(records) <= 6
        for record in records:
            date = record.get("date") or record["start_date"]
            datetime.date.fromisoformat(date)  # a real calendar date
            if "total" in record:
                total = int(record["quantity"]) * float(record["unit_price"])
                assert math.isclose(float(record["total"]), total, abs_tol=0.005)


def test_dialogue_documents_alternate_speakers(corpus):
    for text in docs_of(corpus, "dialogue"):
        lines = text.splitlines()
        assert len(lines) % 2 == 0 and len(lines) >= 6
        assert all(line.startswith("User: ") for line in lines[0::2])
        assert all(line.startswith("Assistant: ") for line in lines[1::2])


def test_domains_are_clearly_different(corpus):
    """A nearest-centroid classifier on character frequencies tells the domains apart almost always."""

    def unit(counts: Counter[str]) -> dict[str, float]:
        norm = math.sqrt(sum(v * v for v in counts.values()))
        return {c: v / norm for c, v in counts.items()}

    centroids = {domain: unit(Counter("".join(docs_of(corpus, domain)))) for domain in DOMAINS}

    test_docs = generate_corpus(250, seed=99)
    correct = 0
    for doc in test_docs:
        p = unit(Counter(doc.text))
        scores = {d: sum(p.get(c, 0.0) * v for c, v in cen.items()) for d, cen in centroids.items()}
        correct += max(scores, key=scores.__getitem__) == doc.domain
    assert correct / len(test_docs) >= 0.95


# ---- your own text files --------------------------------------------------------------------------


def test_load_single_file_and_crlf_and_bom(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffFirst paragraph.\r\nStill first.\r\n\r\nSecond one.\r\n".encode())
    docs = load_text_files(path)
    assert docs == [Document("user", "First paragraph.\nStill first.\n\nSecond one.")]
    assert load_text_files(str(path), domain="notes")[0].domain == "notes"


def test_load_directory_recursively_sorted(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a txt file", encoding="utf-8")
    assert [d.text for d in load_text_files(tmp_path)] == ["ay", "bee", "sea"]
    assert [d.text for d in load_text_files([tmp_path / "b.txt", tmp_path / "sub"])] == ["bee", "sea"]


def test_long_files_are_chunked_at_paragraphs(tmp_path: Path):
    rng = random.Random(0)
    paragraphs = [
        " ".join(rng.choice(("alpha", "beta", "gamma")) for _ in range(rng.randint(5, 40))) for _ in range(60)
    ]
    (tmp_path / "long.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    docs = load_text_files(tmp_path / "long.txt", chunk_chars=500)
    assert len(docs) > 5
    assert all(len(d.text) <= 500 for d in docs)
    assert all(len(d.text) >= 250 for d in docs[:-1])  # chunks are filled near the limit
    # no paragraph was cut: the chunks hold exactly the original paragraphs, in order
    assert [p for d in docs for p in d.text.split("\n\n")] == paragraphs


def test_a_paragraph_longer_than_a_chunk_is_split(tmp_path: Path):
    words = [f"word{i}" for i in range(300)]
    (tmp_path / "one.txt").write_text(" ".join(words), encoding="utf-8")
    docs = load_text_files(tmp_path / "one.txt", chunk_chars=200)
    assert all(len(d.text) <= 200 for d in docs)
    assert " ".join(d.text for d in docs).split() == words


def test_unicode_text_is_kept(tmp_path: Path):
    (tmp_path / "u.txt").write_text("Grüße aus Köln 🎉\n\n日本語のテキスト", encoding="utf-8")
    assert load_text_files(tmp_path)[0].text == "Grüße aus Köln 🎉\n\n日本語のテキスト"


def test_missing_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text_files(tmp_path / "nope.txt")


def test_not_utf8(tmp_path: Path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*not valid UTF-8.*Re-save it as UTF-8"):
        load_text_files(tmp_path)


def test_no_text(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text found"):
        load_text_files(tmp_path / "empty.txt")
    (tmp_path / "empty.txt").unlink()
    with pytest.raises(ValueError, match="no .txt files"):
        load_text_files(tmp_path)
    (tmp_path / "x.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="chunk_chars"):
        load_text_files(tmp_path, chunk_chars=0)


# ---- token datasets -------------------------------------------------------------------------------


def test_streams_are_bos_doc_eos(dataset: TokenDataset, tokenizer, corpus):
    assert dataset.domains == sorted(DOMAINS)
    total_docs = 0
    for split in ("train", "val"):
        tokens, domains = dataset.tokens[split], dataset.token_domains[split]
        assert tokens.dtype == torch.long and domains.dtype == torch.long
        assert tokens.shape == domains.shape == (dataset.n_tokens(split),)
        assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
        assert (tokens == tokenizer.bos_id).sum() == (tokens == tokenizer.eos_id).sum() == dataset.n_docs[split]
        total_docs += dataset.n_docs[split]
    assert total_docs == len(corpus)
    # train + val documents are exactly the corpus (order within a split follows the corpus)
    decoded = tokenizer.decode(dataset.tokens["train"]) + tokenizer.decode(dataset.tokens["val"])
    texts = [t for t in re.split(r"<\|bos\|>|<\|eos\|>", decoded) if t]
    assert sorted(texts) == sorted(d.text for d in corpus)


def test_split_is_stratified_and_deterministic(corpus, tokenizer):
    a = TokenDataset.from_documents(corpus, tokenizer, val_fraction=0.2, seed=0)
    b = TokenDataset.from_documents(corpus, tokenizer, val_fraction=0.2, seed=0)
    c = TokenDataset.from_documents(corpus, tokenizer, val_fraction=0.2, seed=1)
    assert torch.equal(a.tokens["val"], b.tokens["val"])
    assert not torch.equal(a.tokens["val"], c.tokens["val"])
    assert a.n_docs["val"] == 100  # 20% of each domain's 100 documents
    assert set(a.token_domains["val"].tolist()) == set(range(len(DOMAINS)))


def test_get_batch_shapes_dtypes_and_ranges(dataset: TokenDataset, tokenizer):
    g = torch.Generator().manual_seed(0)
    input_ids, domain_ids = dataset.get_batch("train", batch_size=8, seq_len=32, generator=g)
    assert input_ids.shape == (8, 32) and input_ids.dtype == torch.long
    assert domain_ids.shape == (8,) and domain_ids.dtype == torch.long
    assert input_ids.min() >= 0 and input_ids.max() < tokenizer.vocab_size
    assert domain_ids.min() >= 0 and domain_ids.max() < len(dataset.domains)
    # each window really is a slice of the stream, labelled with the domain of its first token
    stream = dataset.tokens["train"]
    windows = stream.unfold(0, 32, 1)  # (N - T + 1, T)
    for row, dom in zip(input_ids, domain_ids):
        starts = (windows == row).all(dim=1).nonzero().flatten()
        assert any(dataset.token_domains["train"][s] == dom for s in starts)


def test_get_batch_is_reproducible_from_the_generator(dataset: TokenDataset):
    def batches(g: torch.Generator) -> list[torch.Tensor]:
        return [dataset.get_batch("train", 4, 16, g)[0] for _ in range(3)]

    first = batches(torch.Generator().manual_seed(7))
    again = batches(torch.Generator().manual_seed(7))
    other = batches(torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))

    g = torch.Generator().manual_seed(7)
    dataset.get_batch("train", 4, 16, g)
    state = g.get_state()  # resuming from a saved generator state replays the same batches
    next_batch = dataset.get_batch("train", 4, 16, g)[0]
    g.set_state(state)
    assert torch.equal(dataset.get_batch("train", 4, 16, g)[0], next_batch)


def test_eval_batches_are_deterministic_and_consecutive(dataset: TokenDataset):
    batches = dataset.eval_batches(batch_size=4, seq_len=16, n_batches=3)
    assert len(batches) == 3
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches, dataset.eval_batches(4, 16, 3)))
    flat = torch.cat([ids.flatten() for ids, _ in batches])
    assert torch.equal(flat, dataset.tokens["val"][: 3 * 4 * 16])
    assert torch.equal(batches[0][1], dataset.token_domains["val"][0 : 4 * 16 : 16])
    every = dataset.eval_batches(4, 16)
    assert len(every) == dataset.n_tokens("val") // (4 * 16)
    assert len(dataset.eval_batches(4, 16, n_batches=10**6)) == len(every)


def test_domain_batch_holds_only_that_domain(dataset: TokenDataset, tokenizer):
    g = torch.Generator().manual_seed(0)
    for domain in DOMAINS:
        input_ids, domain_ids = dataset.domain_batch(domain, "val", 6, 24, g)
        assert input_ids.shape == (6, 24) and domain_ids.shape == (6,)
        assert (domain_ids == dataset.domains.index(domain)).all()
        only_domain = dataset.tokens["val"][dataset.token_domains["val"] == dataset.domains.index(domain)]
        windows = only_domain.unfold(0, 24, 1)
        assert all((windows == row).all(dim=1).any() for row in input_ids)
    # stories contain no digits at all, so no story window may contain one
    story_ids, _ = dataset.domain_batch("story", "train", 16, 64, g)
    assert not any(any(c.isdigit() for c in tokenizer.decode(row)) for row in story_ids)
    code_ids, _ = dataset.domain_batch("code", "train", 16, 64, g)
    assert sum("    " in tokenizer.decode(row) for row in code_ids) >= 12


def test_batch_errors(dataset: TokenDataset, corpus, tokenizer):
    g = torch.Generator().manual_seed(0)
    n_val = dataset.n_tokens("val")
    with pytest.raises(ValueError, match=rf"val split has {n_val} tokens.*seq_len={n_val}.*smaller seq_len"):
        dataset.get_batch("val", 2, n_val, g)
    with pytest.raises(ValueError, match="split must be one of"):
        dataset.get_batch("test", 2, 8, g)
    with pytest.raises(ValueError, match="batch_size"):
        dataset.get_batch("train", 0, 8, g)
    with pytest.raises(ValueError, match="'poetry' is not in this dataset"):
        dataset.domain_batch("poetry", "train", 2, 8, g)
    with pytest.raises(ValueError, match="fewer than one batch"):
        dataset.eval_batches(batch_size=n_val, seq_len=2)
    with pytest.raises(ValueError, match="val_fraction"):
        TokenDataset.from_documents(corpus, tokenizer, val_fraction=1.0)
    with pytest.raises(ValueError, match="no documents"):
        TokenDataset.from_documents([], tokenizer)
    no_val = TokenDataset.from_documents(corpus[:20], tokenizer, val_fraction=0.0)
    assert no_val.n_tokens("val") == 0
    with pytest.raises(ValueError, match="val split has 0 tokens"):
        no_val.get_batch("val", 2, 8, g)


def test_user_documents_make_a_dataset(tmp_path: Path, tokenizer):
    (tmp_path / "mine.txt").write_text("\n\n".join(f"Paragraph number {i}." for i in range(200)), encoding="utf-8")
    docs = load_text_files(tmp_path, chunk_chars=300)
    ds = TokenDataset.from_documents(docs, tokenizer)
    assert ds.domains == ["user"]
    input_ids, domain_ids = ds.get_batch("train", 2, 16, torch.Generator().manual_seed(0))
    assert input_ids.shape == (2, 16) and (domain_ids == 0).all()


def test_repr(dataset: TokenDataset):
    text = repr(dataset)
    assert f"train={dataset.n_tokens('train'):,} tokens" in text and "story" in text


def test_4000_documents_are_fast(tokenizer):
    start = time.perf_counter()
    docs = generate_corpus(4000, seed=1234)
    ds = TokenDataset.from_documents(docs, tokenizer)
    elapsed = time.perf_counter() - start
    assert ds.n_docs["train"] + ds.n_docs["val"] == 4000
    assert elapsed < 10.0, f"generating and tokenizing 4000 documents took {elapsed:.1f} s"
