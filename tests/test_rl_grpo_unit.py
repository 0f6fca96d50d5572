"""GRPO's pieces by hand-computed examples: advantages per variant, k3 KL, clipping, loss aggregation,
masking of padding, and SFT's completion-only loss."""

from __future__ import annotations

import math

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.io.tokenizer import load_tokenizer
from workbench.model import IGNORE_INDEX
from workbench.rl.grpo import (
    GRPOConfig,
    clipped_surrogate,
    group_advantages,
    grpo_token_loss,
    k3_kl,
    token_weights,
    uniform_groups,
)
from workbench.rl.rollout import Rollouts, pad_sequences
from workbench.rl.sft import sft_batch


def test_group_advantages_grpo_scales_by_unbiased_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4
    adv = group_advantages(r, 4, scale=True, eps=0.0)
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    # a uniform group has no signal; the default eps keeps 0 / 0 finite
    assert torch.equal(group_advantages(r, 4, scale=True)[4:], torch.zeros(4))


def test_group_advantages_dr_grpo_only_subtracts_the_mean():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 1.0])  # groups of 3
    adv = group_advantages(r, 3, scale=False)
    expected = torch.tensor([1 - 1 / 3, -1 / 3, -1 / 3, -1.0, 1.0, 0.0])
    assert torch.allclose(adv, expected)
    with pytest.raises(ValueError):
        group_advantages(r, 4)


def test_uniform_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert uniform_groups(r, 2).tolist() == [True, True, False, False, True, True]


def test_k3_kl_is_nonnegative_and_zero_when_equal():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(64, 10), -1).gather(-1, torch.randint(0, 10, (64, 1))).squeeze(-1)
    ref = torch.log_softmax(torch.randn(64, 10), -1).gather(-1, torch.randint(0, 10, (64, 1))).squeeze(-1)
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(64))
    # hand value: logp = log 0.5, ref = log 0.25 -> r = 0.5 -> 0.5 - log 0.5 - 1
    v = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert v.item() == pytest.approx(0.5 - math.log(0.5) - 1)


def test_k3_kl_is_an_unbiased_estimate_of_kl():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    k3 = k3_kl(p.log(), q.log())
    assert float((p * k3).sum()) == pytest.approx(exact, rel=1e-5)  # E_p[k3] = KL(p || q)


def test_clipping_symmetric_and_clip_higher():
    ratio = torch.tensor([[0.5, 0.9, 1.0, 1.25, 1.5]])
    logp, old = ratio.log(), torch.zeros_like(ratio)
    pos, neg = torch.tensor([1.0]), torch.tensor([-1.0])
    obj, low, high = clipped_surrogate(logp, old, pos, 0.2, 0.2)
    assert torch.allclose(obj, torch.tensor([[0.5, 0.9, 1.0, 1.2, 1.2]]))  # A > 0: capped at 1 + eps
    assert high.tolist() == [[False, False, False, True, True]] and not low.any()
    obj, low, high = clipped_surrogate(logp, old, neg, 0.2, 0.2)
    assert torch.allclose(obj, torch.tensor([[-0.8, -0.9, -1.0, -1.25, -1.5]]))  # A < 0: floored at 1 - eps
    assert low.tolist() == [[True, False, False, False, False]] and not high.any()
    # DAPO clip-higher: eps_high = 0.28 lets the 1.25 token keep its gradient, 1.5 is still clipped
    obj, low, high = clipped_surrogate(logp, old, pos, 0.2, 0.28)
    assert torch.allclose(obj, torch.tensor([[0.5, 0.9, 1.0, 1.25, 1.28]]))
    assert high.tolist() == [[False, False, False, False, True]]


