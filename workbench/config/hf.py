"""Hugging Face ``config.json`` files: read one field for field into a ``ModelConfig``, and write one back.

Every field of a published config is honoured, refused by name, or noted: the architecture and routing
fields map onto ours (with the defaults of the config's ``model_type`` where a field is left out, so a V2
file takes V2's routing, not V3's); a field that would change the computation and is not implemented here
is refused with one ``ConfigError`` listing them all; fields that do not change the forward pass
(``HF_IGNORED_FIELDS``) are ignored with one ``ConfigNote``. The file itself is checked before it is read:
a regular file, a few kilobytes, one JSON object; a near miss of a field name is warned about.
"""

from __future__ import annotations

import difflib
import json
import warnings
from pathlib import Path
from typing import Any

from workbench.config.checks import ConfigError
from workbench.config.model import FIELD_NAMES, TOPK_METHODS, TRAINING_KNOBS

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


def read_hf_fields(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ModelConfig values a config.json describes and the notes on fields it ignores; refuses with one
    ConfigError that lists every field it cannot honour."""
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(
            f"model_type {model_type!r} is not a DeepSeek-V3-style model; this workbench reads "
            f"{', '.join(HF_MODEL_TYPES)}"
        )
    ours = set(FIELD_NAMES) - set(TRAINING_KNOBS)
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
    values.update({k: v for k, v in knobs.items() if k in TRAINING_KNOBS})
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


def read_config_json(source: Any) -> tuple[dict[str, Any], str]:
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


def warn_misspelled(hf: dict[str, Any], knobs: dict[str, Any], where: str) -> None:
    """Warn about config.json keys that look like a misspelled field (a real config holds many keys we do
    not read, so only a near match is named) and about training knobs we do not have."""
    for key in hf:
        if key in FIELD_NAMES or key in _OTHER_HF_KEYS or key in HF_IGNORED_FIELDS or key in _HF_BOOKKEEPING:
            continue
        close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1, cutoff=0.85)
        if close:
            warnings.warn(f"{where}: unknown field {key!r} is ignored; did you mean {close[0]!r}?", stacklevel=3)
    for key in knobs:
        if key not in TRAINING_KNOBS:
            close = difflib.get_close_matches(str(key), TRAINING_KNOBS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the knobs are {', '.join(TRAINING_KNOBS)}"
            warnings.warn(f"{where}: unknown training knob workbench.{key} is ignored{hint}", stacklevel=3)


__all__ = ["HF_IGNORED_FIELDS", "HF_MODEL_TYPES", "ConfigNote", "read_config_json", "read_hf_fields", "warn_misspelled"]
