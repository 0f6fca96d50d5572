"""Model configuration: every switch of a DeepSeek-V3-style model in one validated dataclass.

The field names are those of Hugging Face transformers' ``DeepseekV3Config`` (and of the
``config.json`` DeepSeek publishes), so a config read from a real checkpoint maps one-to-one onto
ours and back. On top of the architecture we keep the knobs of training that DeepSeek-V3 describes:

* ``bias_update_speed`` (the paper's gamma): how far the auxiliary-loss-free balancing bias moves
  after each optimiser step.
* ``seq_aux_loss_alpha`` (alpha): weight of the complementary sequence-wise balance loss.
* ``mtp_loss_weight`` (lambda): weight of the Multi-Token Prediction loss.
* ``attn_mode``: ``"naive"`` (expand the latent into per-head keys and values, as in training) or
  ``"absorb"`` (fold the up-projections into the query and output, cache only the latent).
* ``fp8``: run every linear layer's and routed expert's GEMMs in FP8 (E4M3, 1x128 activation tiles,
  128x128 weight blocks) as DeepSeek-V3 trains, keeping FP32 master weights (see ``workbench.fp8``).

Presets:

* ``tiny``: CI scale; trains in about a minute on two CPU cores.
* ``small``: a laptop lesson; a few minutes of training shows every effect.
* ``gpu``: fills one H100 usefully (about 0.9B parameters in total, a fraction active).
* ``deepseek-v3``: the real 671B shape. Use it on the ``meta`` device for accounting only; it is
  never allocated.

``ModelConfig.validate()`` (called on construction) rejects impossible configurations with a message
that names the field and says how to fix it.

Published configs (``from_hf``): DeepSeek-V3 / R1 (``model_type`` deepseek_v3, also kimi_k2) and V2 /
V2-Lite (deepseek_v2) read field for field. ``topk_method`` selects the routing rule (V3's ``noaux_tc``,
V2's ``group_limited_greedy``, V2-Lite's ``greedy``), and a field a V2 file leaves out takes V2's value
(softmax scoring, no renormalisation, a scaling factor of 1, no MTP), not V3's. A field that would change
the computation and is not implemented here (another activation, attention or MLP biases,
``moe_layer_freq`` > 1, a rope scaling type other than YaRN, an unknown routing method) is refused by
name; fields that do not change the forward pass (``HF_IGNORED_FIELDS``: loss weights, parallelism) are
ignored with one ``ConfigNote``. Where DeepSeek's V2 code and transformers disagree (``norm_topk_prob``
with a scaling factor other than 1: one normalises and does not scale, the other scales and does not
normalise) a published V2 file is refused; our own files (which carry a ``workbench`` block) use V3's
rule, normalise then scale.

Before those comparisons every field is checked against its annotation (an integer is an integer, not
96.0, "96" or True; a float is finite). A misspelled field is refused with the closest name
(``from_preset``, ``replace``); in a ``config.json``, which holds many keys we do not read, a near miss of
a field is warned about by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot describe a working model. The message names the field and the fix."""


