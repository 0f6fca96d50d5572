"""FP8 checkpoints in DeepSeek's and transformers' layout: quantize_state_dict_fp8 / dequantize_state_dict_fp8.

The layout (DeepSeek-V3's released checkpoints; transformers 5 reads it with ``FineGrainedFP8Config``):
every linear layer's weight is float8_e4m3fn with a float32 sibling ``<name>_scale_inv`` of shape
[ceil(out / 128), ceil(in / 128)], W = W_fp8 * scale_inv over each 128x128 block (partial blocks at the
edges). The embedding, lm_head, norms, the router ``mlp.gate.weight`` and ``e_score_correction_bias`` stay
in high precision, and config.json carries ``quantization_config``. Where transformers states this in its
source (transformers/integrations/finegrained_fp8.py: ``FP8Linear.__init__`` allocates
``weight_scale_inv`` as (ceil(out / bs0), ceil(in / bs1)); ``Fp8Quantize._quantize_one`` names the scale
``<name>_scale_inv``; ``replace_with_fp8_linear`` converts every ``nn.Linear`` but ``lm_head`` and the
experts; quantizers/quantizer_finegrained_fp8.py dequantises on load where there is no GPU) the tests
below check against that code itself rather than a transcription of it.

Directions covered: our quantised tensors against transformers' FP8 modules (names, dtypes, shapes),
transformers' config reading our ``quantization_config``, transformers' quantiser output and a
checkpoint built by hand read by our dequantiser, our checkpoint read by transformers'
``from_pretrained`` (needs ``accelerate``; skipped without it), and the errors bad inputs raise.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workbench import Model, ModelConfig, fp8
from workbench.io import fp8_layout
from workbench.io.files import load_tensors, save_tensors
from workbench.io.hf import from_hf_state_dict, to_hf_state_dict

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.integrations.finegrained_fp8 import (  # noqa: E402
    Fp8Dequantize,
    Fp8Quantize,
    _dequantize_fp8_weight,
    replace_with_fp8_linear,
)
from transformers.utils.quantization_config import FineGrainedFP8Config  # noqa: E402

# Every width is a multiple of 128 or below 128: transformers' Fp8Dequantize infers the block from the
# weight and scale shapes (rows // scale_rows), which equals DeepSeek's 128 only for such widths.
CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    intermediate_size=256,
    moe_intermediate_size=64,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    num_attention_heads=2,
    q_lora_rank=64,
    kv_lora_rank=96,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    max_position_embeddings=64,
    initializer_range=0.1,
    num_nextn_predict_layers=1,
)
HIGH_PRECISION = ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layernorm.weight", "mlp.gate.weight",
                  "e_score_correction_bias", "enorm.weight", "hnorm.weight", "shared_head.head.weight")  # fmt: skip


def make_model(seed: int = 0, **changes) -> Model:
    torch.manual_seed(seed)
    model = Model(ModelConfig(**{**CONFIG, **changes})).eval()
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.normal_(0.0, 0.1)  # routing really depends on it
    return model


def hf_state_dict(model: Model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in to_hf_state_dict(model).items()}


def block_reference(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight quantisation written out block by block: scale_inv = amax / 448 per block,
    W_fp8 = cast(W / scale_inv); partial blocks at the right and bottom edges."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            amax = tile.abs().max()
            s[i, j] = amax / 448 if amax > 0 else 1.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def block_dequant_reference(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek's weight_dequant (inference/kernel.py): y = x * s for each 128x128 block."""
    y = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            y[rows, cols] = q[rows, cols].float() * s[i, j]
    return y


def write_checkpoint(folder: Path, config: ModelConfig, tensors: dict[str, torch.Tensor], quantized: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf()
    if quantized:
        hf["quantization_config"] = dict(fp8_layout.FP8_QUANTIZATION_CONFIG)
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    save_tensors(folder / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()}, {"format": "pt"})
    return folder


