"""Training only what was added: gradient masks on the stacked expert tensors and router rows, the
balancing masks that keep loss-free balancing on the new experts, and what freezing saves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.model import Model
from workbench.vertical.grow import AddedExperts, moe_layers


@dataclass
class Trainable:
    """What ``train_only_new_experts`` leaves trainable."""

    parameters: int  # entries that receive gradient
    total: int  # all parameters of the model
    tensors: list[str]  # names of the tensors that carry a (masked) gradient
    balance_masks: list[torch.Tensor] = field(default_factory=list)  # per router: the experts balancing may move

    @property
    def fraction(self) -> float:
        return self.parameters / self.total


@contextlib.contextmanager
def train_only_new_experts(
    model: Model, added: AddedExperts, *, train_router: bool = True, train_tokens: Sequence[int] = ()
) -> Iterator[Trainable]:
    """Inside the block only the live new experts (and their router rows, and the embedding and output
    rows of ``train_tokens``) get gradients; ``Trainable.balance_masks`` are the masks that make balancing
    move only the new experts' biases (pass them to the loop: ``balance_masks=trainable.balance_masks``).

    Use AdamW with weight decay 0 (decoupled decay would shrink the frozen rows too): every loop here
    (``train_vertical``, ``sft_train``, ``grpo_train``) does by default. On exit everything is as before.
    """
    moes = moe_layers(model)
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    hooks: list[Any] = []
    names: list[str] = []
    balance_masks: list[torch.Tensor] = []
    count = 0
    device = model.device

    def masked(p: torch.nn.Parameter, name: str, rows: torch.Tensor) -> None:
        nonlocal count
        shape = (-1,) + (1,) * (p.dim() - 1)
        mask = rows.to(device=p.device, dtype=p.dtype).view(shape)
        p.requires_grad_(True)
        hooks.append(p.register_hook(lambda g, m=mask: g * m))
        names.append(name)
        count += int(rows.sum()) * (p[0].numel())

    try:
        model.requires_grad_(False)
        for i, moe in moes.items():
            rows = torch.zeros(moe.gate.n_experts, dtype=torch.bool)
            if i in added.layers:
                rows[added.new_experts] = True
                for name in ("gate_proj", "up_proj", "down_proj"):
                    masked(getattr(moe.experts, name), f"layer {i} experts.{name}", rows)
                if train_router:
                    masked(moe.gate.weight, f"layer {i} gate.weight", rows)
            balance_masks.append(rows.to(device))
        if train_tokens:
            rows = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            rows[list(train_tokens)] = True
            masked(model.embed_tokens.weight, "embed_tokens.weight", rows)
            if model.lm_head.weight is not model.embed_tokens.weight:
                masked(model.lm_head.weight, "lm_head.weight", rows)
        yield Trainable(parameters=count, total=model.num_parameters(), tensors=names, balance_masks=balance_masks)
    finally:
        for h in hooks:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved.get(name, True))


def new_token_ids(tokenizer, base_tokens: torch.Tensor, texts: Sequence[str]) -> list[int]:
    """Token ids that occur in ``texts`` but never in the base corpus's tokens: their rows are untrained."""
    seen = set(base_tokens.unique().tolist())
    found = {t for text in texts for t in tokenizer.encode(text)}
    return sorted(found - seen)


def flops_saved_estimate(model: Model, trainable: Trainable) -> float:
    """Share of training FLOPs skipped when only ``trainable`` parameters get weight gradients.

    Per token a full step costs about 6 x active parameters (2 forward, 2 for the gradients of the
    activations, 2 for the gradients of the weights). Frozen weights skip their 2; the activations'
    gradients are still needed below the first trainable layer's top, so they stay (an upper bound).
    """
    from workbench.model.accounting import count_params

    active = count_params(model.config)["active"]
    return (2 * active - 2 * min(trainable.parameters, active)) / (6 * active)
