"""The HTTP server, driven by the real ``openai`` client on a free loopback port.

Greedy outputs equal ``generate``'s alone and in a batch of concurrent requests; a prefix-cache hit gives the
same tokens as a miss and reports the cached tokens; every bad-input class gets a JSON error naming the
field; a full queue answers 429, a request past its time limit 504, a disconnected stream frees its slot;
the API key is refused and accepted.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from workbench.io.hf import load_hf  # noqa: E402
from workbench.io.tokenizer import tokenizer_of  # noqa: E402
from workbench.model.generate import generate  # noqa: E402
from workbench.rl.rollout import encode_prompt, stop_ids  # noqa: E402
from workbench.serve.engine import Engine, EngineConfig  # noqa: E402
from workbench.serve.prompts import load_prompt_set  # noqa: E402
from workbench.serve.server import Background, ServeConfig, Server, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "tiny-model"
SUBTRACTION = ROOT / "data" / "prompts" / "subtraction.yaml"
KEY = "test-key"
QUESTIONS = ["What is 4 5 + 1 2?", "What is 7 - 3?", "Sort these numbers: 5, 2, 9.", "What is 1 2 + 3 0 + 4?"]


@pytest.fixture(scope="module")
def model():
    return load_hf(TINY)


def _serve(model, engine_cfg=None, start=True, **cfg):
    engine = Engine(model, engine_cfg or EngineConfig())
    if start:
        engine.start()
    server = Server(engine, tokenizer_of(model), [load_prompt_set(SUBTRACTION)],
                    ServeConfig(model_id="tiny", api_key=KEY, **cfg))  # fmt: skip
    return engine, Background(create_app(server))


@pytest.fixture(scope="module")
def served(model):
    engine, bg = _serve(model, max_body_bytes=64 * 1024)
    yield engine, bg
    bg.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key=KEY, max_retries=0)


def _post(served, path: str, body=None, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served[1].url + path, json=body, headers=headers, timeout=60, **kw)


def _greedy(model, text: str, max_tokens: int) -> str:
    """What the server must answer: generate() alone, cut after the first stop token, decoded."""
    tok = tokenizer_of(model)
    ids = encode_prompt(tok, text)
    new = generate(model, ids, max_tokens)[0, len(ids) :].tolist()
    stops = set(stop_ids(tok))
    cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
    return tok.decode(new[:cut], skip_special=True)


def test_models_and_a_greedy_completion_equal_generate(model, client):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.context_length == model.config.max_position_embeddings
    prompt = "User: What is 4 5 + 1 2?\nAssistant:"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == _greedy(model, prompt, 24)
    assert r.usage.prompt_tokens == len(encode_prompt(tokenizer_of(model), prompt))
    assert r.usage.completion_tokens <= 24 and r.choices[0].finish_reason in ("stop", "length")


def test_chat_renders_the_task_prompt_and_streams_the_same_text(model, client):
    messages = [{"role": "user", "content": "What is 2 7 + 1 1?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    want = _greedy(model, "User: What is 2 7 + 1 1?\nAssistant:", 30)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    parts, usage = [], None
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == want and len(parts) > 1  # token by token, not one piece
    assert usage.completion_tokens == r.usage.completion_tokens


def test_concurrent_requests_decode_together_and_equal_generate_alone(model, served, client):
    engine = served[0]
    prompts = [f"User: {q}\nAssistant:" for q in QUESTIONS] * 2
    got: dict[int, str] = {}
    rows_before, steps_before = engine.counters["step_rows"], engine.counters["steps"]

    def ask(i: int) -> None:
        got[i] = (
            client.completions.create(model="tiny", prompt=prompts[i], max_tokens=40, temperature=0).choices[0].text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(prompts):
        assert got[i] == _greedy(model, p, 40), f"request {i} differs from generate()"
    rows = engine.counters["step_rows"] - rows_before
    steps = engine.counters["steps"] - steps_before
    assert rows / steps > 1.5  # several rows per decoding step: they were batched


def test_sampling_with_a_seed_repeats_and_n_gives_choices(client):
    kw = dict(model="tiny", prompt="User: Tell me a fact.\nAssistant:", max_tokens=12, temperature=1.0, seed=7)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert len({c.text for c in a.choices}) > 1  # choice i is seeded with seed + i
    assert a.usage.completion_tokens >= 3


def test_stop_strings_cut_the_text(model, client):
    prompt = "User: What is 4 5 + 1 2?\nAssistant:"
    full = _greedy(model, prompt, 30)
    stop = full.strip().split()[2]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_a_prefix_hit_gives_the_tokens_of_a_miss_and_reports_them(model, client):
    system = "You are a careful assistant who checks every column of a sum before answering, twice over."
    first = [{"role": "system", "content": system}, {"role": "user", "content": "What is 3 1 + 4 4?"}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "What is 5 2 + 1 6?"}]
    a = client.chat.completions.create(model="tiny", messages=first, max_tokens=20, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=second, max_tokens=20, temperature=0)
    c = client.chat.completions.create(model="tiny", messages=second, max_tokens=20, temperature=0)
    tok = tokenizer_of(model)
    n_system = len(encode_prompt(tok, f"System: {system}\nUser: What is"))
    assert a.usage.prompt_tokens_details.cached_tokens < n_system  # (earlier tests asked other things)
    assert b.usage.prompt_tokens_details.cached_tokens >= n_system - 1  # the shared system prompt was reused
    assert c.usage.prompt_tokens_details.cached_tokens == c.usage.prompt_tokens - 1  # all but the last token
    for r in (a, b, c):
        u = r.usage.model_dump()
        assert u["prompt_cache_hit_tokens"] == u["prompt_tokens_details"]["cached_tokens"]
        assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    text = f"System: {system}\nUser: What is 5 2 + 1 6?\nAssistant:"
    assert b.choices[0].message.content == c.choices[0].message.content == _greedy(model, text, 20)
    m = httpx.get(str(client.base_url).replace("/v1/", "/metrics"), headers={"Authorization": f"Bearer {KEY}"}).json()
    assert m["prefix_cache"]["hits"] >= 2 and m["prefix_cache"]["bytes_held"] > 0
    cfg = model.config
    per_token = 4 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # fp32 latent + rotary key
    assert m["prefix_cache"]["bytes_per_token"] == per_token


def test_prompt_sets_are_listed_and_run_with_the_verifier(model, served):
    listed = httpx.get(served[1].url + "/v1/prompts", headers={"Authorization": f"Bearer {KEY}"}).json()
    (s,) = listed["data"]
    assert s["set"] == "subtraction" and {p["name"] for p in s["prompts"]} == {"subtract", "add"}
    assert s["prompts"][0]["fields"] == ["a", "b"]
    r = _post(served, "/v1/prompts/subtraction/add", {"inputs": {"a": 47, "b": 38}, "max_tokens": 48})
    body = r.json()
    assert r.status_code == 200 and body["question"] == "What is 4 7 + 3 8?" and body["expect"] == 85
    assert body["correct"] in (True, False) and body["usage"]["prompt_tokens"] > 0
    want = _greedy(model, "User: What is 4 7 + 3 8?\nAssistant:", 48)
    assert body["completion"] == want
    if body["answer"] is not None:  # the verifier's verdict is the task's parser on the answer
        assert body["correct"] == (body["answer"].replace(" ", "") == "85")
    r = _post(served, "/v1/prompts/subtraction/subtract", {"inputs": {"a": 71, "b": 20}, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["expect"] is None and r.json()["correct"] is None


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/prompts/nope/add", {"inputs": {}}, 404, "set"),
        ("/v1/prompts/subtraction/divide", {"inputs": {}}, 404, "prompt"),
        ("/v1/prompts/subtraction/add", {"inputs": {"a": 1}}, 400, "inputs.b"),
        ("/v1/prompts/subtraction/add", {"inputs": {"a": 1, "b": 2, "c": 3}}, 400, "inputs.c"),
        ("/v1/prompts/subtraction/add", {"inputs": {"a": [1], "b": 2}}, 400, "inputs.a"),
        ("/v1/prompts/subtraction/add", {"inputs": {"a": 1, "b": 2}, "path": "/etc/passwd"}, 400, "path"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x " * 400, "max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 100}, 400, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_token": 5}, 400, "max_token"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a"] * 9}, 400, "stop"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages[0].role",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]},
            400,
            "messages[0]",
        ),  # fmt: skip
    ],
)
def test_bad_input_gets_a_json_error_naming_the_field(served, path, body, status, param):
    r = _post(served, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_malformed_json_nan_oversize_bodies_and_unknown_routes(served):
    url, headers = served[1].url, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
                   headers=headers)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(url + "/v1/completions", content=json.dumps({"model": "tiny", "prompt": "x" * 100_000}),
                   headers=headers)  # fmt: skip
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing", headers=headers)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(url + "/v1/models", headers=headers).status_code == 200  # still serving


def test_the_api_key_is_refused_and_accepted(served):
    bad = openai.OpenAI(base_url=served[1].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(served[1].url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served[1].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_full_queue_answers_429_and_a_stuck_request_504(model):
    engine, bg = _serve(model, EngineConfig(max_waiting=1), start=False, request_timeout=1.0)  # nobody decodes
    try:
        c = openai.OpenAI(base_url=bg.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        first: dict[str, Exception] = {}

        def wait() -> None:
            try:
                c.completions.create(model="tiny", prompt="x", max_tokens=2)
            except Exception as e:  # noqa: BLE001 - recorded for the assertion below
                first["error"] = e

        t = threading.Thread(target=wait)
        t.start()
        while not engine._waiting:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt="y", max_tokens=2)
        t.join(30)
        assert isinstance(first["error"], openai.APIStatusError) and first["error"].status_code == 504
    finally:
        bg.stop()
        engine.stop()


def test_a_client_that_disconnects_frees_its_slot(model, served):
    engine = served[0]
    before = engine.counters["finished"]
    body = {"model": "tiny", "prompt": "User: Count to a hundred.\nAssistant:", "max_tokens": 200, "stream": True,
            "temperature": 1.0, "seed": 1}  # fmt: skip
    with httpx.stream("POST", served[1].url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while engine.counters["finished"] == before or engine.metrics()["running"]:
        assert time.monotonic() < deadline, "the disconnected request still holds its slot"
        time.sleep(0.05)
