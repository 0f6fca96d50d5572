"""Generation: sampling rules, the latent cache, and speculative decoding that changes nothing but speed."""

from __future__ import annotations

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.model.generate import (
    INFERENCE_ATTN_MODE,
    generate,
    inference_attn_mode,
    sample_next,
    speculative_generate,
)
from workbench.model.mla import KVCache
from workbench.rl.rollout import sample_completions


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Model(ModelConfig.from_preset("tiny")).eval()


def test_greedy_generation_is_the_same_with_and_without_absorption(model):
    prompt = torch.randint(0, 2048, (2, 9))
    a = generate(model, prompt, 20, attn_mode="absorb")
    b = generate(model, prompt, 20, attn_mode="naive")
    assert a.shape == (2, 29) and torch.equal(a[:, :9], prompt)
    assert torch.equal(a, b)


def test_greedy_generation_matches_recomputing_everything(model):
    prompt = torch.randint(0, 2048, (1, 5))
    ids = prompt
    with torch.no_grad():
        for _ in range(10):  # no cache: the whole sequence every step
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, prompt, 10), ids)


@pytest.mark.parametrize("mode", ["absorb", "naive"])
def test_speculative_decoding_gives_the_greedy_tokens(model, mode):
    for seed in range(3):
        prompt = torch.randint(0, 2048, (1, 6), generator=torch.Generator().manual_seed(seed))
        res = speculative_generate(model, prompt, 30, attn_mode=mode)
        assert torch.equal(res.tokens, generate(model, prompt, 30))
        assert res.drafted > 0 and 0 <= res.accepted <= res.drafted
        assert res.main_forwards == res.drafted


def test_speculative_decoding_accepts_when_the_draft_is_right():
    """When draft and main model always agree (a head that makes every logit equal, so both pick token 0),
    every draft is accepted and each main forward yields two tokens."""
    torch.manual_seed(0)
    m = Model(ModelConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()
    prompt = torch.randint(1, 2048, (1, 4))
    res = speculative_generate(m, prompt, 20)
    assert res.acceptance_rate == 1.0
    assert res.main_forwards == 10 and res.tokens_per_forward == pytest.approx(2.0)
    assert torch.equal(res.tokens, generate(m, prompt, 20))


def test_sampling_rules():
    logits = torch.tensor([[0.0, 5.0, 1.0, -1.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert picks == {1}  # the nucleus of mass 0.5 holds only the best token
    many = {int(sample_next(logits, temperature=5.0, generator=g)) for _ in range(200)}
    assert len(many) == 4
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, temperature=1, top_p=0)


def test_eos_stops_generation(model):
    prompt = torch.randint(0, 2048, (1, 5))
    first = int(generate(model, prompt, 1)[0, -1])
    out = generate(model, prompt, 10, eos_id=first)
    assert out.shape[1] == 6 and int(out[0, -1]) == first


def test_speculative_needs_an_mtp_module():
    m = Model(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        speculative_generate(m, [1, 2, 3], 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature must be a finite number"),
        ({"temperature": "0.5"}, "temperature must be a finite number"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_values_are_refused_before_any_work(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2, 3], 4, **kwargs)


def test_a_tiny_temperature_is_the_greedy_limit_never_nan():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0 - 1e-3], [3.0, -2.0, 2.9, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, temperature=1e-30, generator=g).tolist() == [1, 0]
    with pytest.raises(ValueError, match="NaN logits"):
        sample_next(torch.tensor([[0.0, float("nan")]]), temperature=1.0)
    with pytest.raises(ValueError, match="every logit of a row is -inf"):
        sample_next(torch.full((1, 3), float("-inf")), temperature=1.0)


def test_inference_runs_absorbed_mla_whatever_the_training_mode(model):
    assert model.config.attn_mode == "naive" and inference_attn_mode() == INFERENCE_ATTN_MODE == "absorb"
    assert inference_attn_mode("naive") == "naive"
    with pytest.raises(ValueError, match="attn_mode must be"):
        inference_attn_mode("flash")
    prompt = torch.randint(0, 2048, (2, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate(model, prompt, 8), generate(model, prompt, 8, attn_mode="absorb"))
    cache = KVCache()  # what the absorbed default keeps: the latent and the rotary key, nothing expanded
    with torch.no_grad():
        model(prompt, cache=cache, attn_mode=inference_attn_mode())
    assert set(cache.layers[0]) == {"c_kv", "k_pe"}


def test_rollouts_batch_prompts_of_mixed_lengths_as_if_alone(model):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 2048, (n,), generator=g).tolist() for n in (7, 3, 11, 3)]
    ro = sample_completions(model, prompts, 2, max_new_tokens=6, stop=(0,), temperature=0.0)
    assert ro.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]
    for i, p in enumerate(prompts):
        alone = generate(model, p, 6, eos_id=0)[0, len(p) :].tolist()
        cut = alone[: alone.index(0) + 1] if 0 in alone else alone
        assert ro.completions[2 * i] == ro.completions[2 * i + 1] == cut