def logits(model: Model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# Our layout -------------------------------------------------------------------------------------
def test_quantized_state_dict_has_deepseeks_layout():
    sd = hf_state_dict(make_model())
    q = fp8_layout.quantize_state_dict_fp8(sd)
    fp8_names = {n for n, t in q.items() if t.dtype == torch.float8_e4m3fn}
    scales = {n for n in q if n.endswith("_scale_inv")}
    assert scales == {f"{n}_scale_inv" for n in fp8_names}
    assert set(q) == set(sd) | scales  # nothing renamed, nothing dropped
    for name, t in sd.items():
        if name.endswith(HIGH_PRECISION):
            assert q[name] is t, f"{name} must stay in high precision"
        else:
            assert name in fp8_names, f"{name} is a linear weight and must be FP8"
            assert q[name].shape == t.shape
            scale = q[f"{name}_scale_inv"]
            assert scale.dtype == torch.float32
            assert tuple(scale.shape) == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
    # the MTP layer's linear (eh_proj) and every routed expert are FP8, as in DeepSeek-V3's files
    assert "model.layers.2.eh_proj.weight" in fp8_names
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in fp8_names
    assert q["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_block_scales_and_codes_match_a_block_by_block_reference():
    # 300 x 200: partial blocks at both edges, scale grid (3, 2)
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    w[5, 7] = 40.0  # an outlier: only its own block's scale changes
    q = fp8_layout.quantize_state_dict_fp8({"model.layers.0.mlp.down_proj.weight": w})
    ref_q, ref_s = block_reference(w)
    torch.testing.assert_close(q["model.layers.0.mlp.down_proj.weight_scale_inv"], ref_s, rtol=0, atol=0)
    assert torch.equal(q["model.layers.0.mlp.down_proj.weight"].view(torch.uint8), ref_q.view(torch.uint8))
    back = fp8_layout.dequantize_state_dict_fp8(q)["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(back, block_dequant_reference(ref_q, ref_s), rtol=0, atol=0)
    # E4M3 rounds to nearest: at most 2^-4 of a value, plus half a subnormal step of its block's scale
    s_el = ref_s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert ((back - w).abs() <= 2**-4 * w.abs() + 2**-10 * s_el + 1e-7).all()


def test_stacked_experts_get_one_scale_grid_per_expert():
    gate_up = torch.randn(4, 256, 128, generator=torch.Generator().manual_seed(1))  # transformers' fused (E, 2I, D)
    q = fp8_layout.quantize_state_dict_fp8({"model.layers.1.mlp.experts.gate_up_proj": gate_up})
    scale = q["model.layers.1.mlp.experts.gate_up_proj_scale_inv"]
    assert scale.shape == (4, 2, 1)
    for e in range(4):
        ref_q, ref_s = block_reference(gate_up[e])
        torch.testing.assert_close(scale[e], ref_s, rtol=0, atol=0)
        assert torch.equal(q["model.layers.1.mlp.experts.gate_up_proj"][e].view(torch.uint8), ref_q.view(torch.uint8))
    back = fp8_layout.dequantize_state_dict_fp8(q)["model.layers.1.mlp.experts.gate_up_proj"]
    assert back.shape == gate_up.shape and ((back - gate_up).norm() / gate_up.norm()) < 0.05


def test_our_tensors_match_transformers_fp8_modules():
    """transformers' own FP8 model (built on meta, the way from_pretrained builds it for an FP8 checkpoint)
    holds exactly the names, dtypes and shapes we write, fused experts included. (Files hold one tensor
    per expert; in memory transformers fuses gate and up into gate_up_proj and allocates its scale grid
    as gate's and up's grids stacked, at least 2 rows, FP8Experts.__init__: that equals one grid over
    the fused rows when moe_intermediate_size is a multiple of 128, as in DeepSeek-V3's 2048.)"""
    model = make_model(num_nextn_predict_layers=0, moe_intermediate_size=128)
    hf = model.config.to_hf()
    hf["quantization_config"] = dict(fp8_layout.FP8_QUANTIZATION_CONFIG)
    with torch.device("meta"):
        theirs = DeepseekV3ForCausalLM(DeepseekV3Config(**hf))
    qc = FineGrainedFP8Config(**hf["quantization_config"])
    replace_with_fp8_linear(theirs, modules_to_not_convert=["lm_head"], quantization_config=qc, pre_quantized=True)
    their_sd = {n: (t.dtype, tuple(t.shape)) for n, t in theirs.state_dict().items()}

    ours = hf_state_dict(model)
    for i in range(model.config.first_k_dense_replace, model.config.num_hidden_layers):  # fuse like transformers
        prefix = f"model.layers.{i}.mlp.experts"
        E = model.config.n_routed_experts
        gate = [ours.pop(f"{prefix}.{j}.gate_proj.weight") for j in range(E)]
        up = [ours.pop(f"{prefix}.{j}.up_proj.weight") for j in range(E)]
        down = [ours.pop(f"{prefix}.{j}.down_proj.weight") for j in range(E)]
        ours[f"{prefix}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        ours[f"{prefix}.down_proj"] = torch.stack(down)
    our_sd = {n: (t.dtype, tuple(t.shape)) for n, t in fp8_layout.quantize_state_dict_fp8(ours).items()}
    assert our_sd == their_sd


# transformers reads what we write ---------------------------------------------------------------
def test_transformers_config_accepts_our_quantization_config(tmp_path):
    from transformers.quantizers.auto import AutoQuantizationConfig

    model = make_model()
    folder = write_checkpoint(tmp_path / "ckpt", model.config, fp8_layout.quantize_state_dict_fp8(hf_state_dict(model)))
    config_json = json.loads((folder / "config.json").read_text())
    assert config_json["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    for config in (DeepseekV3Config(**config_json), DeepseekV3Config.from_pretrained(folder)):
        qc = AutoQuantizationConfig.from_dict(config.quantization_config)
        assert isinstance(qc, FineGrainedFP8Config)
        assert qc.quant_method == "fp8" and list(qc.weight_block_size) == [128, 128]
        assert qc.activation_scheme == "dynamic" and qc.scale_fmt == "float"
    assert fp8_layout.check_quantization_config(config_json["quantization_config"]) == (128, 128)


def test_transformers_dequantises_our_tensors_as_we_do():
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(2))
    q = fp8_layout.quantize_state_dict_fp8({"x.weight": w})
    ours = fp8_layout.dequantize_state_dict_fp8(q)["x.weight"]
    theirs = Fp8Dequantize(None)._dequantize_one(q["x.weight"], q["x.weight_scale_inv"], output_dtype=torch.float32)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    # partial blocks: transformers' backward-pass dequantiser takes the block size explicitly
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))
    q = fp8_layout.quantize_state_dict_fp8({"x.weight": w})
    theirs = _dequantize_fp8_weight(q["x.weight"], q["x.weight_scale_inv"], [128, 128], torch.float32)
    torch.testing.assert_close(theirs, fp8_layout.dequantize_state_dict_fp8(q)["x.weight"], rtol=0, atol=0)


def test_transformers_loads_our_fp8_checkpoint(tmp_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load any quantized checkpoint")
    model = make_model(num_nextn_predict_layers=0)
    quantized = fp8_layout.quantize_state_dict_fp8(hf_state_dict(model))
    folder = write_checkpoint(tmp_path / "ckpt", model.config, quantized)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no GPU: transformers dequantises on load (FineGrainedFP8HfQuantizer.validate_environment)
        theirs = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    reference = make_model(num_nextn_predict_layers=0)
    reference.load_state_dict(from_hf_state_dict(reference.config, fp8_layout.dequantize_state_dict_fp8(quantized)))
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


# We read what DeepSeek and transformers write -----------------------------------------------------
def test_transformers_quantiser_output_reads_back():
    """Tensors made by transformers' own Fp8Quantize (the op its save path runs): our dequantiser
    gives exactly what its Fp8Dequantize gives, for a linear weight and fused experts."""
    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128])))
    gen = torch.Generator().manual_seed(5)
    for name, shape in (("a.q_b_proj.weight", (256, 384)), ("a.mlp.experts.gate_up_proj", (3, 256, 128))):
        theirs = quantizer._quantize_one(name, torch.randn(*shape, generator=gen))
        assert set(theirs) == {name, f"{name}_scale_inv"}  # the naming we follow
        ours = fp8_layout.dequantize_state_dict_fp8(theirs)[name]
        expected = Fp8Dequantize(None)._dequantize_one(
            theirs[name], theirs[f"{name}_scale_inv"], output_dtype=torch.float32
        )
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_checkpoint_built_by_hand_in_deepseeks_layout_loads(tmp_path):
    """A folder written block by block, as DeepSeek lays out V3: FP8 weights with *_scale_inv siblings,
    embedding / head / norms / router / bias in high precision, and DeepSeek's quantization_config."""
    model = make_model()
    by_hand: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, t in hf_state_dict(model).items():
        if name.endswith(HIGH_PRECISION):
            by_hand[name] = dequantized[name] = t.to(torch.bfloat16) if "bias" not in name else t.float()
            continue
        q, s = block_reference(t)
        by_hand[name], by_hand[f"{name}_scale_inv"] = q, s
        dequantized[name] = block_dequant_reference(q, s)
    folder = write_checkpoint(tmp_path / "deepseek", model.config, by_hand)
    config_json = json.loads((folder / "config.json").read_text())
    stored = load_tensors(folder / "model.safetensors")
    assert fp8_layout.is_fp8_checkpoint(config_json, stored)
    block = fp8_layout.check_quantization_config(config_json["quantization_config"])
    ours = fp8_layout.dequantize_state_dict_fp8(stored, dtype=torch.float32, block=block)
    assert set(ours) == set(dequantized)
    for name, t in dequantized.items():
        torch.testing.assert_close(ours[name].float(), t.float(), rtol=0, atol=0)
    loaded = make_model(seed=9)
    loaded.load_state_dict(from_hf_state_dict(loaded.config, {n: t.float() for n, t in ours.items()}))
    expected = make_model(seed=9)
    expected.load_state_dict(from_hf_state_dict(expected.config, {n: t.float() for n, t in dequantized.items()}))
    torch.testing.assert_close(logits(loaded), logits(expected), rtol=0, atol=0)