@dataclass
class ModelConfig:
    # ---- vocabulary and trunk -------------------------------------------------------------------
    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1  # the first k layers use a dense MLP instead of MoE
    intermediate_size: int = 384  # dense MLP width
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    # ---- DeepSeekMoE ----------------------------------------------------------------------------
    moe_intermediate_size: int = 64  # width of one (fine-grained) expert
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4  # top-k routed experts per token
    n_group: int = 4  # experts are split into n_group groups...
    topk_group: int = 2  # ...and each token may only pick experts in its best topk_group groups
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    norm_topk_prob: bool = True  # renormalise the k chosen affinities to sum to one
    # how experts are chosen: "noaux_tc" (V3: groups scored by the sum of their two best experts),
    # "group_limited_greedy" (V2: groups scored by their best expert) or "greedy" (V2-Lite: top-k over all experts)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "group_limited_greedy" (V2) or "greedy" (V2-Lite, no groups)

    # ---- Multi-head Latent Attention ------------------------------------------------------------
    num_attention_heads: int = 4
    q_lora_rank: int | None = 64  # None: no query compression (a plain q_proj)
    kv_lora_rank: int = 32  # width of the cached latent c_KV
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN: {"type": "yarn", "factor", ...}

    # ---- Multi-Token Prediction -----------------------------------------------------------------
    num_nextn_predict_layers: int = 1

    # ---- training knobs (not part of the Hugging Face config) -----------------------------------
    bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing
    seq_aux_loss_alpha: float = 1e-4  # alpha of the sequence-wise balance loss
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss
    attn_mode: str = "naive"  # "naive" or "absorb"
    use_grouped_mm: bool = True  # one grouped_mm call for all experts where the kernel runs (CUDA bf16, CPU fp32)
    fp8: bool = False  # FP8 GEMMs in every Linear (not embedding, head, norms, router) and routed expert
    fp8_backend: str = "auto"  # "auto" (scaled_mm on Hopper, else simulated), "simulate" or "scaled_mm"
    fp8_grad_format: str = "e4m3"  # dY in both backward GEMMs: "e4m3" (DeepSeek-V3) or "e5m2" (hybrid recipe)
    # experts that exist in a layer's tensors but are never routed to, by MoE layer index (a grown model's
    # layers that did not get live new experts; see ``Model.grow_experts``); None: every expert is active
    inactive_experts: dict[int, list[int]] | None = None

    # ---------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        _check_types(self)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        if self.inactive_experts is not None:  # JSON keys are strings: normalise to {layer: sorted ids}
            if not isinstance(self.inactive_experts, dict):
                raise ConfigError(f"inactive_experts must map MoE layer -> expert ids, got {self.inactive_experts!r}")
            try:
                self.inactive_experts = {
                    int(k): sorted({int(j) for j in v}) for k, v in self.inactive_experts.items() if v
                } or None
            except (TypeError, ValueError):
                raise ConfigError(
                    f"inactive_experts must map MoE layer -> list of expert ids, got {self.inactive_experts!r}"
                ) from None
        self.validate()

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        unknown = [k for k in changes if k not in _FIELD_NAMES]
        if unknown:
            raise ConfigError("; ".join(_unknown_field(k) for k in unknown))
        return dataclasses.replace(self, **changes)

    # Validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        _check_types(self)  # first: the comparisons below assume every field has its annotated type

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(
            isinstance(self.qk_rope_head_dim, int) and self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            f"qk_rope_head_dim must be a positive even integer (RoPE rotates pairs of dimensions), "
            f"got {self.qk_rope_head_dim!r}; use e.g. {max(2, (self.qk_rope_head_dim or 0) // 2 * 2)}",
        )
        need(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            f"q_lora_rank must be a positive integer or None (no query compression), got {self.q_lora_rank!r}",
        )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            f"first_k_dense_replace={self.first_k_dense_replace} must be between 0 and "
            f"num_hidden_layers={self.num_hidden_layers}",
        )
        if self.first_k_dense_replace > 0:
            need(
                self.intermediate_size > 0,
                f"intermediate_size must be positive when there are dense layers "
                f"(first_k_dense_replace={self.first_k_dense_replace}), got {self.intermediate_size}",
            )
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(
            self.initializer_range >= 0,
            f"initializer_range (the std of the initial weights) must be >= 0, got {self.initializer_range}; "
            "DeepSeek-V3 uses 0.006, our presets 0.02",
        )
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")

        if self.n_moe_layers > 0:
            E, k = self.n_routed_experts, self.num_experts_per_tok
            need(isinstance(E, int) and E > 0, f"n_routed_experts must be positive, got {E!r}")
            need(
                self.moe_intermediate_size > 0,
                f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}",
            )
            need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
            need(
                isinstance(k, int) and 1 <= k <= E,
                f"num_experts_per_tok={k} must be between 1 and n_routed_experts={E}",
            )
            need(
                self.topk_method in TOPK_METHODS,
                f"topk_method must be one of {', '.join(TOPK_METHODS)}, got {self.topk_method!r}",
            )
            need(
                isinstance(self.n_group, int) and self.n_group >= 1,
                f"n_group must be a positive integer, got {self.n_group!r}; use 1 to disable group-limited routing",
            )
            need(
                isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group,
                f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}",
            )
            if self.topk_method != "greedy":  # greedy ignores the groups
                need(
                    E % self.n_group == 0,
                    f"n_routed_experts={E} is not divisible by n_group={self.n_group}; choose n_group among "
                    f"{[g for g in range(1, E + 1) if E % g == 0]}",
                )
                per_group = E // self.n_group
                allowed = per_group * self.topk_group
                need(
                    k <= allowed,
                    f"num_experts_per_tok={k} is larger than the experts the groups allow: topk_group="
                    f"{self.topk_group} groups x {per_group} experts per group = {allowed}; raise topk_group "
                    f"to at least {math.ceil(k / per_group)} or lower num_experts_per_tok to {allowed}",
                )
                if self.n_group > 1 and self.topk_method == "noaux_tc":
                    need(
                        per_group >= 2,
                        f"group scores sum each group's top-2 experts, so each group needs at least 2 experts "
                        f"(n_routed_experts / n_group = {per_group}); lower n_group",
                    )
            need(
                self.scoring_func in ("sigmoid", "softmax"),
                f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}",
            )
            need(
                self.routed_scaling_factor > 0,
                f"routed_scaling_factor must be positive, got {self.routed_scaling_factor}",
            )
        need(
            self.num_nextn_predict_layers >= 0,
            f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}",
        )
        need(
            self.bias_update_speed >= 0,
            f"bias_update_speed (gamma) must be >= 0, got {self.bias_update_speed}",
        )
        need(self.seq_aux_loss_alpha >= 0, f"seq_aux_loss_alpha must be >= 0, got {self.seq_aux_loss_alpha}")
        need(self.mtp_loss_weight >= 0, f"mtp_loss_weight (lambda) must be >= 0, got {self.mtp_loss_weight}")
        need(
            self.attn_mode in ("naive", "absorb"),
            f"attn_mode must be 'naive' or 'absorb', got {self.attn_mode!r}",
        )
        need(isinstance(self.fp8, bool), f"fp8 must be True or False, got {self.fp8!r}")
        need(
            self.fp8_backend in ("auto", "simulate", "scaled_mm"),
            f"fp8_backend must be 'auto', 'simulate' or 'scaled_mm', got {self.fp8_backend!r}",
        )
        need(
            self.fp8_grad_format in ("e4m3", "e5m2"),
            f"fp8_grad_format must be 'e4m3' or 'e5m2', got {self.fp8_grad_format!r}",
        )
        for layer, ids in (self.inactive_experts or {}).items():
            moe_layer = self.is_moe_layer(layer) and layer < self.num_hidden_layers + self.num_nextn_predict_layers
            need(moe_layer, f"inactive_experts names layer {layer}, which is not a MoE layer of this config")
            need(
                all(0 <= j < self.n_routed_experts for j in ids),
                f"inactive_experts of layer {layer} holds ids outside 0..{self.n_routed_experts - 1}: {ids}",
            )
            need(
                self.n_routed_experts - len(ids) >= self.num_experts_per_tok,
                f"layer {layer} keeps {self.n_routed_experts - len(ids)} active experts, fewer than "
                f"num_experts_per_tok={self.num_experts_per_tok}",
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    # Presets -------------------------------------------------------------------------------------
    @classmethod
    def preset_names(cls) -> list[str]:
        return list(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if not isinstance(name, str) or name not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
        values = dict(_PRESETS[name])
        unknown = [k for k in overrides if k not in _FIELD_NAMES]
        if unknown:
            raise ConfigError("; ".join(_unknown_field(k) for k in unknown))
        values.update(overrides)
        return cls(**values)

    # Hugging Face config.json --------------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers reads (architecture fields, plus our training knobs under
        ``workbench``): ``DeepseekV3Config`` for V3's routing (``noaux_tc``), ``DeepseekV2Config`` for V2's."""
        d = asdict(self)
        knobs = {name: d.pop(name) for name in _TRAINING_KNOBS}
        v2 = self.topk_method in _V2_METHODS
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v2" if v2 else "deepseek_v3",
            **d,
            "hidden_act": "silu",
            "num_key_value_heads": self.num_attention_heads,
            "moe_layer_freq": 1,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "dtype": "float32",  # transformers 5's name for the old "torch_dtype"
            "workbench": knobs,
        }
        if v2:
            hf["mlp_bias"] = False
        else:
            hf["rope_interleave"] = True  # DeepSeek's interleaved rope layout (transformers de-interleaves on the fly)
        return hf

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any], **overrides: Any) -> ModelConfig:
        """Read a Hugging Face ``config.json`` (a path to the file or its folder, or the dict).

        Every field is honoured or refused: the architecture and routing fields map onto ours (with the
        defaults of the config's ``model_type`` where a field is left out); a field that would change the
        computation and that this model does not implement (``hidden_act`` other than silu, attention or MLP
        biases, ``moe_layer_freq`` > 1, an unknown ``topk_method`` or rope scaling type, ...) raises
        ``ConfigError`` naming it; fields that do not change the forward pass (training loss weights,
        parallelism, bookkeeping; ``HF_IGNORED_FIELDS``) are ignored, with one ``ConfigNote`` warning listing
        those whose value could make a reader wonder.
        """
        hf, where = _read_config_json(source)
        knobs = hf.get("workbench")
        _warn_misspelled(hf, knobs if isinstance(knobs, dict) else {}, where)
        values, notes = _read_hf_fields(hf)
        if notes:
            warnings.warn(
                "config.json fields ignored because they do not change the forward pass: " + "; ".join(notes),
                ConfigNote,
                stacklevel=2,
            )
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)}; see ModelConfig for the names")
        values.update(overrides)
        return cls(**values)

    def save(self, path: str | Path) -> None:
        from workbench.atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")


_TRAINING_KNOBS = (
    "bias_update_speed",
    "seq_aux_loss_alpha",
    "mtp_loss_weight",
    "attn_mode",
    "use_grouped_mm",
    "fp8",
    "fp8_backend",
    "fp8_grad_format",
    "inactive_experts",
)


TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
_V2_METHODS = ("group_limited_greedy", "greedy")
HF_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")


class ConfigNote(UserWarning):
    """A note from ``ModelConfig.from_hf``: config.json fields that were ignored because they do not change
    the forward pass (training loss weights, parallelism)."""


# What a routing field means when config.json leaves it out: the defaults of the model type's configuration
# class (DeepSeek's and transformers' DeepseekV2Config / DeepseekV3Config agree on these).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                        routed_scaling_factor=2.5, num_nextn_predict_layers=1),
    "deepseek_v2": dict(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                        routed_scaling_factor=1.0, num_nextn_predict_layers=0),
}  # fmt: skip
_HF_DEFAULTS["kimi_k2"] = _HF_DEFAULTS["deepseek_v3"]

# Fields every config.json of a DeepSeek model lists: without them the shapes are unknown.
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "intermediate_size",
)

# Fields that do not change the forward pass, and why. Those with a value in ``_NEUTRAL`` pass silently,
# the others are listed in the one ConfigNote.
HF_IGNORED_FIELDS: dict[str, str] = {
    "aux_loss_alpha": "weight of V2's auxiliary balance loss, a training term",
    "seq_aux": "whether V2's balance loss is taken per sequence, a training term",
    "router_aux_loss_coef": "weight of an auxiliary balance loss, a training term",
    "output_router_logits": "whether transformers returns router logits",
    "ep_size": "expert-parallel world size of DeepSeek's training code",
    "pretraining_tp": "tensor-parallel slicing of the linear layers, the same products",
    "attention_dropout": "dropout, inactive at inference",
    "num_key_value_heads": "MLA has one latent per token, not key/value heads",
    "head_dim": "transformers' name for qk_rope_head_dim",
    "qk_head_dim": "qk_nope_head_dim + qk_rope_head_dim",
    "use_cache": "a generation default",
    "initializer_std": "initialisation of fresh weights",
}
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "ep_size": (1,),
    "pretraining_tp": (1, None),
    "attention_dropout": (0, 0.0, None),
    "output_router_logits": (False, None),
    "use_cache": (True, False, None),
}
# Bookkeeping: names, versions, token ids, dtypes, remote code; never part of the computation.
_HF_BOOKKEEPING = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map", "_name_or_path",
        "name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config", "id2label",
        "label2id", "return_dict", "output_hidden_states", "output_attentions", "tokenizer_class", "workbench",
        "rope_interleave", "num_mtp_layers", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
        "tie_encoder_decoder", "torchscript", "use_bfloat16", "prefix", "task_specific_params",
    }
)  # fmt: skip
# Fields that would change the computation: honoured only with the value this model implements.
_HF_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "hidden_act": (("silu", None), "the experts and MLPs here are SwiGLU (silu)"),
    "attention_bias": ((False, None), "MLA here has no bias terms"),
    "mlp_bias": ((False, None), "the MLPs and experts here have no bias terms"),
    "moe_layer_freq": ((1, None), "every layer from first_k_dense_replace on is a MoE layer here (as in every "
                       "published DeepSeek checkpoint)"),
    "rope_interleave": ((True, None), "the rope weights must be in DeepSeek's interleaved layout"),
}  # fmt: skip
_YARN_KEYS = frozenset(
    {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
     "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor", "rope_theta"}
)  # fmt: skip


def _read_hf_fields(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ModelConfig values a config.json describes and the notes on fields it ignores; refuses with one
    ConfigError that lists every field it cannot honour."""
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(
            f"model_type {model_type!r} is not a DeepSeek-V3-style model; this workbench reads "
            f"{', '.join(HF_MODEL_TYPES)}"
        )
    ours = {f.name for f in fields(ModelConfig)} - set(_TRAINING_KNOBS)
    problems: list[str] = []
    notes: list[str] = []
    unknown: list[str] = []

    absent = [name for name in _HF_REQUIRED if name not in hf]
    if absent:
        problems.append(f"it lacks {', '.join(absent)} (every published DeepSeek config.json lists them)")
    values: dict[str, Any] = {k: v for k, v in hf.items() if k in ours}
    for key, default in _HF_DEFAULTS[model_type].items():
        if hf.get(key) is None:
            values[key] = default
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        values["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    for key, default in (("n_group", 1), ("topk_group", 1), ("first_k_dense_replace", 0), ("n_shared_experts", 0)):
        if values.get(key) is None:  # null: no groups / no dense layers / no shared experts
            values[key] = default
    if "n_routed_experts" in hf and hf["n_routed_experts"] is None:
        problems.append("n_routed_experts is null (a dense model); this workbench models DeepSeekMoE")

    for key, (allowed, why) in _HF_FIXED.items():
        if key in hf and hf[key] not in allowed:
            problems.append(f"{key}={hf[key]!r} is not implemented ({why}); it would change the outputs")
    method = values.get("topk_method")
    if method not in TOPK_METHODS:
        problems.append(f"topk_method={method!r} is not implemented; known: {', '.join(TOPK_METHODS)}")
    ours_file = isinstance(hf.get("workbench"), dict)  # written by to_hf: the gate weights are normalised, then scaled
    v2_gates = values.get("norm_topk_prob") and values.get("routed_scaling_factor", 1) != 1
    if model_type == "deepseek_v2" and v2_gates and not ours_file:
        problems.append(
            "norm_topk_prob=true with routed_scaling_factor != 1 in a deepseek_v2 config: DeepSeek's V2 code then "
            "normalises the gate weights without scaling them, transformers scales them without normalising; the "
            "two disagree, so the intended computation is unknown"
        )
    rope = _read_rope(hf, problems)
    values.update(rope)

    for key, value in hf.items():
        if key in ours or key in _HF_BOOKKEEPING or key in _HF_FIXED or key in ("rope_parameters", "rope_scaling"):
            continue
        if key in HF_IGNORED_FIELDS:
            if not _is_neutral(key, value, hf):
                notes.append(f"{key}={value!r} ({HF_IGNORED_FIELDS[key]})")
        else:
            unknown.append(key)
    if unknown:
        notes.append(
            f"{', '.join(sorted(unknown))} (not a field of any DeepSeek config this workbench knows; check that "
            "they do not change the model)"
        )
    if problems:
        raise ConfigError("config.json cannot be honoured:\n" + "\n".join(f"  {p}" for p in problems))
    knobs = hf.get("workbench") or {}
    if not isinstance(knobs, dict):
        raise ConfigError(f"config.json 'workbench' must be a JSON object of training knobs, got {knobs!r}")
    values.update({k: v for k, v in knobs.items() if k in _TRAINING_KNOBS})
    return values, notes


def _is_neutral(key: str, value: Any, hf: dict[str, Any]) -> bool:
    """Whether an ignored field holds the value that means "nothing to say" (no note needed)."""
    derived = {
        "num_key_value_heads": hf.get("num_attention_heads"),
        "head_dim": hf.get("qk_rope_head_dim"),
        "qk_head_dim": (hf.get("qk_nope_head_dim") or 0) + (hf.get("qk_rope_head_dim") or 0),
    }
    if key in derived:
        return value is None or value == derived[key]
    return any(value is v or (type(value) is type(v) and value == v) for v in _NEUTRAL.get(key, ()))


def _read_rope(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """rope_theta and rope_scaling from DeepSeek's legacy fields or transformers 5's ``rope_parameters``."""
    out: dict[str, Any] = {}
    rp = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(rp, dict):
        if "rope_theta" in rp:
            out["rope_theta"] = rp["rope_theta"]
        scaling = rp
    elif rp is not None:
        problems.append(f"rope_parameters must be a JSON object, got {rp!r}")
    if scaling is None:
        out["rope_scaling"] = None
        return out
    if not isinstance(scaling, dict):
        problems.append(f"rope_scaling must be a JSON object or null, got {scaling!r}")
        return out
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        out["rope_scaling"] = None
        return out
    if kind != "yarn":
        problems.append(
            f"rope scaling type {kind!r} is not implemented (every published DeepSeek checkpoint uses 'yarn'); "
            "implemented: yarn and none ('default')"
        )
        return out
    extra = sorted(set(scaling) - _YARN_KEYS)
    if extra:
        problems.append(f"yarn rope scaling has keys this workbench does not implement: {', '.join(extra)}")
    if scaling.get("truncate", True) is not True:
        problems.append("yarn with truncate=false is not implemented (DeepSeek's yarn rounds the correction range)")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial_rotary_factor != 1 is not implemented (MLA rotates all qk_rope_head_dim dims)")
    if scaling.get("factor") is None:
        problems.append("yarn rope scaling needs 'factor'")
    out["rope_scaling"] = {
        "type": "yarn",
        **{k: v for k, v in scaling.items() if k not in ("rope_theta", "rope_type", "type", "truncate")},
    }
    return out


# ---- validation helpers ---------------------------------------------------------------------------
_FIELD_NAMES = [f.name for f in fields(ModelConfig)]
_WHAT = {"int": "an integer", "float": "a finite number", "bool": "True or False", "str": "a string",
         "dict": "a mapping (a JSON object)"}  # fmt: skip


def _annotation(hint: str) -> tuple[str, bool]:
    """``"int | None"`` -> ("int", True); ``"dict[str, Any] | None"`` -> ("dict", True)."""
    parts = [p.strip() for p in str(hint).split("|")]
    base = next(p for p in parts if p != "None")
    return base.split("[")[0], "None" in parts


def _type_problem(value: Any, base: str) -> str | None:
    """Why ``value`` is not of type ``base`` (None when it is). A bool is not a number here: ``True`` for
    ``num_hidden_layers`` is a mistake, not one layer; 96.0 is not the integer 96."""
    if base == "int":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    elif base == "bool":
        ok = isinstance(value, bool)
    elif base == "str":
        ok = isinstance(value, str)
    elif base == "dict":
        ok = isinstance(value, dict)
    else:
        return None
    if ok:
        return None
    hint = ""
    if base == "int" and isinstance(value, float) and value.is_integer():
        hint = f"; write {int(value)}"
    elif base == "int" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        hint = f"; write {value.strip()} without quotes"
    elif base == "bool" and isinstance(value, (str, int)):
        hint = "; without quotes: true / false in JSON, True / False in Python"
    return f"must be {_WHAT[base]}, got {value!r} ({type(value).__name__}){hint}"


def _check_types(config: ModelConfig) -> None:
    """Every field against its annotation, before any comparison: a string where an integer belongs
    would otherwise end in ``'>' not supported between 'str' and 'int'`` deep inside ``validate``.
    Integers and reals of other libraries (numpy) become plain ``int`` / ``float``."""
    for f in fields(config):
        value = getattr(config, f.name)
        base, optional = _annotation(f.type)
        if value is None and optional:
            continue
        problem = _type_problem(value, base)
        if problem:
            raise ConfigError(f"{f.name} {problem}")
        if base == "int" and type(value) is not int:
            setattr(config, f.name, int(value))
        elif base == "float" and type(value) not in (int, float):
            setattr(config, f.name, float(value))


# rope_scaling keys that are numbers (YaRN's), and whether each must be an integer
_ROPE_NUMBERS = {"factor": False, "original_max_position_embeddings": True, "beta_fast": False,
                 "beta_slow": False, "mscale": False, "mscale_all_dim": False}  # fmt: skip


def _check_rope_scaling(rs: dict[str, Any]) -> None:
    """YaRN settings: the type, a finite ``factor`` >= 1, a positive ``original_max_position_embeddings``."""
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; use {{'type': 'yarn', 'factor': ..., "
            f"'original_max_position_embeddings': ...}} or None"
        )
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            what = "scale" if key == "factor" else "context length before YaRN"
            raise ConfigError(f"rope_scaling needs {key!r} (YaRN's {what})")
    for key, integer in _ROPE_NUMBERS.items():
        if key in rs:
            problem = _type_problem(rs[key], "int" if integer else "float")
            if problem:
                raise ConfigError(f"rope_scaling[{key!r}] {problem}")
    if rs["factor"] < 1:
        raise ConfigError(f"rope_scaling['factor'] must be >= 1, got {rs['factor']!r}")
    if rs["original_max_position_embeddings"] <= 0:
        raise ConfigError(
            "rope_scaling['original_max_position_embeddings'] (the context length before YaRN) must be positive, "
            f"got {rs['original_max_position_embeddings']!r}"
        )


def _unknown_field(name: Any) -> str:
    """The message for a field ModelConfig does not have, with the closest one."""
    close = difflib.get_close_matches(str(name), _FIELD_NAMES, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; the fields are ModelConfig's (see its source)"
    return f"unknown config field {name!r}{hint}"


def _read_config_json(source: Any) -> tuple[dict[str, Any], str]:
    """A Hugging Face config as a dict, and where it came from (for messages): a dict, a ``config.json``
    file or the folder holding one. Anything but a JSON object is refused by name."""
    if isinstance(source, dict):
        return dict(source), "config"
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"a config is a dict or the path of a config.json (or its folder), got {source!r}")
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json at {path}")
    if not path.is_file():
        raise ConfigError(f"{path} is not a regular file; a config.json holds one JSON object")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size:,} bytes; a config.json is a few kilobytes")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(hf), "a number")
        raise ConfigError(f"{path} must hold a JSON object of config fields, got {kind}")
    return hf, str(path)


_MAX_CONFIG_BYTES = 16 << 20
# keys a Hugging Face / DeepSeek config.json may hold that are not ModelConfig fields (never "misspelled")
# fmt: off
_OTHER_HF_KEYS = frozenset(
    {
        "architectures", "model_type", "hidden_act", "num_key_value_heads", "topk_method", "moe_layer_freq",
        "attention_bias", "attention_dropout", "rope_interleave", "rope_parameters", "num_mtp_layers", "head_dim",
        "pretraining_tp", "ep_size", "aux_loss_alpha", "seq_aux", "use_cache", "bos_token_id", "eos_token_id",
        "pad_token_id", "dtype", "torch_dtype", "quantization_config", "workbench", "transformers_version", "auto_map",
        "_name_or_path", "use_bfloat16", "output_hidden_states", "output_attentions", "return_dict", "id2label",
        "label2id", "tokenizer_class", "is_decoder", "is_encoder_decoder", "qk_head_dim", "chunk_size_feed_forward",
        "mlp_bias", "output_router_logits", "problem_type",
    }
)
# fmt: on


def _warn_misspelled(hf: dict[str, Any], knobs: dict[str, Any], where: str) -> None:
    """Warn about config.json keys that look like a misspelled field (a real config holds many keys we do
    not read, so only a near match is named) and about training knobs we do not have."""
    for key in hf:
        if key in _FIELD_NAMES or key in _OTHER_HF_KEYS or key in HF_IGNORED_FIELDS or key in _HF_BOOKKEEPING:
            continue
        close = difflib.get_close_matches(str(key), _FIELD_NAMES, n=1, cutoff=0.85)
        if close:
            warnings.warn(f"{where}: unknown field {key!r} is ignored; did you mean {close[0]!r}?", stacklevel=3)
    for key in knobs:
        if key not in _TRAINING_KNOBS:
            close = difflib.get_close_matches(str(key), _TRAINING_KNOBS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the knobs are {', '.join(_TRAINING_KNOBS)}"
            warnings.warn(f"{where}: unknown training knob workbench.{key} is ignored{hint}", stacklevel=3)


_PRESETS: dict[str, dict[str, Any]] = {
    # CI: about a minute of training on 2 cores.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=96,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=256,
        moe_intermediate_size=48,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
        num_nextn_predict_layers=1,
    ),
    # A classroom laptop: a few minutes of training.
    "small": dict(
        vocab_size=2048,
        hidden_size=192,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        intermediate_size=512,
        moe_intermediate_size=96,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        num_attention_heads=6,
        q_lora_rank=96,
        kv_lora_rank=48,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=512,
        num_nextn_predict_layers=1,
    ),
    # One H100: ~0.9B parameters in total, with DeepSeek-V3's ratios at a smaller width.
    "gpu": dict(
        vocab_size=2048,
        hidden_size=1024,
        num_hidden_layers=12,
        first_k_dense_replace=1,
        intermediate_size=2816,
        moe_intermediate_size=352,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        num_attention_heads=16,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=2048,
        num_nextn_predict_layers=1,
    ),
    # The real DeepSeek-V3 (671B). Accounting on the meta device only.
    "deepseek-v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=10000.0,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        num_nextn_predict_layers=1,
        tie_word_embeddings=False,
    ),
}
__all__ = ["HF_IGNORED_FIELDS", "TOPK_METHODS", "ConfigError", "ConfigNote", "ModelConfig"]
