"""Growing the layers: ``add_expert`` gives every MoE layer new routed experts (copy / average / random),
dormant until woken, and describes what it added (``AddedExperts``, saved as ``vertical.json``)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workbench.config import ConfigError
from workbench.io.files import atomic_write_json, read_json
from workbench.model import Model
from workbench.model.moe import GrowthLayout, MoE
from workbench.util import eval_mode

INITS = ("copy", "average", "random")

DORMANT_MARGIN = 2.0  # dormant bias = min(old biases) - this; sigmoid affinities differ by less than 1

VERTICAL_FILE = "vertical.json"  # the description of what was added, saved next to a grown model


def moe_layers(model: Model) -> dict[int, MoE]:
    """Every MoE layer of the model by layer index (MTP layers have indices >= num_hidden_layers)."""
    return {b.mlp.layer_idx: b.mlp for b in [*model.layers, *model.mtp] if b.is_moe}


@dataclass
class AddedExperts:
    """What ``add_expert`` did: enough to train, inspect, save and reload the vertical."""

    n: int  # new experts per layer
    init: str
    layers: list[int]  # MoE layers whose new experts are live (trainable)
    absent_layers: list[int]  # MoE layers whose new slots are inactive (never routed; config.inactive_experts)
    new_experts: list[int]  # indices of the new experts in every grown layer
    old_to_new: list[int]  # old expert j now lives at index old_to_new[j]
    sources: dict[int, list[int]] = field(default_factory=dict)  # layer -> expert copied (copy init)
    experts_before: int = 0
    params_before: int = 0
    params_after: int = 0
    params_live: int = 0  # parameters of the live new experts and their router rows
    train_tokens: list[int] = field(default_factory=list)  # token ids whose embedding/head rows train

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    def describe(self) -> str:
        lines = [
            f"added {self.n} routed expert(s) per MoE layer ({self.experts_before} -> "
            f"{self.experts_before + self.n}), init={self.init!r}",
            f"live in layers {self.layers}"
            + (f", absent (never routed) in {self.absent_layers}" if self.absent_layers else ""),
            f"new expert indices {self.new_experts}",
            f"parameters {self.params_before:,} -> {self.params_after:,} (+{self.params_added:,}); "
            f"trainable in the vertical {self.params_live:,}",
        ]  # fmt: skip
        if self.sources:
            lines.append("copied from " + ", ".join(f"layer {k}: {v}" for k, v in sorted(self.sources.items())))
        return "\n".join(lines)

    def save(self, folder: str | Path) -> Path:
        """Write ``vertical.json`` into a model folder (atomically)."""
        path = Path(folder) / VERTICAL_FILE
        data = asdict(self)
        data["sources"] = {str(k): v for k, v in self.sources.items()}
        atomic_write_json(path, data)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> AddedExperts:
        path = Path(folder) / VERTICAL_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: this folder holds no grown model (save it with added.save)")
        data = read_json(path)
        data["sources"] = {int(k): v for k, v in data.get("sources", {}).items()}
        return cls(**data)


@torch.no_grad()
def _expert_usage(model: Model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per MoE layer: how many routed slots each expert got on token ids (B, T)."""
    with eval_mode(model):
        out = model(ids.to(model.device), compute_mtp=len(model.mtp) > 0)
    return {s.layer_idx: s.counts.float().cpu() for s in out.routing}


@torch.no_grad()
def add_expert(
    model: Model,
    n: int = 1,
    layers: Sequence[int] | None = None,
    init: str = "copy",
    *,
    source: int | None = None,
    probe_ids: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[Model, AddedExperts]:
    """A copy of ``model`` with ``n`` more routed experts in every MoE layer; returns (grown, added).

    layers: MoE layer indices whose new experts are live (default: every MoE layer of the main model;
        MTP layers only if listed). The other MoE layers get the slots too (one config, one expert
        count) with the new experts inactive (``Router.active``, recorded in ``config.inactive_experts``).
    init: "copy" (weights and router row of an existing expert), "average" (of the layer's experts),
        "random" (normal with the model's initializer_range, router row too).
    source: the expert to copy (an index of the base). Default: in each layer and group, the expert
        the tokens of ``probe_ids`` (B, T) use most, or the first expert of the group without them.
    The new experts start dormant (never selected): the grown model's outputs equal the base's.
    """
    config = model.config
    if init not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer (experts to add per layer), got {n!r}")
    moes = moe_layers(model)
    if not moes:
        raise ConfigError("the model has no MoE layer to grow (first_k_dense_replace covers every layer)")
    E, G = config.n_routed_experts, config.n_group
    if n % G:
        raise ConfigError(
            f"n={n} new experts do not split evenly over n_group={G} routing groups; the new experts go "
            f"n / n_group to each group so that old experts keep their group: use n={G * max(1, round(n / G))}"
        )
    main = [i for i in moes if i < config.num_hidden_layers]
    live = sorted(main if layers is None else set(layers))
    unknown = [i for i in live if i not in moes]
    if unknown:
        raise ConfigError(f"layers {unknown} are not MoE layers; the MoE layers are {sorted(moes)}")
    if source is not None and not 0 <= source < E:
        raise ConfigError(f"source={source} is not an expert index (the layers have {E} experts)")

    params_before = model.num_parameters()
    grown = copy.deepcopy(model)
    layout = GrowthLayout(E, n, G)
    per_old, per_new = E // G, n // G
    sources: dict[int, list[int]] = {}
    if init == "copy":  # per layer and new slot: the given source, else the group's busiest expert on the probe
        usage = _expert_usage(model, probe_ids) if probe_ids is not None and source is None else {}
        for idx in moes:
            srcs = []
            for slot in range(n):
                group = slot // per_new
                if source is not None:
                    srcs.append(source)
                elif idx in usage:
                    srcs.append(group * per_old + int(usage[idx][group * per_old : (group + 1) * per_old].argmax()))
                else:
                    srcs.append(group * per_old)
            sources[idx] = srcs
    grown.grow_experts(n, live, init, sources=sources, generator=torch.Generator().manual_seed(seed),
                       margin=DORMANT_MARGIN)  # fmt: skip
    old_to_new, new = layout.old_to_new, layout.new
    sources = {idx: srcs for idx, srcs in sources.items() if idx in live}

    per_expert = 3 * config.moe_intermediate_size * config.hidden_size + config.hidden_size  # + router row
    added = AddedExperts(
        n=n,
        init=init,
        layers=live,
        absent_layers=sorted(set(moes) - set(live)),
        new_experts=new,
        old_to_new=old_to_new,
        sources=sources,
        experts_before=E,
        params_before=params_before,
        params_after=grown.num_parameters(),
        params_live=per_expert * n * len(live),
    )
    return grown, added