def test_clip_fraction_and_gradient_cut():
    cfg = GRPOConfig(beta=0.0)
    logp = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)
    old = torch.zeros(1, 2)
    w = torch.tensor([[0.5, 0.5]])
    loss, st = grpo_token_loss(logp, old, None, torch.tensor([1.0]), w, cfg)
    loss.backward()
    assert int(st["clip_high"]) == 1 and int(st["clip_low"]) == 0 and int(st["tokens"]) == 2
    assert logp.grad[0, 0] == 0.0  # the clipped token gets no gradient
    assert logp.grad[0, 1] == pytest.approx(-0.5)  # d(-w * ratio * A)/dlogp at ratio 1


def test_token_weights_sequence_token_constant():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # lengths 2 and 4
    seq = token_weights(mask, "sequence", max_new_tokens=8)
    assert torch.allclose(seq, torch.tensor([[0.25, 0.25, 0, 0], [0.125] * 4]))  # 1 / (|o_i| * 2)
    tok = token_weights(mask, "token", max_new_tokens=8)
    assert torch.allclose(tok, mask / 6)  # every token the same weight
    const = token_weights(mask, "constant", max_new_tokens=8)
    assert torch.allclose(const, mask / 16)  # 1 / (2 rows * 8)
    for w in (seq, tok):
        assert float(w.sum()) == pytest.approx(1.0)
    # a dropped row (all-zero mask) does not count in n
    dropped = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(token_weights(dropped, "sequence", 8), torch.tensor([[0, 0, 0, 0], [0.5, 0.5, 0, 0]]))
    assert torch.allclose(token_weights(dropped, "constant", 8), dropped / 8)
    with pytest.raises(ValueError):
        token_weights(mask, "median", 8)


def test_sequence_vs_token_aggregation_on_a_hand_example():
    """A short and a long completion, both with advantage -1: the per-token push differs."""
    cfg = GRPOConfig(beta=0.0)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = torch.tensor([-1.0, -1.0])
    grads = {}
    for agg in ("sequence", "token"):
        logp = torch.zeros(2, 4, requires_grad=True)
        loss, _ = grpo_token_loss(logp, logp.detach(), None, adv, token_weights(mask, agg, 4), cfg)
        loss.backward()
        grads[agg] = logp.grad.clone()
    # sequence: short row's one token gets 1/2, the long row's tokens 1/8 each (length bias)
    assert torch.allclose(grads["sequence"], torch.tensor([[0.5, 0, 0, 0], [0.125] * 4]))
    # token: every token 1/5
    assert torch.allclose(grads["token"], mask / 5)


def test_kl_term_enters_with_beta():
    cfg = GRPOConfig(beta=0.5)
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    loss, st = grpo_token_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 1), cfg)
    assert float(loss) == pytest.approx(0.5 * (0.5 - math.log(0.5) - 1))
    assert float(st["kl_sum"]) == pytest.approx(0.5 - math.log(0.5) - 1)


def test_padding_is_masked_and_never_changes_real_positions():
    ro = Rollouts(
        prompts=[[0, 11, 12], [0, 13]],
        prompt_index=[0, 0, 1],
        completions=[[5, 6], [7], [8, 9, 10]],
        finished=[True] * 3,
    )
    ids, mask = pad_sequences(ro, pad_id=2)
    assert ids.tolist() == [[0, 11, 12, 5, 6], [0, 11, 12, 7, 2], [0, 13, 8, 9, 10]]
    # mask[i, t] scores the prediction of token t + 1
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1]]
    # right padding does not change the logits of the real positions (causal model, no padding mask)
    torch.manual_seed(0)
    model = Model(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)).eval()
    with torch.no_grad():
        padded = model(ids).logits
        alone = model(torch.tensor([[0, 11, 12, 7]])).logits
    assert torch.allclose(padded[1, :4], alone[0], atol=1e-5)


def test_padded_tokens_get_no_gradient():
    cfg = GRPOConfig(beta=0.1)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.zeros(1, 3, requires_grad=True)
    ref = torch.full((1, 3), -1.0)
    loss, _ = grpo_token_loss(logp, logp.detach(), ref, torch.tensor([1.0]), token_weights(mask, "token", 3), cfg)
    loss.backward()
    assert logp.grad[0, 2] == 0.0 and logp.grad[0, 0] != 0.0


