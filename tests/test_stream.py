"""The load plan, the streaming fill and layer-by-layer execution: equal to the in-memory path, exactly,
and every broken folder refused with a clear message before anything is returned."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench import Model, ModelConfig
from workbench.io.files import CheckpointError
from workbench.io.hf import from_hf_state_dict, load_hf, save_hf
from workbench.io.layered import LayeredModel
from workbench.io.plan import plan_load
from workbench.model import accounting
from workbench.model.accounting import ModelTooLarge
from workbench.model.mla import KVCache


def _model(seed: int = 0, **changes) -> Model:
    torch.manual_seed(seed)
    model = Model(ModelConfig.from_preset("tiny", num_hidden_layers=4, **changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
        for router in model.routers():
            router.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One sharded checkpoint (read-only; tests that break files work on copies)."""
    model = _model()
    path = tmp_path_factory.mktemp("stream") / "ckpt"
    save_hf(model, path, max_shard_bytes=150_000)
    return model, path


@pytest.fixture(scope="module")
def fp8_sharded(tmp_path_factory):
    model = _model(seed=1)
    path = tmp_path_factory.mktemp("stream") / "fp8"
    save_hf(model, path, dtype=torch.bfloat16, fp8=True, max_shard_bytes=150_000)
    return model, path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _write_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _in_memory(path) -> dict[str, torch.Tensor]:
    """The reference: every file read whole, experts stacked by from_hf_state_dict (no streaming)."""
    from workbench.io.fp8_layout import dequantize_state_dict_fp8

    config = ModelConfig.from_hf(path)
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if any(n.endswith("_scale_inv") for n in tensors):
        tensors = dequantize_state_dict_fp8(tensors, dtype=torch.bfloat16)
    return from_hf_state_dict(config, tensors)


# ---- streaming equals reading everything at once ---------------------------------------------------
@pytest.mark.parametrize("which", ["sharded", "fp8_sharded"])
def test_streaming_fill_equals_the_in_memory_load(which, request):
    model, path = request.getfixturevalue(which)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FP8 note
        loaded = load_hf(path)
    reference = _in_memory(path)
    state = loaded.state_dict()
    assert set(state) == set(reference)
    for name, t in reference.items():
        assert state[name].dtype == (torch.float32 if name.endswith("bias") else t.dtype), name
        assert torch.equal(state[name], t.to(state[name].dtype)), name
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert torch.equal(loaded.rope_cos, model.rope_cos) and torch.equal(loaded.rope_sin, model.rope_sin)


def test_plan_reads_headers_only_and_sizes_the_model(sharded):
    model, path = sharded
    plan = plan_load(path)
    assert plan.nbytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert len(plan.files) == len(list(path.glob("model-*.safetensors"))) > 3
    stack = plan.targets["layers.2.mlp.experts.down_proj"]
    assert sorted(p.index for p in stack.parts) == list(range(model.config.n_routed_experts))
    assert "4 layers" in plan.describe()


# ---- layer by layer --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sharded", "fp8_sharded"])
@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_layer_by_layer_matches_the_whole_model_exactly(which, mode, request):
    _, path = request.getfixturevalue(which)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = load_hf(path)
        layered = LayeredModel(path)
    ids = torch.randint(0, whole.config.vocab_size, (3, 19), generator=torch.Generator().manual_seed(4))
    whole_cache, layered_cache = KVCache(), KVCache()
    with torch.no_grad():
        expected = whole(ids, attn_mode=mode, cache=whole_cache)
    got = layered(ids, attn_mode=mode, cache=layered_cache, keep_hidden=True)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.hidden, expected.hidden) and torch.equal(got.hidden_states[-1], expected.hidden)
    assert len(got.routing) == len(expected.routing) == whole.config.n_moe_layers
    for a, b in zip(got.routing, expected.routing):
        assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.topk_weight, b.topk_weight)
        assert torch.equal(a.counts, b.counts)
    assert set(layered_cache.layers) == set(whole_cache.layers)
    for i, entries in whole_cache.layers.items():
        for key, t in entries.items():
            assert torch.equal(layered_cache.layers[i][key], t), (i, key)
    # only the embedding, the head and the norm stay; every layer went back to the meta device
    assert all(p.is_meta for p in layered.model.layers.parameters())
    assert layered.layers_loaded == whole.config.num_hidden_layers


def test_layer_by_layer_keeps_much_less_than_the_model(sharded):
    _, path = sharded
    layered = LayeredModel(path)
    assert layered.resident_bytes < 0.7 * layered.plan.nbytes
    assert "resident" in repr(layered)