def test_round_trip_through_a_file_keeps_the_model_close(tmp_path, small_dataset):
    """The shipped trained tiny model, written in FP8 and read back: every weight within E4M3's error,
    the same next token almost everywhere, the loss almost unchanged, and a smaller file."""
    from workbench import load_hf

    model = load_hf(Path(__file__).resolve().parents[1] / "data" / "tiny-model")
    quantized = fp8_layout.quantize_state_dict_fp8(hf_state_dict(model))
    folder = write_checkpoint(tmp_path / "ckpt", model.config, quantized)
    stored = load_tensors(folder / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn  # safetensors keeps FP8
    back = Model(model.config).eval()
    back.load_state_dict(from_hf_state_dict(back.config, fp8_layout.dequantize_state_dict_fp8(stored)))
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12)) < 0.04, name  # RMS ~2.6%
    batches = [ids for ids, _ in small_dataset.eval_batches(4, 128, 4)]
    report = fp8.top1_agreement(model, back, batches)
    assert report["agreement"] > 0.95  # measured 98.6% on 4096 tokens
    assert abs(report["rel_loss_change"]) < 0.005  # measured +0.05%
    size, full = sum(t.nbytes for t in stored.values()), sum(t.nbytes for t in hf_state_dict(model).values())
    assert size < 0.75 * full  # measured 59% of FP32 (in the tiny model the FP32 embedding and head are big)