def test_sft_loss_only_on_completion_tokens():
    tok = load_tokenizer()
    pairs = [
        ("User: What is 1 + 2?\nAssistant:", "<think>1 + 2 = 3.</think><answer>3</answer>"),
        ("Hi", "<answer>4</answer>"),
    ]
    ids, labels = sft_batch(tok, pairs)
    for i, (prompt, completion) in enumerate(pairs):
        n_prompt = 1 + len(tok.encode(prompt))  # <|bos|> + prompt
        n_comp = len(tok.encode(completion))
        assert (labels[i, :n_prompt] == IGNORE_INDEX).all()
        assert labels[i, n_prompt : n_prompt + n_comp].tolist() == tok.encode(completion)
        assert (labels[i, n_prompt + n_comp :] == IGNORE_INDEX).all()
        assert (ids[i, n_prompt + n_comp :] == tok.pad_id).all()
    # the model's loss then only counts completion tokens: changing the prompt's labels changes nothing
    torch.manual_seed(0)
    model = Model(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0))
    a = model(ids, labels=labels).main_loss
    manual = torch.nn.functional.cross_entropy(
        model(ids).logits[:, :-1].reshape(-1, 2048).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert float(a.detach()) == pytest.approx(float(manual.detach()), rel=1e-5)


def test_variants_set_the_papers_switches():
    g, d, a = GRPOConfig.variant("grpo"), GRPOConfig.variant("dr_grpo"), GRPOConfig.variant("dapo")
    assert g.scale_rewards and g.loss_agg == "sequence" and g.eps_high == g.clip_eps
    assert not d.scale_rewards and d.loss_agg == "constant"
    assert a.loss_agg == "token" and a.eps_high == 0.28 and a.clip_eps == 0.2 and a.drop_uniform_groups and a.beta == 0
    assert GRPOConfig.variant("dapo", beta=0.01).beta == 0.01
    with pytest.raises(ValueError):
        GRPOConfig.variant("ppo")
    with pytest.raises(ValueError):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError):
        GRPOConfig(loss_agg="mean")


def test_sample_every_records_greedy_samples_without_changing_the_run():
    from workbench.rl.grpo import grpo_train
    from workbench.rl.rollout import evaluate
    from workbench.tasks import get_task

    task, tok = get_task("add"), load_tokenizer()
    small = dict(
        steps=3, prompts_per_step=2, group_size=2, inner_steps=1, max_new_tokens=6, eval_problems=3, eval_samples=1
    )
    small.update(eval_every=0, pool_size=8, warmup_steps=0, lr=1e-3, device="cpu")
    runs = []
    for every in (0, 2):
        torch.manual_seed(0)
        model = Model(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0))
        res = grpo_train(model, task, GRPOConfig(sample_every=every, sample_problems=2, **small), progress=False)
        runs.append(res)
    plain, sampled = runs[0].metrics, runs[1].metrics
    assert [("samples" in r) for r in sampled] == [False, True, True]  # every 2 steps, and after the last
    assert not any("samples" in r for r in plain)
    drop = ("samples", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in sampled] == [
        {k: v for k, v in r.items() if k not in drop} for r in plain
    ]
    last = sampled[-1]["samples"]
    assert len(last) == 2 and set(last[0]) == {"question", "completion", "accuracy", "format"}
    held_out = task.sample(2, seed=0, split="test")
    greedy = evaluate(runs[1].model, task, held_out, tok, temperature=0.0, max_new_tokens=6, return_samples=True)
    assert [(s["question"], s["completion"]) for s in last] == [(q, c) for q, c, *_ in greedy["samples"]]
    with pytest.raises(ValueError):
        GRPOConfig(sample_every=-1)
    with pytest.raises(ValueError):
        GRPOConfig(sample_problems=0)