def test_layer_by_layer_with_tied_embeddings_and_v2_routing(tmp_path):
    model = _model(tie_word_embeddings=True, topk_method="group_limited_greedy", scoring_func="softmax")
    for router in model.routers():
        router.e_score_correction_bias.zero_()  # V2 has none: the file then holds none either
    save_hf(model, tmp_path / "ck", max_shard_bytes=150_000)
    layered = LayeredModel(tmp_path / "ck")
    assert layered.model.lm_head.weight is layered.model.embed_tokens.weight
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(layered(ids).logits, model(ids).logits)


def test_layer_by_layer_refuses_a_checkpoint_missing_layer_tensors(sharded, tmp_path):
    _, path = sharded
    broken = _edit_first_shard(
        path, tmp_path, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight", None) is not None
    )
    index = _index(broken)
    del index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    _write_index(broken, index)
    with pytest.raises(CheckpointError, match="cannot make up the missing ones"):
        LayeredModel(broken, strict=False)


# ---- refusals: a clear message, nothing returned, nothing written ------------------------------------
def _refused(path, *patterns, **kwargs) -> str:
    before = sorted(os.listdir(path))
    with pytest.raises(CheckpointError) as info:
        load_hf(path, **kwargs)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in:\n{message}"
    assert sorted(os.listdir(path)) == before
    return message


@pytest.mark.parametrize(
    "entry, says",
    [
        ("../outside.safetensors", "outside the checkpoint folder"),
        ("/etc/passwd.safetensors", "outside the checkpoint folder"),
        ("weights.bin", ".safetensors files only"),
        ("model-09999-of-09999.safetensors", "missing from"),
    ],
)
def test_index_entries_outside_the_folder_or_missing_are_refused(sharded, tmp_path, entry, says):
    _, path = sharded
    broken = _copy(path, tmp_path / "b")
    index = _index(broken)
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = entry
    _write_index(broken, index)
    _refused(broken, says, entry)


def test_index_pointing_through_a_link_out_of_the_folder_is_refused(sharded, tmp_path):
    _, path = sharded
    broken = _copy(path, tmp_path / "b")
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    _refused(broken, "leads outside the checkpoint folder", shard.name)


def test_index_placing_a_tensor_in_the_wrong_shard_is_refused(sharded, tmp_path):
    _, path = sharded
    broken = _copy(path, tmp_path / "b")
    index = _index(broken)
    held: dict[str, list[str]] = {}
    for n, f in index["weight_map"].items():
        held.setdefault(f, []).append(n)
    full = next(f for f, names in sorted(held.items()) if len(names) > 1)  # stays listed after the move
    name, other = held[full][0], next(f for f in sorted(held) if f != full)
    index["weight_map"][name] = other
    _write_index(broken, index)
    _refused(broken, "the index places in another file", f"{name} (the index says {other}, found in {full})")
    index["weight_map"][name] = full
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = full  # a tensor that no file holds
    _write_index(broken, index)
    _refused(broken, "the index lists but its file does not hold", f"model.layers.0.mlp.extra.weight (in {full})")


def test_truncated_shard_is_refused(sharded, tmp_path):
    _, path = sharded
    broken = _copy(path, tmp_path / "b")
    shard = sorted(broken.glob("model-*.safetensors"))[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _refused(broken, shard.name, "truncated or corrupt")


def test_shapes_that_disagree_with_config_json_are_refused(sharded, tmp_path):
    _, path = sharded
    broken = _copy(path, tmp_path / "b")
    config = json.loads((broken / "config.json").read_text())
    config["moe_intermediate_size"] = 64  # the files hold 48-wide experts
    (broken / "config.json").write_text(json.dumps(config))
    message = _refused(broken, "tensors with the wrong shape", "mlp.experts.0.up_proj.weight: expected (64, 96)")
    assert "found (48, 96)" in message


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("topk_method", "random_expert", "topk_method='random_expert' is not implemented"),
        ("hidden_act", "gelu", "hidden_act='gelu' is not implemented"),
        ("moe_layer_freq", 2, "moe_layer_freq=2 is not implemented"),
        ("attention_bias", True, "attention_bias=True is not implemented"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope scaling type 'linear' is not implemented"),
        ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False},
         "truncate=false"),
    ],
)  # fmt: skip
def test_config_fields_that_change_the_math_and_are_not_implemented_are_refused(sharded, tmp_path, field, value, says):
    _, path = sharded
    broken = _copy(path, tmp_path / "b")
    config = json.loads((broken / "config.json").read_text())
    config[field] = value
    (broken / "config.json").write_text(json.dumps(config))
    _refused(broken, says, "config.json")


def _edit_first_shard(path, tmp_path, edit):
    broken = _copy(path, tmp_path / "b")
    index = _index(broken)
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(broken / shard))
        if edit(tensors):
            save_file(tensors, str(broken / shard), metadata={"format": "pt"})
            return broken
    raise AssertionError("no shard was edited")


