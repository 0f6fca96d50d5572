"""Tensor names in a Hugging Face checkpoint of a DeepSeek model, and ours: one object owns every rule.

A checkpoint names its tensors as transformers' ``DeepseekV3ForCausalLM`` (and ``DeepseekV2ForCausalLM``,
which uses the same names) does; our ``Model`` names them as its modules are nested. The rules, all here:

* ``model.X`` is our ``X`` (``model.embed_tokens.weight`` -> ``embed_tokens.weight``), except
  ``lm_head.weight``, which keeps its name.
* Decoder layer ``i`` of the file is our ``layers.i`` when ``i < num_hidden_layers`` (L) and Multi-Token
  Prediction module ``i - L`` (our ``mtp.{i - L}``) when ``i >= L``: DeepSeek stores MTP module k as one
  more decoder layer, ``model.layers.{L + k}``. This is the only place that rule is written down.
* A MoE layer's routed experts are one tensor per expert in the file,
  ``model.layers.i.mlp.experts.j.{gate_proj,up_proj,down_proj}.weight`` (out, in), and one *stack* per
  projection here, ``layers.i.mlp.experts.{gate_proj,up_proj,down_proj}`` (E, out, in), row j being
  expert j. transformers 5 can also save its in-memory fusion (``save_original_format=False``):
  ``mlp.experts.gate_up_proj`` (E, 2I, D; the gate rows, then the up rows) and ``mlp.experts.down_proj``.
* Each MTP layer also stores *copies* of the shared embedding and output head,
  ``model.layers.{L + k}.embed_tokens.weight`` and ``...shared_head.head.weight``; with tied embeddings
  a file may hold ``lm_head.weight`` as a copy of the embedding too.
* An FP8 weight ``W`` has a float32 sibling ``W_scale_inv`` (see ``workbench.io.fp8_layout``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.config import ModelConfig
from workbench.io.files import CheckpointError

PROJS = ("gate_proj", "up_proj", "down_proj")
BIAS = "e_score_correction_bias"
SCALE_SUFFIX = "_scale_inv"
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OUR_STACKED = re.compile(r"^((?:layers|mtp)\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class ExpertName:
    """One routed expert's tensor in the file: our stacked tensor ``stack`` row ``index``."""

    stack: str  # ours, e.g. "layers.3.mlp.experts.up_proj"
    index: int  # the expert j
    proj: str  # gate_proj, up_proj or down_proj


@dataclass(frozen=True)
class FusedName:
    """transformers' fused experts of a layer: ``gate_up_proj`` fills two of our stacks, ``down_proj`` one."""

    experts: str  # ours, e.g. "layers.3.mlp.experts"
    kind: str  # "gate_up_proj" or "down_proj"


