"""Specialisation methods behind one recipe: ESFT's selection, what each method trains, deltas, the gate,
composition of two verticals, and refusals of bad recipes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workbench.config import ConfigError
from workbench.io.files import CheckpointError
from workbench.io.hf import load_hf
from workbench.io.tokenizer import tokenizer_of
from workbench.tasks import get_task
from workbench.vertical import (
    DomainGate,
    Recipe,
    Verticals,
    apply_delta,
    expert_scores,
    fingerprint,
    moe_layers,
    read_delta,
    select_experts,
    specialise,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "data" / "add-base"
FAST = dict(steps=3, n_new_docs=200, eval_problems=4, old_eval_problems=4, gate=False, warmup_steps=1)


@pytest.fixture(scope="module")
def base():
    return load_hf(BASE)


def _ids(base, n=2, t=24, seed=0):
    return torch.randint(0, base.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids, compute_mtp=False).logits


# ---------------------------------------------------------------- ESFT selection


def _routing(idx, weight, E=8, layer=1):
    idx = torch.tensor(idx)
    return SimpleNamespace(layer_idx=layer, topk_idx=idx, topk_weight=torch.tensor(weight),
                           counts=torch.bincount(idx.reshape(-1), minlength=E))  # fmt: skip


def test_esft_scores_are_the_papers_two_scores_normalised_within_the_layer():
    # 4 tokens, top-2 of 8 experts: expert 3 takes every token, 5 two, 0 and 7 one each
    idx = [[3, 5], [3, 0], [5, 3], [3, 7]]
    w = [[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.8, 0.2]]
    gate = expert_scores([_routing(idx, w)], "gate")[1]
    token = expert_scores([_routing(idx, w)], "token")[1]
    expected_gate = torch.zeros(8)
    for row_i, row_w in zip(idx, w, strict=True):
        for e, x in zip(row_i, row_w, strict=True):
            expected_gate[e] += x
    torch.testing.assert_close(gate, expected_gate / expected_gate.sum())
    torch.testing.assert_close(token, torch.tensor([1, 0, 0, 4, 0, 2, 0, 1]) / 8.0)
    assert float(gate.sum()) == pytest.approx(1.0) and float(token.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="score must be one of"):
        expert_scores([_routing(idx, w)], "loss")


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("p", [0.05, 0.1, 0.2, 0.5, 0.9, 1.0])
def test_select_experts_is_the_smallest_set_whose_cumulative_score_first_reaches_p(seed, p):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(8, generator=g) ** 3
    scores = scores / scores.sum()
    chosen = select_experts(scores, p)
    # the chosen set is a prefix of the experts sorted by score, and reaches p ...
    ranked = torch.argsort(scores, descending=True, stable=True).tolist()
    assert chosen == sorted(ranked[: len(chosen)])
    assert float(scores[chosen].sum()) >= p - 1e-6
    # ... and the one before it (one expert fewer) does not: no smaller set reaches p
    fewer = ranked[: len(chosen) - 1]
    assert float(scores[fewer].sum()) < p - 1e-6 if fewer else True


def test_select_experts_refuses_p_outside_0_1():
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"esft_p must be in \(0, 1\]"):
            select_experts(torch.full((8,), 1 / 8), p)


# ---------------------------------------------------------------- bad recipes


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"method": "lora+magic"}, "unknown method"),
        ({"method": "full+lora"}, "use 'full' alone"),
        ({"method": "esft_gate+esft_token"}, "choose one ESFT score"),
        ({"method": "newexp+lora_exp"}, "combine newexp or ESFT with lora"),
        ({"esft_p": 0.0}, r"esft_p must be in \(0, 1\]"),
        ({"esft_p": 1.2}, r"esft_p must be in \(0, 1\]"),
        ({"replay": 1.0}, r"replay must be in \[0, 1\)"),
        ({"task": "add"}, "must be a new domain"),
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"lr": float("nan")}, "lr must be a finite number"),
    ],
)
def test_bad_recipes_are_refused_with_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        Recipe(**fields)


def test_the_command_refuses_a_bad_recipe_before_writing_anything(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "delta"
    assert main(["vertical", "--method", "lora+magic", "--out", str(out), "--no-progress"]) == 2
    assert "unknown method" in capsys.readouterr().err and not out.exists()
    assert main(["vertical", "--method", "esft_token", "--esft-p", "1.5", "--out", str(out)]) == 2
    assert "esft_p must be in (0, 1]" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------- what trains


@pytest.fixture(scope="module")
def esft_run(base):
    return specialise(base, Recipe(method="esft_token", esft_p=0.3, lr=1e-2, **FAST))


def test_esft_trains_exactly_the_selected_rows_of_the_stacked_experts(base, esft_run):
    row, prepared = esft_run
    selected = {int(k): v for k, v in row["info"]["esft"].items()}
    assert set(selected) == set(moe_layers(base)) and all(selected.values())
    before, after = moe_layers(base), moe_layers(prepared.model)
    for layer, experts in selected.items():
        assert len(experts) < base.config.n_routed_experts  # p=0.3 with top-2 of 8 never needs them all
        for name in ("gate_proj", "up_proj", "down_proj"):
            b, a = getattr(before[layer].experts, name), getattr(after[layer].experts, name)
            for e in range(base.config.n_routed_experts):
                changed = not torch.equal(a[e], b[e])
                assert changed == (e in experts), (layer, name, e)
        assert torch.equal(after[layer].gate.weight, before[layer].gate.weight)  # router frozen
        bias = after[layer].gate.e_score_correction_bias
        assert torch.equal(bias, before[layer].gate.e_score_correction_bias)  # balancing bias frozen
    b_state, a_state = base.state_dict(), prepared.model.state_dict()
    untouched = [n for n in b_state if ".experts." not in n and n not in ("embed_tokens.weight", "lm_head.weight")]
    assert all(torch.equal(a_state[n], b_state[n]) for n in untouched)


def test_full_fine_tuning_trains_everything_and_is_not_a_delta(base):
    row, prepared = specialise(base, Recipe(method="full", lr=1e-3, **FAST))
    assert row["trained_params"] == base.num_parameters() and row["delta_bytes"] is None
    assert not torch.equal(prepared.model.layers[0].self_attn.o_proj.weight, base.layers[0].self_attn.o_proj.weight)


# ---------------------------------------------------------------- deltas


@pytest.fixture(scope="module")
def vstar(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("deltas") / "borrow"
    row, prepared = specialise(base, Recipe(method="lora+lora_mlp+newexp", **FAST), out=out)
    return out, row, prepared


@pytest.mark.parametrize("which", ["vstar", "esft"])
def test_a_delta_applied_onto_the_base_reproduces_the_trained_model_exactly(base, vstar, esft_run, tmp_path, which):
    from workbench.vertical import save_delta

    if which == "vstar":
        folder, row, prepared = vstar
    else:
        row, prepared = esft_run
        folder = tmp_path / "esft"
        save_delta(prepared, folder, base)
    loaded = apply_delta(base, folder)
    ids = _ids(base)
    assert torch.equal(_logits(loaded, ids), _logits(prepared.model, ids))  # bit for bit
    with torch.no_grad():  # generation runs MLA in absorb mode: the adapters must be there too
        a = loaded(ids, attn_mode="absorb", compute_mtp=False).logits
        b = prepared.model(ids, attn_mode="absorb", compute_mtp=False).logits
    assert torch.equal(a, b)
    meta = read_delta(folder)
    assert meta["base_fingerprint"] == fingerprint(base)
    # only the trained tensors: the file is a fraction of the model's float32 weights
    size = (Path(folder) / "delta.safetensors").stat().st_size
    assert size == meta["bytes"] and size < 0.9 * 4 * base.num_parameters()
    assert fingerprint(base) == meta["base_fingerprint"]  # applying never changed the base


def test_a_delta_only_stores_trained_tensors_and_the_base_is_untouched(base, vstar):
    folder, row, prepared = vstar
    from workbench.io.files import load_tensors

    tensors = load_tensors(Path(folder) / "delta.safetensors")
    stored = sum(t.numel() for n, t in tensors.items() if not n.endswith("@rows") and "e_score" not in n)
    assert stored == row["trained_params"] == 145_152  # LoRA r8 + 4 new experts per layer + new-token rows
    assert row["delta_bytes"] == (Path(folder) / "delta.safetensors").stat().st_size


def test_a_delta_is_refused_for_another_base(base, vstar):
    folder, _, _ = vstar
    other = load_hf(BASE)
    with torch.no_grad():
        other.layers[0].self_attn.o_proj.weight[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match="trained on another base"):
        apply_delta(other, folder)
    with pytest.raises(CheckpointError, match="holds no delta"):
        apply_delta(base, Path(folder).parent / "nothing-here")


def test_a_failed_delta_write_leaves_nothing_half_written(base, vstar, tmp_path, monkeypatch):
    from workbench.io import files
    from workbench.vertical import save_delta

    _, _, prepared = vstar
    out = tmp_path / "delta"

    def broken(path, tensors, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_delta(prepared, out, base)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".delta")]
    monkeypatch.undo()
    save_delta(prepared, out, base)
    before = (out / "delta.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_delta(prepared, out, base)
    assert (out / "delta.safetensors").read_bytes() == before


# ---------------------------------------------------------------- the gate and two verticals on one base


def test_two_deltas_compose_behind_the_gate(base, vstar, tmp_path):
    folder_b, _, _ = vstar
    folder_l = tmp_path / "lookup"
    specialise(base, Recipe(method="lora+newexp", task="lookup", **FAST), out=folder_l)
    models = {"borrow": apply_delta(base, folder_b), "lookup": apply_delta(base, folder_l)}
    borrow, lookup, add = get_task("borrow"), get_task("lookup"), get_task("add")
    train = {t.name: [t.prompt(ex) for ex in t.sample(150, seed=1)] for t in (borrow, lookup, add)}
    tok = tokenizer_of(base)
    gate = DomainGate.fit(base, tok, {"borrow": train["borrow"], "lookup": train["lookup"]}, train["add"])
    v = Verticals(base, models, gate)
    for task, want in ((borrow, "borrow"), (lookup, "lookup"), (add, None)):
        examples = task.sample(40, seed=0, split="test")
        routes, _ = v.correctness(task, examples[:6], tokenizer_of(base), max_new_tokens=8)
        assert all(r == want for r in routes)  # prompts of different shapes: the gate is right every time
        assert sum(r == want for r in gate.route([task.prompt(ex) for ex in examples])) >= 38
    assert v.model_for(None) is base and v.model_for("lookup") is models["lookup"]
    ids = _ids(base)
    assert not torch.equal(_logits(models["borrow"], ids), _logits(models["lookup"], ids))
    assert torch.equal(_logits(models["lookup"], ids), _logits(apply_delta(base, folder_l), ids))
    with pytest.raises(ValueError, match="no delta is loaded"):
        Verticals(base, {"borrow": models["borrow"]}, gate)


def test_the_vertical_command_writes_a_delta_and_a_row(tmp_path, capsys):
    from workbench.cli import main

    out, rows = tmp_path / "delta", tmp_path / "rows.jsonl"
    args = ["vertical", "--method", "lora", "--steps", "2", "--n-new-docs", "200", "--eval-problems", "2",
            "--old-eval-problems", "2", "--no-gate", "--out", str(out), "--rows", str(rows),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "borrow lora" in capsys.readouterr().out
    row = json.loads(rows.read_text().splitlines()[0])
    assert row["method"] == "lora" and row["delta_bytes"] == (out / "delta.safetensors").stat().st_size
    assert main(args) == 2  # the delta exists: refused without --overwrite, before training
    assert "--overwrite" in capsys.readouterr().err
