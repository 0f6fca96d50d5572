"""``ModelConfig``: every switch of a DeepSeek-V3-style model in one validated dataclass (see the package
docstring, ``workbench.config``, for the fields, the presets and the published configs)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from workbench.config.checks import ConfigError, check_rope_scaling, check_types
from workbench.config.presets import PRESETS


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
        check_types(self)
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
        unknown = [k for k in changes if k not in FIELD_NAMES]
        if unknown:
            raise ConfigError("; ".join(_unknown_field(k) for k in unknown))
        return dataclasses.replace(self, **changes)

    # Validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        check_types(self)  # first: the comparisons below assume every field has its annotated type

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
            check_rope_scaling(self.rope_scaling)

    # Presets -------------------------------------------------------------------------------------
    @classmethod
    def preset_names(cls) -> list[str]:
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        unknown = [k for k in overrides if k not in FIELD_NAMES]
        if unknown:
            raise ConfigError("; ".join(_unknown_field(k) for k in unknown))
        values.update(overrides)
        return cls(**values)

    # Hugging Face config.json --------------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers reads (architecture fields, plus our training knobs under
        ``workbench``): ``DeepseekV3Config`` for V3's routing (``noaux_tc``), ``DeepseekV2Config`` for V2's."""
        d = asdict(self)
        knobs = {name: d.pop(name) for name in TRAINING_KNOBS}
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
        from workbench.config.hf import ConfigNote, read_config_json, read_hf_fields, warn_misspelled

        hf, where = read_config_json(source)
        knobs = hf.get("workbench")
        warn_misspelled(hf, knobs if isinstance(knobs, dict) else {}, where)
        values, notes = read_hf_fields(hf)
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


TRAINING_KNOBS = (
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
FIELD_NAMES = [f.name for f in fields(ModelConfig)]


def _unknown_field(name: Any) -> str:
    """The message for a field ModelConfig does not have, with the closest one."""
    close = difflib.get_close_matches(str(name), FIELD_NAMES, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; the fields are ModelConfig's (see its source)"
    return f"unknown config field {name!r}{hint}"


__all__ = ["FIELD_NAMES", "TOPK_METHODS", "TRAINING_KNOBS", "ModelConfig"]
