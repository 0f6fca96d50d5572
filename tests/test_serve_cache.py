"""The prefix cache (LRU by bytes, prefix matching, safetensors persistence), the engine alone, the serve command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.cli import main
from workbench.io.files import CheckpointError
from workbench.model.generate import generate
from workbench.model.mla import KVCache
from workbench.serve.cache import PrefixCache, model_fingerprint
from workbench.serve.chat import ChatError, render_chat
from workbench.serve.engine import Engine, EngineConfig, QueueFull, Request

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Model(ModelConfig.from_preset("tiny")).eval()


def _entries(model, tokens: list[int]):
    cache = KVCache()
    with torch.no_grad():
        model(torch.tensor([tokens]), cache=cache, attn_mode="absorb")
    return cache.row(0)


def test_lookup_takes_the_longest_prefix_and_its_kv_is_the_prefix_of_the_kv(model):
    pc = PrefixCache(1 << 20)
    a, b = list(range(1, 21)), [*range(1, 11), 99, 98]
    pc.store(a, _entries(model, a))
    n, got = pc.lookup(b)
    assert n == 10
    alone = _entries(model, a[:10])
    assert all(torch.allclose(got[i][k], alone[i][k], atol=1e-6) for i in alone for k in alone[i])
    assert pc.lookup(a, limit=len(a) - 1)[0] == 19  # the last token is always prefilled
    assert pc.lookup([7, 7, 7])[0] == 0
    m = pc.metrics()
    assert m["lookups"] == 3 and m["hits"] == 2 and m["hit_tokens"] == 29 and m["miss_tokens"] == 2 + 1 + 3
    pc.store(a[:5], _entries(model, a[:5]))  # a prefix of a kept entry adds nothing
    assert len(pc) == 1
    longer = [*a, 5, 6]
    pc.store(longer, _entries(model, longer))  # an entry that extends a kept one replaces it
    assert len(pc) == 1 and pc.tokens_held == 22


def test_the_byte_bound_evicts_the_least_recently_used(model):
    one = _entries(model, list(range(1, 11)))
    size = sum(t.numel() * t.element_size() for d in one.values() for t in d.values())
    pc = PrefixCache(3 * size)
    rows = [[k, *range(1, 10)] for k in (11, 12, 13)]
    for r in rows:
        pc.store(r, _entries(model, r))
    pc.lookup(rows[0])  # row 0 is now the most recently used
    pc.store([14, *range(1, 10)], _entries(model, [14, *range(1, 10)]))
    assert pc.bytes_held <= 3 * size and pc.stats.evictions == 1
    assert pc.lookup(rows[1])[0] == 0 and pc.lookup(rows[0])[0] == 10  # row 1 was the least recent
    assert not PrefixCache(size - 1).store(rows[0], one)  # larger than the whole bound: not kept
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(-1)


def test_the_cache_survives_a_restart_and_refuses_another_models_file(model, tmp_path):
    fp = model_fingerprint(model)
    pc = PrefixCache(1 << 20, fp)
    for r in ([1, 2, 3, 4], [9, 8, 7]):
        pc.store(r, _entries(model, r))
    path = tmp_path / "prefix.safetensors"
    assert pc.save(path) == 2
    again = PrefixCache(1 << 20, fp)
    assert again.load(path) == 2 and again.lookup([9, 8, 7, 6])[0] == 3
    other = Model(ModelConfig.from_preset("tiny", num_hidden_layers=2))
    with pytest.raises(CheckpointError, match="another model"):
        PrefixCache(1 << 20, model_fingerprint(other)).load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable"):
        PrefixCache(1 << 20, fp).load(tmp_path / "junk.safetensors")


def test_the_engine_equals_generate_with_and_without_a_prefix_hit(model):
    engine = Engine(model, EngineConfig(max_batch=4)).start()
    try:
        g = torch.Generator().manual_seed(5)
        base = torch.randint(2, 2048, (24,), generator=g).tolist()
        prompts = [base, [*base[:20], 3, 4], base[:7], torch.randint(2, 2048, (9,), generator=g).tolist()]
        for p in prompts:
            r = engine.generate(Request(p, 12), timeout=60)
            assert r.tokens == generate(model, p, 12)[0, len(p) :].tolist() and r.finish_reason == "length"
        assert engine.prefix.stats.hits >= 2
        with pytest.raises(ValueError, match="max_tokens"):
            engine.submit(Request([1, 2], model.config.max_position_embeddings))
        with pytest.raises(ValueError, match="temperature"):
            engine.submit(Request([1, 2], 3, temperature=float("nan")))
    finally:
        engine.stop()
    idle = Engine(model, EngineConfig(max_waiting=1))  # not started: requests only queue
    idle.submit(Request([1, 2], 3))
    with pytest.raises(QueueFull):
        idle.submit(Request([1, 2], 3))


def test_the_chat_template_is_the_task_prompt_turn_by_turn():
    assert render_chat([{"role": "user", "content": "What is 2 + 2?"}]) == "User: What is 2 + 2?\nAssistant:"
    text = render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
        ]
    )
    assert text == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"
    with pytest.raises(ChatError, match="last message"):
        render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ChatError, match="system message must come before"):
        render_chat(
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]
        )


def test_the_serve_command_checks_its_arguments_before_opening_a_port(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--api-key" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    assert main(["serve", "--prompts", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "none")]) == 2
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
