"""DeepSeek-V2 (and V2-Lite) parity with transformers' DeepseekV2ForCausalLM, both directions.

V2 routes differently from V3: softmax affinities, no balancing bias, and either plain top-k
(``topk_method="greedy"``, V2-Lite) or group-limited top-k whose groups are scored by their *best* expert
(``"group_limited_greedy"``, V2-236B), with no renormalisation of the gate weights and a scaling factor
of 16 (V2) or 1 (V2-Lite). Direction 1: transformers builds a random V2 model, ``save_pretrained`` writes
it and ``load_hf`` reads it; direction 2: ``save_hf`` writes our V2-routed model and transformers'
``from_pretrained`` reads it. The logits must agree to 1e-4 in fp32 in both attention modes. The configs
cover greedy and group-limited routing, query compression on and off, YaRN with V2-Lite's mscale, two
shared experts and 0/1/2 dense layers. A last test checks that the comparison can fail: scoring V2's
groups the V3 way changes the logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402

from workbench import Model, ModelConfig  # noqa: E402
from workbench.io.hf import load_hf, save_hf  # noqa: E402

TOL = 1e-4
SEQ = 24

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    topk_method="group_limited_greedy",
    scoring_func="softmax",
    norm_topk_prob=False,
    routed_scaling_factor=16.0,
    num_attention_heads=2,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=64,
    initializer_range=0.15,
    num_nextn_predict_layers=0,
)
LITE_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
             "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip

CONFIGS = {
    "v2_group_limited": {},
    "v2_group_limited_no_q_lora": dict(q_lora_rank=None, first_k_dense_replace=0),
    "v2_lite_greedy": dict(topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, q_lora_rank=None,
                           n_shared_experts=2, rope_scaling=LITE_YARN),
    "v2_greedy_ignores_groups": dict(topk_method="greedy", num_experts_per_tok=4, first_k_dense_replace=2),
    "v2_group_limited_yarn": dict(rope_scaling=LITE_YARN, n_group=2, topk_group=1, num_experts_per_tok=2),
}  # fmt: skip


def _config(name: str, **extra) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name], **extra})


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _hf_model(config: ModelConfig, seed: int) -> DeepseekV2ForCausalLM:
    torch.manual_seed(seed)
    hf_config = DeepseekV2Config(**config.to_hf())
    hf_config._attn_implementation = "eager"
    model = DeepseekV2ForCausalLM(hf_config).eval()
    _randomize_norms(model, seed)
    return model


def _ids(config: ModelConfig, seed: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _assert_parity(ours: Model, theirs: DeepseekV2ForCausalLM, seed: int) -> dict[str, float]:
    ids = _ids(ours.config, seed)
    with torch.no_grad():
        reference = theirs(input_ids=ids, use_cache=False).logits
    assert reference.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    diffs = {}
    for mode in ("naive", "absorb"):
        with torch.no_grad():
            diff = (ours(ids, attn_mode=mode).logits - reference).abs().max().item()
        diffs[mode] = diff
        assert diff <= TOL, f"{mode}: max abs logit difference {diff:.2e} > {TOL}"
    return diffs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_their_v2_checkpoint_loads_with_same_logits(name, tmp_path):
    config = _config(name)
    seed = sorted(CONFIGS).index(name)
    theirs = _hf_model(config, seed)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.topk_method == config.topk_method and ours.config.scoring_func == "softmax"
    assert ours.config == config.replace(attn_mode=ours.config.attn_mode)
    assert all(not r.e_score_correction_bias.any() for r in ours.routers())  # V2 has no balancing bias
    _assert_parity(ours, theirs, seed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_v2_checkpoint_loads_in_transformers_with_same_logits(name, tmp_path):
    config = _config(name)
    seed = 100 + sorted(CONFIGS).index(name)
    torch.manual_seed(seed)
    ours = Model(config).eval()
    _randomize_norms(ours, seed)
    save_hf(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, info = DeepseekV2ForCausalLM.from_pretrained(
            tmp_path, attn_implementation="eager", output_loading_info=True
        )
    theirs.eval()
    assert theirs.config.topk_method == config.topk_method
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]  # no bias written: V2 has none
    _assert_parity(ours, theirs, seed)


def test_v2_group_score_is_the_best_expert_not_the_top_two():
    """The oracle can tell the rules apart: scoring V2's groups by their top-2 sum (V3's rule, what a V2
    config got before topk_method was read) changes the routing and the logits of a V2 model."""
    config = _config("v2_group_limited", n_group=4, topk_group=1, num_experts_per_tok=2)
    theirs = _hf_model(config, 11)
    ours = Model(config).eval()
    ours.load_state_dict(_ours_from(theirs, config))
    v3_rule = Model(config.replace(topk_method="noaux_tc")).eval()
    v3_rule.load_state_dict(ours.state_dict())
    ids = _ids(config, 11)
    with torch.no_grad():
        reference = theirs(input_ids=ids, use_cache=False).logits
        right, wrong = ours(ids), v3_rule(ids)
    assert (right.logits - reference).abs().max() <= TOL
    changed = sum(int((a.topk_idx.sort(-1).values != b.topk_idx.sort(-1).values).any(-1).sum())
                  for a, b in zip(right.routing, wrong.routing))  # fmt: skip
    assert changed > 0
    assert (wrong.logits - reference).abs().max() > 100 * TOL


def _ours_from(theirs: DeepseekV2ForCausalLM, config: ModelConfig) -> dict[str, torch.Tensor]:
    from workbench.io.hf import from_hf_state_dict

    sd = {k: v for k, v in theirs.state_dict().items() if "rotary" not in k}
    ours = from_hf_state_dict(config, sd)
    for router in [k for k in Model(config).state_dict() if k.endswith("e_score_correction_bias")]:
        ours[router] = torch.zeros(config.n_routed_experts)
    return ours


def test_published_v2_configs_read_as_published():
    """DeepSeek-V2's and V2-Lite's published config.json fields (those that shape the model) read as V2's
    routing, with the training-only fields named in one note."""
    v2 = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 2, "n_routed_experts": 160,
        "ep_size": 1, "routed_scaling_factor": 16.0, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "group_limited_greedy",
        "n_group": 8, "topk_group": 3, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.003, "seq_aux": True,
        "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
        "use_cache": True, "pad_token_id": None, "bos_token_id": 100000, "eos_token_id": 100001,
        "pretraining_tp": 1, "tie_word_embeddings": False, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16",
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"},
    }  # fmt: skip
    with pytest.warns(UserWarning, match=r"aux_loss_alpha=0\.003.*seq_aux=True") as caught:
        config = ModelConfig.from_hf(v2)
    assert len(caught) == 1
    assert (config.topk_method, config.scoring_func, config.norm_topk_prob) == (
        "group_limited_greedy",
        "softmax",
        False,
    )
    assert (config.n_group, config.topk_group, config.routed_scaling_factor) == (8, 3, 16.0)
    assert config.num_nextn_predict_layers == 0 and config.q_lora_rank == 1536
    lite = dict(v2, hidden_size=2048, num_hidden_layers=27, n_routed_experts=64, moe_intermediate_size=1408,
                intermediate_size=10944, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                aux_loss_alpha=0.001)  # fmt: skip
    with pytest.warns(UserWarning):
        lite_config = ModelConfig.from_hf(lite)
    assert lite_config.topk_method == "greedy" and lite_config.q_lora_rank is None
    from workbench.model.accounting import count_params

    counts = count_params(lite_config)
    assert 15.5e9 < counts["total"] < 16.0e9  # V2-Lite: 15.7B total
    # and 2.4B activated: DeepSeek's figure leaves out the embedding (a lookup, not a matmul)
    assert 2.3e9 < counts["active"] - counts["breakdown"]["embedding"] < 2.5e9
    assert 234e9 < count_params(config)["total"] < 238e9  # V2: 236B total


def test_a_v2_model_with_a_balancing_bias_saves_it_and_says_transformers_ignores_it(tmp_path):
    config = _config("v2_group_limited")
    ours = Model(config).eval()
    for router in ours.routers():
        router.e_score_correction_bias.normal_(0, 0.05)
    with pytest.warns(UserWarning, match="will ignore it"):
        save_hf(ours, tmp_path)
    back = load_hf(tmp_path)
    for a, b in zip(back.routers(), ours.routers()):
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)
