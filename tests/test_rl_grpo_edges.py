"""GRPO at its edges: log-probabilities at the sampling temperature, and no NaN from the k3 term's exp.

1. Rollouts are sampled from softmax(logits / T). The importance ratio and the KL must compare the
   probabilities of *that* distribution, so the old-policy, current and reference log-probabilities are
   all taken at T (as TRL's GRPOTrainer does). Checked through ``grpo_train`` at T = 1 and T = 0.6: what
   reaches the loss equals log_softmax(logits / T) of the starting model, and at T = 0.6 differs from T = 1.
2. The k3 term exp(ref - logp) at a padded position can overflow; its loss is masked, but a gradient of
   0 * inf is NaN and would reach every parameter. Masking before the exp keeps every gradient finite.
"""

from __future__ import annotations

import copy

import pytest
import torch

import workbench.rl.grpo as grpo_module
from workbench import Model, ModelConfig
from workbench.rl.grpo import GRPOConfig, grpo_token_loss, grpo_train, token_weights
from workbench.tasks import get_task

SMALL = dict(steps=1, prompts_per_step=2, group_size=2, inner_steps=1, max_new_tokens=6, eval_problems=2,
             eval_samples=1, eval_every=0, pool_size=8, warmup_steps=0, lr=1e-3, device="cpu", beta=0.04)  # fmt: skip


def _peaked_model() -> Model:
    """A tiny model whose next-token distributions are far from uniform, so temperature matters."""
    torch.manual_seed(0)
    model = Model(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0))
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def _tempered_logprobs(model: Model, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each next token, computed here from scratch: (N, T-1)."""
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_every_log_prob_of_the_loss_is_taken_at_the_sampling_temperature(temperature, monkeypatch):
    model = _peaked_model()
    start = copy.deepcopy(model)
    seen: dict[str, list[torch.Tensor]] = {"ids": [], "logp": [], "old": [], "ref": [], "live": []}
    real_pad, real_loss = grpo_module.pad_sequences, grpo_module.grpo_token_loss

    def pad(*args, **kwargs):
        ids, mask = real_pad(*args, **kwargs)
        seen["ids"].append(ids.clone())
        return ids, mask

    def loss(logp, old_logp, ref_logp, adv, weights, cfg):
        for key, t in (("logp", logp), ("old", old_logp), ("ref", ref_logp), ("live", weights > 0)):
            seen[key].append(t.detach().clone())
        return real_loss(logp, old_logp, ref_logp, adv, weights, cfg)

    monkeypatch.setattr(grpo_module, "pad_sequences", pad)
    monkeypatch.setattr(grpo_module, "grpo_token_loss", loss)
    grpo_train(model, get_task("add"), GRPOConfig(temperature=temperature, **SMALL), progress=False)

    ids, live = seen["ids"][0], seen["live"][0]
    assert live.any()
    expected = _tempered_logprobs(start, ids, temperature)  # the distribution the rollouts were drawn from
    for key in ("logp", "old", "ref"):  # one step, one inner step: all three are the starting policy's
        assert torch.allclose(seen[key][0][live], expected[live], atol=1e-4), key
    if temperature != 1.0:  # the check has teeth: at temperature 1 the values are clearly different
        untempered = _tempered_logprobs(start, ids, 1.0)
        assert (seen["old"][0][live] - untempered[live]).abs().max() > 0.1


def test_a_temperature_the_log_probs_cannot_be_taken_at_is_refused():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            GRPOConfig(temperature=bad)
    with pytest.raises(ValueError, match="finite"):
        GRPOConfig(temperature=float("inf"))


@pytest.mark.parametrize("extreme", [1e4, 1e30, float("inf")])
def test_extreme_log_probs_at_padded_positions_give_finite_gradients(extreme):
    """The padded tail of a completion can carry any log-prob (a pad token the policy finds impossible):
    here ``ref - logp`` is ``extreme`` there. Loss and every parameter's gradient stay finite, and the
    padded positions contribute nothing."""
    torch.manual_seed(0)
    model = Model(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0))
    ids = torch.randint(3, 2048, (2, 9))
    mask = torch.ones(2, 8)
    mask[0, 5:] = 0.0  # row 0 is padded after 5 completion tokens
    logits = model(ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (2, 8), in the graph
    pad = mask == 0
    logp_edge = torch.where(pad, logp - extreme, logp)  # still differentiable through logp at the pads
    ref = torch.where(pad, torch.zeros_like(logp), logp.detach() - 0.1)
    cfg = GRPOConfig(beta=0.04)
    weights = token_weights(mask, "sequence", 8)
    loss, stats = grpo_token_loss(logp_edge, logp_edge.detach(), ref, torch.tensor([1.0, -1.0]), weights, cfg)
    assert torch.isfinite(loss) and torch.isfinite(stats["kl_sum"])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    # the padded positions change nothing: the same loss and gradients as with ordinary values there
    model.zero_grad()
    logits = model(ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    plain, _ = grpo_token_loss(logp, logp.detach(), torch.where(pad, logp.detach(), ref), torch.tensor([1.0, -1.0]),
                               weights, cfg)  # fmt: skip
    assert torch.allclose(plain, loss, atol=1e-6)
    plain.backward()
    again = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, again))