def test_detection_and_the_note():
    assert fp8_layout.is_fp8_checkpoint({"quantization_config": dict(fp8_layout.FP8_QUANTIZATION_CONFIG)}, [])
    assert fp8_layout.is_fp8_checkpoint({}, ["model.layers.0.mlp.up_proj.weight_scale_inv"])
    assert not fp8_layout.is_fp8_checkpoint({"quantization_config": None}, ["model.norm.weight"])
    note = fp8_layout.fp8_dequantized_note("ckpt", 12, torch.bfloat16, "cpu")
    assert "dequantised to bfloat16" in note and "no FP8 matmul" in note and "12 tensors" in note


# Bad inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(bad):
    w = torch.randn(64, 64)
    w[3, 4] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: 1 NaN/inf"):
        fp8_layout.quantize_state_dict_fp8(
            {"model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": torch.ones(64)}
        )


def test_bad_fp8_checkpoints_raise_clear_errors():
    good = fp8_layout.quantize_state_dict_fp8({"a.weight": torch.randn(300, 200), "b.weight": torch.randn(64, 64)})

    def problems(**changes) -> str:
        sd = {**good, **changes}
        for name in [n for n, v in changes.items() if v is None]:
            del sd[name]
        with pytest.raises(ValueError) as info:
            fp8_layout.dequantize_state_dict_fp8(sd)
        return str(info.value)

    assert "a.weight_scale_inv: shape (2, 2), but a.weight (300, 200) in blocks of 128x128 needs (3, 2)" in problems(
        **{"a.weight_scale_inv": torch.ones(2, 2)}
    )
    assert "a.weight: stored in torch.float8_e4m3fn but a.weight_scale_inv is missing" in problems(
        **{"a.weight_scale_inv": None}
    )
    assert "c.weight_scale_inv: a scale without its weight c.weight" in problems(
        **{"c.weight_scale_inv": torch.ones(1, 1)}
    )
    assert "its weight c.weight is torch.float32, not FP8" in problems(
        **{"c.weight": torch.ones(4, 4), "c.weight_scale_inv": torch.ones(1, 1)}
    )
    assert "b.weight_scale_inv: 1 NaN/inf scale(s)" in problems(
        **{"b.weight_scale_inv": torch.tensor([[float("inf")]])}
    )
    nan_code = good["b.weight"].clone()
    nan_code.view(torch.uint8)[0, 0] = 0x7F  # E4M3's NaN encoding
    assert "b.weight: 1 NaN value(s)" in problems(**{"b.weight": nan_code})
    assert "static activation scales are not supported" in problems(**{"b.activation_scale": torch.tensor(1.0)})
    stacked = fp8_layout.quantize_state_dict_fp8({"e.gate_up_proj": torch.randn(3, 64, 32)})
    with pytest.raises(ValueError, match=r"needs \(3, 1, 1\)"):
        fp8_layout.dequantize_state_dict_fp8({**stacked, "e.gate_up_proj_scale_inv": torch.ones(1, 1)})
    # all problems at once, each named
    message = problems(**{"a.weight_scale_inv": None, "b.weight_scale_inv": torch.ones(2, 2)})
    assert "2 problem(s)" in message and "a.weight:" in message and "b.weight_scale_inv:" in message
    with pytest.raises(ValueError, match="quantised twice"):
        fp8_layout.quantize_state_dict_fp8({"x.weight": torch.randn(8, 8), "x.weight_scale_inv": torch.ones(1, 1)})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"quant_method": "gptq"}, "only DeepSeek's fine-grained 'fp8'"),
        ({"fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
        ({"activation_scheme": "static"}, "only 'dynamic'"),
        ({"weight_block_size": None}, "two positive ints"),
        ({"weight_block_size": [128]}, "two positive ints"),
        ({"weight_block_size": [0, 128]}, "two positive ints"),
    ],
)
def test_unsupported_quantization_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        fp8_layout.check_quantization_config({**fp8_layout.FP8_QUANTIZATION_CONFIG, **change})


