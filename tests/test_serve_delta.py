"""Serving a vertical: ``python -m workbench serve --delta DIR`` applies a delta onto ``--model`` at load.

Driven by the real ``openai`` client on a free loopback port: the served greedy output equals ``generate``
on the base with the delta applied (and differs from the base's, so the test can fail); two deltas compose
behind the domain gate (each request answered by its vertical, an old-domain one by the exact base);
``/v1/models`` names the base and the deltas; a delta for another base, and bad ``--delta`` paths, are
refused at start with a message naming the flag and the fix, never a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from test_serve import _greedy  # noqa: E402  (one definition of what the server must answer)

from workbench.cli import build_parser, main  # noqa: E402
from workbench.cli.serve import build  # noqa: E402
from workbench.io.hf import load_hf  # noqa: E402
from workbench.serve.server import Background  # noqa: E402
from workbench.tasks import get_task  # noqa: E402
from workbench.vertical import Recipe, apply_delta, specialise  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "data" / "add-base"
TINY = ROOT / "data" / "tiny-model"
FAST = dict(steps=20, n_new_docs=200, eval_problems=4, old_eval_problems=4, gate=False, warmup_steps=1)


@pytest.fixture(scope="module")
def base():
    return load_hf(BASE)


@pytest.fixture(scope="module")
def deltas(base, tmp_path_factory):
    """Two verticals of the add base: borrowing subtraction (LoRA) and a records lookup (LoRA + new experts)."""
    root = tmp_path_factory.mktemp("deltas")
    specialise(base, Recipe(method="lora", task="borrow", **FAST), out=root / "borrow")
    specialise(base, Recipe(method="lora+newexp", task="lookup", **FAST), out=root / "lookup")
    return root / "borrow", root / "lookup"


def _start(*argv: str):
    args = build_parser().parse_args(["serve", "--port", "0", *argv])
    engines, app, cfg = build(args)
    return engines, Background(app), cfg


def _stop(engines, bg) -> None:
    bg.stop()
    for e in engines:
        e.stop()


def _prompts(task: str, n: int = 3) -> list[str]:
    t = get_task(task)
    return [t.prompt(ex) for ex in t.sample(n, seed=0, split="test")]


def test_one_delta_serves_exactly_the_base_with_the_delta_applied(base, deltas):
    borrow, _ = deltas
    engines, bg, cfg = _start("--model", str(BASE), "--delta", str(borrow))
    try:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        (card,) = client.models.list().data
        assert card.id == cfg.model_id == "add-base+borrow"
        extra = card.model_dump()
        assert extra["base"] == "add-base" and extra["routing"] == "always"
        assert [d["name"] for d in extra["deltas"]] == ["borrow"] and extra["deltas"][0]["method"] == "lora"
        vertical = apply_delta(base, borrow)
        differs = 0
        for prompt in _prompts("borrow"):
            r = client.completions.create(model=card.id, prompt=prompt, max_tokens=24, temperature=0)
            assert r.choices[0].text == _greedy(vertical, prompt, 24)
            differs += r.choices[0].text != _greedy(base, prompt, 24)
        assert differs, "the delta changed nothing the test can see: it would pass on the bare base too"
        with pytest.raises(openai.NotFoundError, match="add-base\\+borrow"):  # the old name is not served
            client.completions.create(model="add-base", prompt="What is 1 + 2?", max_tokens=2)
    finally:
        _stop(engines, bg)


@pytest.mark.parametrize("gate", ["mlp", "linear"])
def test_two_deltas_compose_behind_the_gate(base, deltas, gate):
    borrow, lookup = deltas
    engines, bg, cfg = _start("--model", str(BASE), "--delta", str(borrow), "--delta", str(lookup), "--gate", gate)
    try:
        assert len(engines) == 3  # the base's, and one per vertical
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        (card,) = client.models.list().data
        assert card.id == "add-base+borrow+lookup" and card.model_dump()["routing"] == "gate"
        models = {"borrow": apply_delta(base, borrow), "lookup": apply_delta(base, lookup), "add": base}
        for task, model in models.items():
            for prompt in _prompts(task, 2):
                r = client.completions.create(model=card.id, prompt=prompt, max_tokens=16, temperature=0)
                assert r.choices[0].text == _greedy(model, prompt, 16), (task, prompt)
        metrics = httpx.get(bg.url + "/metrics", timeout=30).json()
        assert metrics["engine"]["requests"] == 2  # the add prompts ran on the exact base
        assert {k: v["engine"]["requests"] for k, v in metrics["verticals"].items()} == {"borrow": 2, "lookup": 2}
    finally:
        _stop(engines, bg)


def test_a_delta_for_another_base_is_refused_at_start_with_the_fix(deltas, capsys):
    borrow, _ = deltas
    assert main(["serve", "--model", str(TINY), "--delta", str(borrow), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--delta" in err and "trained on another base" in err and "--model" in err
    assert "Traceback" not in err


def _corrupt(tmp: Path, good: Path, how: str) -> Path:
    out = tmp / how
    if how == "missing":
        return out
    if how == "file":
        out.write_text("not a folder")
        return out
    out.mkdir()
    if how == "empty":
        return out
    shutil.copy(good / "delta.json", out / "delta.json")
    if how == "no-tensors":
        return out
    if how == "bad-json":
        (out / "delta.json").write_text("{not json")
        shutil.copy(good / "delta.safetensors", out)
    elif how == "no-fingerprint":
        meta = json.loads((good / "delta.json").read_text())
        del meta["base_fingerprint"]
        (out / "delta.json").write_text(json.dumps(meta))
        shutil.copy(good / "delta.safetensors", out)
    elif how == "truncated":
        (out / "delta.safetensors").write_bytes((good / "delta.safetensors").read_bytes()[:100])
    return out


@pytest.mark.parametrize("how", ["missing", "file", "empty", "no-tensors", "bad-json", "no-fingerprint", "truncated"])
def test_bad_delta_paths_are_refused_naming_the_flag(deltas, tmp_path, capsys, how):
    bad = _corrupt(tmp_path, deltas[0], how)
    assert main(["serve", "--model", str(BASE), "--delta", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --delta") and str(bad) in err and "Traceback" not in err
    assert "python -m workbench vertical" in err or "--model" in err  # the fix


def test_two_deltas_of_one_task_are_refused(deltas, tmp_path, capsys):
    twin = tmp_path / "borrow-again"
    shutil.copytree(deltas[0], twin)
    assert main(["serve", "--model", str(BASE), "--delta", str(deltas[0]), "--delta", str(twin), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--delta" in err and "both verticals of task 'borrow'" in err
