"""Hugging Face checkpoints: exact round trips, the name mapping, and clear errors for broken folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench import Model, ModelConfig, load_hf, save_hf
from workbench.io import hf as hf_module
from workbench.io.files import CheckpointError
from workbench.io.hf import from_hf_state_dict, to_hf_state_dict

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def _config(**changes) -> ModelConfig:
    return ModelConfig.from_preset("tiny", num_nextn_predict_layers=2, rope_scaling=YARN, **changes)


def _model(config: ModelConfig | None = None, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = Model(config or _config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
        for router in model.routers():
            router.e_score_correction_bias.normal_(0, 0.05)
    return model


def _assert_same_state(a: Model, b: Model) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def _assert_same_outputs(a: Model, b: Model) -> None:
    ids = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        oa, ob = a(ids, labels=ids), b(ids, labels=ids)
    assert torch.equal(oa.logits, ob.logits)
    assert oa.loss_parts() == ob.loss_parts()  # includes the MTP losses
    assert len(oa.mtp_losses) == a.config.num_nextn_predict_layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint (read-only: tests that break files work on copies)."""
    model = _model()
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    save_hf(model, path)
    return model, path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---- round trips ---------------------------------------------------------------------------------
def test_round_trip_is_exact(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded = load_hf(path)
    assert loaded.config == model.config
    _assert_same_state(model, loaded)
    _assert_same_outputs(model, loaded)


def test_file_layout_follows_deepseek(saved):
    model, path = saved
    L, E = model.config.num_hidden_layers, model.config.n_routed_experts
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        head_copy = f.get_tensor(f"model.layers.{L + 1}.shared_head.head.weight")
    assert {f"model.layers.1.mlp.experts.{j}.gate_proj.weight" for j in range(E)} <= names
    assert "model.layers.1.mlp.experts.gate_proj" not in names
    for k in range(2):  # MTP module k is decoder layer L + k, with copies of the embedding and head
        for leaf in ("enorm", "hnorm", "shared_head.norm", "eh_proj", "embed_tokens", "shared_head.head"):
            assert f"model.layers.{L + k}.{leaf}.weight" in names
    assert torch.equal(head_copy, model.lm_head.weight)
    assert torch.equal(bias, model.layers[1].mlp.gate.e_score_correction_bias)
    assert not any(name.startswith("mtp.") or name.startswith("layers.") for name in names)


def test_state_dict_mapping_inverts(saved):
    model, _ = saved
    hf_sd = to_hf_state_dict(model)
    assert hf_sd["model.layers.2.mlp.experts.3.up_proj.weight"].shape == (
        model.config.moe_intermediate_size,
        model.config.hidden_size,
    )
    ours = from_hf_state_dict(model.config, hf_sd)
    reference = model.state_dict()
    assert set(ours) == set(reference)
    for name, t in ours.items():
        assert torch.equal(t, reference[name]), name


def test_differing_mtp_copy_warns(saved):
    model, _ = saved
    hf_sd = dict(to_hf_state_dict(model))
    name = f"model.layers.{model.config.num_hidden_layers}.embed_tokens.weight"
    hf_sd[name] = hf_sd[name] + 1
    with pytest.warns(UserWarning, match=f"{name} is meant to be a copy of model.embed_tokens.weight"):
        from_hf_state_dict(model.config, hf_sd)


def test_mtp_copies_are_optional(saved, tmp_path):
    model, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    L = model.config.num_hidden_layers
    for k in range(2):
        del tensors[f"model.layers.{L + k}.embed_tokens.weight"]
        del tensors[f"model.layers.{L + k}.shared_head.head.weight"]
    broken = _copy(path, tmp_path / "c")
    save_file(tensors, str(broken / "model.safetensors"))
    _assert_same_state(model, load_hf(broken))


def test_sharded_round_trip(tmp_path):
    model = _model()
    limit = 100_000
    save_hf(model, tmp_path / "ckpt", max_shard_bytes=limit)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(to_hf_state_dict(model))
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        tensors = load_file(str(tmp_path / "ckpt" / shard))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1
    loaded = load_hf(tmp_path / "ckpt")
    _assert_same_state(model, loaded)
    _assert_same_outputs(model, loaded)


def test_tied_embeddings_round_trip(tmp_path):
    model = _model(_config(tie_word_embeddings=True))
    save_hf(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = load_hf(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    _assert_same_state(model, loaded)
    _assert_same_outputs(model, loaded)


def test_bfloat16_save_keeps_router_bias_float32(tmp_path):
    model = _model()
    save_hf(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    assert {d for n, d in dtypes.items() if not n.endswith("e_score_correction_bias")} == {"BF16"}
    assert {d for n, d in dtypes.items() if n.endswith("e_score_correction_bias")} == {"F32"}
    loaded = load_hf(tmp_path / "ckpt")  # default: the checkpoint's dtype
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    for router, original in zip(loaded.routers(), model.routers()):
        assert router.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(router.e_score_correction_bias, original.e_score_correction_bias)
    as_fp32 = load_hf(tmp_path / "ckpt", dtype=torch.float32)
    assert as_fp32.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(as_fp32.embed_tokens.weight, model.embed_tokens.weight.bfloat16().float())


@pytest.mark.parametrize("preset", ModelConfig.preset_names())
def test_config_round_trip(preset):
    config = ModelConfig.from_preset(preset, attn_mode="absorb", mtp_loss_weight=0.1)
    assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config


def test_overrides_drop_mtp_modules(saved):
    model, path = saved
    with pytest.warns(UserWarning, match="skipping the tensors of MTP layers"):
        loaded = load_hf(path, num_nextn_predict_layers=0)
    assert len(loaded.mtp) == 0
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# ---- broken checkpoints --------------------------------------------------------------------------
def _rewrite(path, tmp_path, edit) -> object:
    """A copy of the checkpoint whose tensors went through ``edit(dict)``."""
    broken = _copy(path, tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(broken / "model.safetensors"))
    return broken


def _load_fails(path, *patterns: str) -> str:
    before = sorted(os.listdir(path))
    with pytest.raises(CheckpointError) as info:
        load_hf(path)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in:\n{message}"
    assert sorted(os.listdir(path)) == before  # loading writes nothing
    return message


def test_missing_config(saved, tmp_path):
    _, path = saved
    broken = _copy(path, tmp_path / "b")
    (broken / "config.json").unlink()
    _load_fails(broken, "config.json")


def test_invalid_json(saved, tmp_path):
    _, path = saved
    broken = _copy(path, tmp_path / "b")
    (broken / "config.json").write_text('{"hidden_size": 96,')
    _load_fails(broken, "config.json", "not valid JSON")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_hf(tmp_path / "nowhere")


def test_missing_tensor(saved, tmp_path):
    _, path = saved
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    broken = _rewrite(path, tmp_path, lambda t: t.pop(name))
    _load_fails(broken, "missing tensors (1)", name)


def test_missing_expert(saved, tmp_path):
    _, path = saved
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    broken = _rewrite(path, tmp_path, lambda t: t.pop(name))
    _load_fails(broken, name)


def test_unexpected_tensor(saved, tmp_path):
    _, path = saved
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    broken = _rewrite(path, tmp_path, lambda t: t.__setitem__(name, torch.zeros(4)))
    _load_fails(broken, "unexpected tensors (1)", name)


def test_wrong_shape_names_both_shapes(saved, tmp_path):
    model, path = saved
    name = "model.layers.1.mlp.gate.weight"
    E, D = model.config.n_routed_experts, model.config.hidden_size
    broken = _rewrite(path, tmp_path, lambda t: t.__setitem__(name, torch.zeros(E + 1, D)))
    _load_fails(broken, name, f"expected ({E}, {D}), found ({E + 1}, {D})")


def test_all_problems_in_one_message(saved, tmp_path):
    _, path = saved

    def edit(t):
        t.pop("model.norm.weight")
        t["model.extra.weight"] = torch.zeros(2)
        t["model.layers.0.input_layernorm.weight"] = torch.zeros(3)

    message = _load_fails(_rewrite(path, tmp_path, edit), "model.norm.weight", "model.extra.weight", "input_layernorm")
    assert "missing" in message and "unexpected" in message and "wrong shape" in message


def test_truncated_file(saved, tmp_path):
    _, path = saved
    broken = _copy(path, tmp_path / "b")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    _load_fails(broken, "model.safetensors", "truncated or corrupt")


def test_missing_shard(tmp_path):
    save_hf(_model(), tmp_path / "ckpt", max_shard_bytes=100_000)
    shard = sorted(f.name for f in (tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    (tmp_path / "ckpt" / shard).unlink()
    _load_fails(tmp_path / "ckpt", shard, "missing")


def test_missing_weights(saved, tmp_path):
    _, path = saved
    broken = _copy(path, tmp_path / "b")
    (broken / "model.safetensors").unlink()
    _load_fails(broken, "neither model.safetensors nor model.safetensors.index.json")


def test_strict_false_keeps_fresh_init_with_warning(saved, tmp_path):
    model, path = saved
    name = "model.layers.0.mlp.up_proj.weight"
    broken = _rewrite(path, tmp_path, lambda t: t.pop(name))
    with pytest.warns(UserWarning, match=name):
        loaded = load_hf(broken, strict=False)
    assert torch.equal(loaded.layers[1].self_attn.o_proj.weight, model.layers[1].self_attn.o_proj.weight)


def test_unknown_quantization_is_refused(saved, tmp_path):
    _, path = saved
    broken = _copy(path, tmp_path / "b")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}  # a scheme we do not read
    (broken / "config.json").write_text(json.dumps(config))
    _load_fails(broken, "quantization_config")


# ---- failed saves leave nothing behind -----------------------------------------------------------
def test_save_under_a_file_fails_cleanly(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        save_hf(_model(), tmp_path / "file.txt" / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_failure_during_save_keeps_the_old_checkpoint(saved, tmp_path, monkeypatch):
    model, path = saved
    target = _copy(path, tmp_path / "ckpt")
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    calls = []

    def failing_save(file, tensors, metadata=None):
        calls.append(file)
        if len(calls) % 3 == 0:  # the third file of each save
            raise OSError("disk full")
        original(file, tensors, metadata=metadata)

    original = hf_module.save_tensors
    monkeypatch.setattr(hf_module, "save_tensors", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf(_model(seed=1), target, max_shard_bytes=100_000, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_hf(_model(seed=1), tmp_path / "new", max_shard_bytes=100_000)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no new folder, no temporary folder
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before


# ---- a checkpoint carries its tokenizer ---------------------------------------------------------
def test_checkpoint_carries_its_own_tokenizer(tmp_path):
    from workbench.data import generate_corpus
    from workbench.io.tokenizer import load_tokenizer, tokenizer_of, train_tokenizer

    own = train_tokenizer((d.text for d in generate_corpus(200, seed=5)), vocab_size=400)
    shipped = load_tokenizer()
    text = "Assistant: the river city had 17 lamps"
    assert own.encode(text) != shipped.encode(text)
    model = Model(ModelConfig.from_preset("tiny", vocab_size=512))
    model.tokenizer = own
    save_hf(model, tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").is_file() and (tmp_path / "m" / "tokenizer_config.json").is_file()
    loaded = load_hf(tmp_path / "m")
    assert tokenizer_of(loaded).encode(text) == own.encode(text)  # its own, never the shipped one
    assert tokenizer_of(Model(ModelConfig.from_preset("tiny"))).encode(text) == shipped.encode(text)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from workbench.io.tokenizer import load_tokenizer, tokenizer_of

    model = Model(ModelConfig.from_preset("tiny", vocab_size=300))
    with pytest.raises(ValueError, match="vocab_size is 300"):
        save_hf(model, tmp_path / "m", tokenizer=load_tokenizer())
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="2048 ids"):
        tokenizer_of(model)


def test_shipped_model_tokenizer_reads_in_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    model = load_hf(Path(__file__).resolve().parent.parent / "data" / "tiny-model")
    assert model.tokenizer is not None
    theirs = PreTrainedTokenizerFast.from_pretrained(Path(__file__).resolve().parent.parent / "data" / "tiny-model")
    text = "User: What is 4 7 + 3 8?\nAssistant:<think>"
    assert theirs.encode(text) == model.tokenizer.encode(text)
    assert theirs.bos_token_id == model.tokenizer.bos_id and theirs.pad_token_id == model.tokenizer.pad_id
