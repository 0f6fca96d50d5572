"""Generation: sampling rules, the latent cache, and speculative decoding that changes nothing but speed."""

from __future__ import annotations

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.model.generate import generate, sample_next, speculative_generate


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