@dataclass(frozen=True)
class HFNames:
    """The naming rules of one config: ``HFNames.of(config)``."""

    num_hidden_layers: int
    num_mtp: int
    tie_word_embeddings: bool
    n_routed_experts: int

    @classmethod
    def of(cls, config: ModelConfig) -> HFNames:
        return cls(
            config.num_hidden_layers,
            config.num_nextn_predict_layers,
            config.tie_word_embeddings,
            config.n_routed_experts,
        )

    # ---- decoder layers and MTP modules ----------------------------------------------------------
    def is_mtp_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` of the file is an MTP module (the rule: ``i >= num_hidden_layers``)."""
        return i >= self.num_hidden_layers

    def mtp_layer(self, k: int) -> int:
        """The file's decoder-layer index of MTP module ``k`` (0-based)."""
        return self.num_hidden_layers + k

    def our_layer(self, i: int) -> str:
        """Our prefix of the file's decoder layer ``i``: ``layers.i`` or ``mtp.{i - L}``."""
        return f"mtp.{i - self.num_hidden_layers}" if self.is_mtp_layer(i) else f"layers.{i}"

    @staticmethod
    def layer_index(name: str) -> int | None:
        """The decoder-layer index of a file tensor name (``model.layers.i.*``), or None."""
        m = _HF_LAYER.match(name)
        return int(m.group(1)) if m else None

    def mtp_layers(self, start: int = 0, n: int | None = None) -> list[int]:
        """The file's layer indices of MTP modules ``start .. start + n - 1`` (default: all of this config's)."""
        n = self.num_mtp - start if n is None else n
        return [self.mtp_layer(k) for k in range(start, start + n)]

    # ---- one name to the other -------------------------------------------------------------------
    def hf_name(self, ours: str) -> str:
        """The file's name of one of our (non-stacked) tensor names."""
        if ours == HEAD:
            return ours
        if ours.startswith("mtp."):
            k, rest = ours[len("mtp.") :].split(".", 1)
            return f"model.layers.{self.mtp_layer(int(k))}.{rest}"
        return f"model.{ours}"

    def our_name(self, hf: str) -> str:
        """Our name of a file tensor name (a per-expert name gives the per-expert path, see ``expert``)."""
        if hf == HEAD:
            return hf
        m = _HF_LAYER.match(hf)
        if m is not None:
            return f"{self.our_layer(int(m.group(1)))}.{m.group(2)}"
        if hf.startswith("model."):
            return hf[len("model.") :]
        raise CheckpointError(f"{hf!r} is not a DeepSeek tensor name (expected 'model.*' or 'lm_head.weight')")

    # ---- experts ---------------------------------------------------------------------------------
    @staticmethod
    def stacked(ours: str) -> tuple[str, str] | None:
        """(experts prefix, projection) when ``ours`` is a stacked expert tensor, else None."""
        m = _OUR_STACKED.match(ours)
        return (m.group(1), m.group(2)) if m else None

    def expert_names(self, stack: str, n_experts: int | None = None) -> list[str]:
        """The file's per-expert names of our stacked tensor ``stack`` (``layers.i.mlp.experts.up_proj``)."""
        prefix, proj = stack.rsplit(".", 1)
        base = self.hf_name(prefix)
        n = self.n_routed_experts if n_experts is None else n_experts
        return [f"{base}.{j}.{proj}.weight" for j in range(n)]

    def expert(self, hf: str) -> ExpertName | None:
        """Which stack row a per-expert file tensor fills, or None if it is not one."""
        m = _HF_LAYER.match(hf)
        if m is None:
            return None
        e = _HF_EXPERT.match(m.group(2))
        if e is None:
            return None
        return ExpertName(f"{self.our_layer(int(m.group(1)))}.mlp.experts.{e.group(2)}", int(e.group(1)), e.group(2))

    def fused(self, hf: str) -> FusedName | None:
        """transformers' fused expert tensors (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``)."""
        m = _HF_LAYER.match(hf)
        if m is None or m.group(2) not in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            return None
        return FusedName(f"{self.our_layer(int(m.group(1)))}.mlp.experts", m.group(2).rsplit(".", 1)[1])

    def fused_name(self, experts: str, kind: str) -> str:
        return f"{self.hf_name(experts)}.{kind}"

    # ---- copies ----------------------------------------------------------------------------------
    def copies(self, n_mtp_in_file: int | None = None) -> dict[str, str]:
        """File tensors that duplicate another one, mapped to the original's file name: the MTP layers'
        embedding and head copies, and ``lm_head.weight`` when the embeddings are tied."""
        head = EMBED if self.tie_word_embeddings else HEAD
        n = self.num_mtp if n_mtp_in_file is None else n_mtp_in_file
        out = {}
        for i in self.mtp_layers(0, n):
            out[f"model.layers.{i}.{MTP_COPIES[0]}"] = EMBED
            out[f"model.layers.{i}.{MTP_COPIES[1]}"] = head
        if self.tie_word_embeddings:
            out[HEAD] = EMBED
        return out

    @staticmethod
    def scale_of(hf: str) -> str:
        return hf + SCALE_SUFFIX

    @staticmethod
    def is_scale(hf: str) -> bool:
        return hf.endswith(SCALE_SUFFIX)


__all__ = ["BIAS", "PROJS", "SCALE_SUFFIX", "ExpertName", "FusedName", "HFNames"]