def test_nan_weights_are_refused_by_name_unless_allowed(sharded, tmp_path):
    model, path = sharded
    name = "model.layers.1.self_attn.o_proj.weight"

    def poison(tensors):
        if name not in tensors:
            return False
        tensors[name][0, 0] = float("nan")
        tensors[name][1, 1] = float("inf")
        return True

    broken = _edit_first_shard(path, tmp_path, poison)
    plan_load(broken)  # the plan reads headers only: the values are checked while filling
    _refused(broken, name, "1 NaN and 1 infinite", "allow_bad_weights=True")
    with pytest.warns(UserWarning, match=name):
        loaded = load_hf(broken, allow_bad_weights=True)
    assert torch.isnan(loaded.layers[1].self_attn.o_proj.weight[0, 0])


def test_integer_weights_are_refused_unless_allowed(sharded, tmp_path):
    _, path = sharded
    name = "model.layers.0.mlp.up_proj.weight"

    def to_int(tensors):
        if name not in tensors:
            return False
        tensors[name] = tensors[name].round().to(torch.int32)
        return True

    broken = _edit_first_shard(path, tmp_path, to_int)
    _refused(broken, "integer or boolean", f"{name}: I32")
    with pytest.warns(UserWarning, match="casting integer"):
        loaded = load_hf(broken, allow_bad_weights=True)
    assert loaded.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_an_inactive_experts_minus_inf_bias_is_not_a_bad_weight(tmp_path):
    """A grown model writes -inf at inactive experts' bias so that nobody routes there: it loads."""
    model = _model()
    model.grow_experts(2, live_layers=[1])
    save_hf(model, tmp_path / "grown", max_shard_bytes=150_000)
    loaded = load_hf(tmp_path / "grown")
    bias = loaded.layers[2].mlp.gate.e_score_correction_bias
    assert torch.isneginf(bias).sum() == 2 and loaded.config.inactive_experts == model.config.inactive_experts


def test_fp8_weight_without_its_scale_is_refused(fp8_sharded, tmp_path):
    _, path = fp8_sharded
    scale = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"

    def drop(tensors):
        return tensors.pop(scale, None) is not None

    broken = _edit_first_shard(path, tmp_path, drop)
    index = _index(broken)
    del index["weight_map"][scale]
    _write_index(broken, index)
    _refused(broken, f"{scale} is missing")


# ---- memory: refused before anything is allocated ----------------------------------------------------
def test_a_model_too_big_for_memory_is_refused_before_allocation(sharded, monkeypatch):
    _, path = sharded
    with pytest.raises(ModelTooLarge, match=r"needs .* but cpu has .* available"):
        Model(ModelConfig.from_preset("deepseek-v3"))  # 2.5 TiB in float32: more than any CPU here
    monkeypatch.setattr(accounting, "available_memory", lambda device: 100_000)
    with pytest.raises(ModelTooLarge, match="layer at a time") as info:
        load_hf(path)
    assert "the checkpoint" in str(info.value) and "97.7 KiB available" in str(info.value)
    with pytest.raises(ModelTooLarge, match="layer-by-layer execution"):
        LayeredModel(path)
    monkeypatch.setattr(accounting, "available_memory", lambda device: 2_500_000)
    layered = LayeredModel(path)  # the embedding, the head and one layer fit where the model does not
    assert layered.resident_bytes < 2_500_000 < layered.plan.nbytes


def test_streaming_load_onto_the_meta_device_is_never_refused(sharded):
    _, path = sharded
    plan = plan_load(path, device="meta")
    assert plan.nbytes > 0


@pytest.mark.parametrize("rows", [None, (0, 150), (150, 300), (37, 129)])
def test_block_row_dequantisation_equals_the_whole_tensor_one(rows):
    """The streaming fill dequantises one 128-row block at a time (and half of a fused gate_up_proj, whose
    halves need not fall on block edges); the values are those of fp8.formats.dequantize, exactly."""
    from workbench.fp8.formats import dequantize
    from workbench.io.fp8_layout import _quantize_matrices
    from workbench.io.stream import _dequantize_into

    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, s = _quantize_matrices(w, (128, 128), pow2_scale=False)
    expected = dequantize(q, s, (128, 128), torch.bfloat16)
    r0, r1 = rows or (0, 300)
    dest = torch.empty(r1 - r0, 200, dtype=torch.bfloat16)
    _dequantize_into(dest, q, s, (128, 128), rows)
    assert torch.equal(dest, expected[r0:r1])


def test_info_checks_a_download_from_its_headers(sharded, tmp_path, capsys):
    from workbench.cli import main

    _, path = sharded
    assert main(["info", "--checkpoint", str(path), "--check-files"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"]["files"] > 3 and "4 layers" in report["checkpoint"]["plan"]
    broken = _copy(path, tmp_path / "b")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["info", "--checkpoint", str(broken), "--check-files"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
