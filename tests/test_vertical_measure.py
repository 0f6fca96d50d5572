"""What lesson 9 reads from a comparison: which experts a method trains and whose tokens reach them, the rows of
a comparison, and a prompt set served through several verticals behind their gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workbench.io.hf import load_hf
from workbench.io.tokenizer import tokenizer_of
from workbench.serve.prompts import format_rows, load_prompt_set, run_prompt_set
from workbench.vertical import (
    Recipe,
    Verticals,
    apply_delta,
    expert_share,
    fit_gate,
    moe_layers,
    old_windows,
    prepare,
    recipe_dataset,
    specialise,
)
from workbench.vertical.compare import group_rows, read_rows, table

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "data" / "add-base"
LAPTOP = ROOT / "data" / "results" / "vertical_compare_laptop.jsonl"
FAST = dict(steps=3, n_new_docs=200, eval_problems=4, old_eval_problems=4, gate=False, warmup_steps=1)


@pytest.fixture(scope="module")
def base():
    return load_hf(BASE)


@pytest.fixture(scope="module")
def dataset(base):
    return recipe_dataset(Recipe(**FAST), tokenizer_of(base))


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("full", "all"),
        ("lora_exp", "all"),
        ("lora", "none"),
        ("lora+lora_mlp", "none"),
        ("esft_token", "some"),
        ("newexp", "new"),
        ("lora+newexp", "new"),
    ],  # fmt: skip
)
def test_trained_experts_name_exactly_the_routed_experts_a_method_changes(base, dataset, method, kind):
    p = prepare(base, Recipe(method=method, **FAST), dataset, tokenizer_of(base))
    experts = {int(k): v for k, v in p.info["trained_experts"].items()}
    n = p.model.config.n_routed_experts
    if kind == "none":
        assert experts == {}
    else:
        assert set(experts) == set(moe_layers(base))
    if kind == "all":
        assert all(v == list(range(n)) for v in experts.values())
    if kind == "some":
        assert all(0 < len(v) < n for v in experts.values())
        assert experts == {int(k): v for k, v in p.info["esft"].items()}
    if kind == "new":
        grown = n - base.config.n_routed_experts
        assert grown > 0 and all(len(v) == grown for v in experts.values())
        for layer, moe in moe_layers(p.model).items():  # the experts not trained are the base's, in order
            kept = [e for e in range(n) if e not in experts[layer]]
            assert torch.equal(moe.experts.gate_proj[kept], moe_layers(base)[layer].experts.gate_proj)
    if kind in ("some", "new"):  # the masks train the same rows
        names = dict(p.model.named_parameters())
        for layer, moe in moe_layers(p.model).items():
            name = next(k for k, q in names.items() if q is moe.experts.gate_proj)
            assert p.masks.rows[name].nonzero().flatten().tolist() == experts[layer]
    json.dumps(p.info)  # the row that carries it stays JSON
    p.masks.close()


def test_expert_share_is_the_wake_up_selection_rate_and_bounded_by_all_and_none(base, dataset):
    recipe = Recipe(method="newexp", **FAST)
    p = prepare(base, recipe, dataset, tokenizer_of(base))
    old_ids = old_windows(dataset, recipe.task, 32, seed=recipe.seed)  # the windows waking budgeted
    share = expert_share(p.model, p.info["trained_experts"], old_ids)
    for layer, rate in p.info["wake"]["old"].items():
        assert share[int(layer)] == pytest.approx(rate)
        assert rate <= recipe.old_rate + 1e-6
    n = p.model.config.n_routed_experts
    assert set(expert_share(p.model, {1: list(range(n))}, old_ids).values()) == {1.0}
    assert expert_share(p.model, {1: []}, old_ids) == {}
    with pytest.raises(ValueError, match="not MoE layers"):
        expert_share(p.model, {0: [1]}, old_ids)
    p.masks.close()


def test_the_comparison_rows_read_group_and_tabulate(tmp_path):
    rows = read_rows([LAPTOP])
    groups = group_rows(rows)
    assert sum(len(v) for v in groups.values()) == len(rows)
    assert all([r["seed"] for r in v] == sorted(r["seed"] for r in v) for v in groups.values())
    lines = [x for x in table(rows).splitlines() if x.startswith("| borrow") or x.startswith("| lookup")]
    assert len(lines) == len(groups)
    bad = tmp_path / "rows.jsonl"
    bad.write_text(LAPTOP.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"rows.jsonl:2 is not a JSON row"):
        read_rows([bad])
    bad.write_text('{"task": "borrow"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1 is not a comparison row: it lacks \['method'"):
        read_rows([bad])
    with pytest.raises(ValueError, match="is not a file of rows"):
        read_rows([tmp_path / "missing.jsonl"])


def test_a_prompt_set_served_behind_the_gate_is_answered_by_the_routed_model(base, tmp_path):
    tok = tokenizer_of(base)
    recipe = Recipe(method="lora+newexp", **FAST)
    specialise(base, recipe, out=tmp_path / "borrow")
    delta = apply_delta(base, tmp_path / "borrow")
    served = Verticals(base, {"borrow": delta}, fit_gate(base, recipe, tok, n=100))
    prompt_set = load_prompt_set(ROOT / "data" / "prompts" / "borrowing.yaml")
    rows = run_prompt_set(served, prompt_set, tokenizer=tok, max_new_tokens=16)
    assert {r["prompt"]: r["route"] for r in rows} == {"subtract": "borrow", "add": "base"}
    for name, model in (("subtract", delta), ("add", base)):  # each answer is the routed model's own
        alone = run_prompt_set(model, prompt_set, names=[name], tokenizer=tok, max_new_tokens=16)
        assert [r["completion"] for r in rows if r["prompt"] == name] == [r["completion"] for r in alone]
        assert all("route" not in r for r in alone)
    assert "(answered by base)" in format_rows(rows) and "(answered by borrow)" in format_rows(rows)
    assert not torch.equal(delta.lm_head.weight, base.lm_head.weight)


def test_the_mlp_gate_tells_same_shaped_verticals_apart_where_the_linear_probe_cannot(base):
    from workbench.tasks import get_task
    from workbench.vertical import DomainGate

    tok = tokenizer_of(base)
    tasks = {n: get_task(n) for n in ("borrow", "sub", "add")}
    train = {n: [t.prompt(ex) for ex in t.sample(200, seed=1, split="train")] for n, t in tasks.items()}
    test = {n: [t.prompt(ex) for ex in t.sample(100, seed=0, split="test")] for n, t in tasks.items()}
    right = {}
    for probe in ("linear", "mlp"):
        gate = DomainGate.fit(base, tok, {"borrow": train["borrow"], "sub": train["sub"]}, train["add"], probe=probe)
        routes = {n: gate.route(p) for n, p in test.items()}
        assert all(r is None for r in routes["add"])  # addition is another shape: both gates send it to the base
        right[probe] = {n: sum(r == n for r in routes[n]) / len(routes[n]) for n in ("borrow", "sub")}
    # telling borrowing from not is a digit comparison: an interaction, which a hidden layer can represent
    worst = {probe: min(r.values()) for probe, r in right.items()}
    assert worst["mlp"] >= 0.93 and worst["mlp"] > worst["linear"] + 0.05, right
    with pytest.raises(ValueError, match="probe must be one of"):
        DomainGate.fit(base, tok, {"borrow": train["borrow"]}, train["add"], probe="forest")


def test_rows_of_another_base_or_with_grpo_are_other_configurations(tmp_path):
    from workbench.vertical.compare import config_of, label

    row = read_rows([LAPTOP])[0]
    other = {**row, "base": "/somewhere/data/read-base"}
    tuned = {**row, "grpo_steps": 40, "grpo_lr": 3e-4, "grpo": {**row["cold"], "acc": 0.5}}
    groups = group_rows([row, other, tuned])
    assert len(groups) == 3
    assert [c.base for c in groups] == ["add-base", "add-base", "read-base"]
    assert config_of(tuned).grpo_steps == 40 and config_of(row).grpo_steps == 0
    assert label(config_of(other)).endswith(", on read-base)")
    assert "then 40 GRPO steps at lr 0.0003" in label(config_of(tuned))
    text = table([row, other, tuned])
    assert "after GRPO" in text and "| 50.0 / " in text and "(40 steps, lr 0.0003)" in text
    assert "after GRPO" not in table([row, other])  # the column only when a row ran GRPO