# Through workbench.io.hf (once save_hf has its fp8 option) -------------------------------------------
def _hf_has_fp8() -> bool:
    from workbench.io.hf import save_hf

    return "fp8" in inspect.signature(save_hf).parameters


needs_hf_fp8 = pytest.mark.skipif(not _hf_has_fp8(), reason="workbench.io.hf.save_hf has no fp8 option yet")


@needs_hf_fp8
def test_save_hf_fp8_and_load_hf_dequantises_with_a_note(tmp_path):
    from workbench.io.hf import load_hf, save_hf

    model = make_model()
    save_hf(model, tmp_path / "ckpt", dtype=torch.bfloat16, fp8=True)
    config_json = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config_json["quantization_config"] == fp8_layout.FP8_QUANTIZATION_CONFIG
    DeepseekV3Config(**config_json)  # transformers reads it
    stored = load_tensors(tmp_path / "ckpt" / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].dtype == torch.float32
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    with pytest.warns(UserWarning, match="dequantised"):
        loaded = load_hf(tmp_path / "ckpt", dtype=torch.float32)
    expected = make_model(seed=3)
    expected.load_state_dict(
        from_hf_state_dict(
            expected.config, {n: t.float() for n, t in fp8_layout.dequantize_state_dict_fp8(stored).items()}
        )
    )
    torch.testing.assert_close(logits(loaded), logits(expected), rtol=0, atol=0)


@needs_hf_fp8
def test_load_hf_reads_a_checkpoint_built_by_hand(tmp_path):
    from workbench.io.hf import load_hf

    model = make_model()
    by_hand, dequantized = {}, {}
    for name, t in hf_state_dict(model).items():
        if name.endswith(HIGH_PRECISION):
            by_hand[name] = dequantized[name] = t
        else:
            by_hand[name], by_hand[f"{name}_scale_inv"] = block_reference(t)
            dequantized[name] = block_dequant_reference(*block_reference(t))
    write_checkpoint(tmp_path / "deepseek", model.config, by_hand)
    with pytest.warns(UserWarning, match="dequantised"):
        loaded = load_hf(tmp_path / "deepseek")
    expected = make_model(seed=3)
    expected.load_state_dict(from_hf_state_dict(expected.config, dequantized))
    torch.testing.assert_close(logits(loaded), logits(expected), rtol=0, atol=0)
    bad = dict(by_hand)
    bad["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(5, 5)
    write_checkpoint(tmp_path / "bad", model.config, bad)
    with pytest.raises(Exception, match=r"up_proj\.weight_scale_inv"):
        load_hf(tmp_path / "bad")
