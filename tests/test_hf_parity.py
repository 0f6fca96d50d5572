"""Logits parity with transformers' DeepseekV3ForCausalLM, through checkpoints written both ways.

Direction 1: transformers builds a model with random weights, ``save_pretrained`` writes it, and
``load_hf`` reads it. Direction 2: ``save_hf`` writes our model and transformers' ``from_pretrained``
reads it. Either way both models must give the same logits (fp32, max abs diff <= 1e-4) for our
naive and absorbed attention. transformers runs with ``attn_implementation="eager"``.

The configs cover group-limited routing, query compression on and off, 0/1/2 dense layers, YaRN
with several mscale settings, tied and untied embeddings, non-default routed_scaling_factor and
rms_norm_eps, and a random non-zero balancing bias (so routing really depends on it). Weights are
drawn with a larger std than the default so that a wrong connection would show in the logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from workbench import Model, ModelConfig  # noqa: E402
from workbench.io.files import CheckpointError  # noqa: E402
from workbench.io.hf import load_hf, save_hf  # noqa: E402

TOL = 1e-4
SEQ = 24  # longer than YaRN's original context below, so interpolation is exercised

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
    routed_scaling_factor=1.7,
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


def _yarn(mscale: float | None, mscale_all_dim: float | None) -> dict:
    rs = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}
    if mscale is not None:
        rs["mscale"] = mscale
    if mscale_all_dim is not None:
        rs["mscale_all_dim"] = mscale_all_dim
    return rs


CONFIGS = {
    "groups": {},
    "no_q_lora_all_moe_tied": dict(q_lora_rank=None, first_k_dense_replace=0, tie_word_embeddings=True),
    "two_dense_yarn_v3": dict(first_k_dense_replace=2, rope_scaling=_yarn(1.0, 1.0)),
    "yarn_mscale_0707": dict(rope_scaling=_yarn(0.707, 1.0), routed_scaling_factor=2.5, rms_norm_eps=1e-5),
    "yarn_all_dim_0707": dict(rope_scaling=_yarn(1.0, 0.707), q_lora_rank=None),
    "yarn_plain": dict(rope_scaling=_yarn(None, None), n_group=1, topk_group=1, norm_topk_prob=False),
    "two_shared_experts": dict(n_shared_experts=2, num_experts_per_tok=2, n_group=2, topk_group=1),
}


def _config(name: str, **extra) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name], **extra})


def _randomize_hf(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Non-trivial norms and a non-zero balancing bias on top of transformers' random init."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _randomize_ours(model: Model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for router in model.routers():
            router.e_score_correction_bias.copy_(0.1 * torch.randn(router.n_experts, generator=g))


def _hf_model(config: ModelConfig, seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    hf_config = DeepseekV3Config(**config.to_hf())
    hf_config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(hf_config).eval()
    _randomize_hf(model, seed)
    return model


def _their_logits(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _our_logits(model: Model, ids: torch.Tensor, mode: str) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attn_mode=mode, compute_mtp=False).logits


def _assert_parity(ours: Model, theirs: DeepseekV3ForCausalLM, seed: int) -> dict[str, float]:
    ids = torch.randint(0, ours.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    reference = _their_logits(theirs, ids)
    assert reference.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    diffs = {}
    for mode in ("naive", "absorb"):
        diff = (_our_logits(ours, ids, mode) - reference).abs().max().item()
        diffs[mode] = diff
        assert diff <= TOL, f"{mode}: max abs logit difference {diff:.2e} > {TOL}"
    return diffs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_their_checkpoint_loads_with_same_logits(name, tmp_path):
    """transformers' own folder, as save_pretrained writes it (config.json says num_nextn_predict_layers=1,
    no MTP tensors), loads with the default call: the main model exactly, the MTP module dropped."""
    config = _config(name, num_nextn_predict_layers=1)
    seed = sorted(CONFIGS).index(name)
    theirs = _hf_model(config, seed)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds no tensor of the MTP layers") as caught:
        ours = load_hf(tmp_path)
    assert sum("MTP" in str(w.message) for w in caught) == 1  # one clear warning
    assert ours.config == config.replace(attn_mode=ours.config.attn_mode, num_nextn_predict_layers=0)
    assert any(r.e_score_correction_bias.abs().sum() > 0 for r in ours.routers())
    _assert_parity(ours, theirs, seed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_checkpoint_loads_in_transformers_with_same_logits(name, tmp_path):
    config = _config(name, num_nextn_predict_layers=1)  # our MTP layer is written; they skip it
    seed = 100 + sorted(CONFIGS).index(name)
    torch.manual_seed(seed)
    ours = Model(config).eval()
    _randomize_ours(ours, seed)
    save_hf(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, info = DeepseekV3ForCausalLM.from_pretrained(
            tmp_path, attn_implementation="eager", output_loading_info=True
        )
    theirs.eval()
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    unexpected = {k for k in info["unexpected_keys"] if not k.startswith(f"model.layers.{config.num_hidden_layers}.")}
    assert not unexpected, unexpected
    _assert_parity(ours, theirs, seed)


def test_routing_bias_matters():
    """The comparison is sensitive to the balancing bias: zeroing it changes the logits."""
    config = _config("groups")
    theirs = _hf_model(config, 7)
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))
    before = _their_logits(theirs, ids)
    for module in theirs.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.zero_()
    assert (_their_logits(theirs, ids) - before).abs().max() > 10 * TOL


def test_their_folder_without_mtp_tensors_drops_or_initialises_mtp(tmp_path):
    """transformers writes num_nextn_predict_layers=1 but no MTP tensors: dropped by default, fresh modules
    when asked, a refusal that says what to do when that is asked for."""
    config = _config("groups", num_nextn_predict_layers=1)
    theirs = _hf_model(config, 3)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"model\.layers\.3 although config\.json declares num_nextn_predict_layers=1"):
        dropped = load_hf(tmp_path)
    assert len(dropped.mtp) == 0 and dropped.config.num_nextn_predict_layers == 0
    _assert_parity(dropped, theirs, 3)
    with pytest.warns(UserWarning, match="keep a fresh initialisation"):
        fresh = load_hf(tmp_path, missing_mtp="init")
    assert len(fresh.mtp) == 1
    assert fresh.mtp[0].eh_proj.weight.std() > 0  # initialised, not left empty
    _assert_parity(fresh, theirs, 3)
    with pytest.raises(CheckpointError, match="missing_mtp='drop'"):
        load_hf(tmp_path, missing_mtp="error")
    explicit = load_hf(tmp_path, num_nextn_predict_layers=0)  # asked for no MTP: nothing to warn about
    assert len(explicit.mtp) == 0


def test_fused_expert_checkpoint_loads(tmp_path):
    """save_pretrained(save_original_format=False) keeps transformers' fused gate_up_proj."""
    config = _config("groups")
    theirs = _hf_model(config, 5)
    theirs.save_pretrained(tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in set(f.keys())
    _assert_parity(load_hf(tmp_path), theirs, 5)


def test_our_config_json_is_understood_by_transformers(tmp_path):
    config = _config("yarn_mscale_0707", num_nextn_predict_layers=1)
    save_hf(Model(config), tmp_path)
    hf = DeepseekV3Config.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_type"] == "yarn"
    for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "beta_fast"):
        assert hf.rope_parameters[key] == config.rope_scaling[key]
    assert hf.rope_parameters["rope_theta"] == config.rope_theta
    assert hf.num_nextn_predict_layers == 1 and hf.q_lora_rank == config.q_lora_rank
    # and their config, re-saved, reads back as ours
    hf.save_pretrained(tmp_path / "resaved")
    assert ModelConfig.from_hf(tmp_path / "resaved") == config
