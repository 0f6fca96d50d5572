"""Measuring a model on the corpus: which experts each domain uses, and the loss per domain.

``expert_usage_by_domain`` runs windows drawn from each domain of a ``TokenDataset`` through the
model and counts, per MoE layer, the share of that domain's routed slots each expert receives:
a tensor ``usage[layer, domain, expert]`` whose rows sum to one.

``loss_by_domain`` is the mean next-token loss of each domain's windows. ``workbench.analysis.routing``
summarises the usage as one specialisation figure per layer.
"""

from __future__ import annotations

import torch

from workbench.model import Model
from workbench.util import eval_mode


@torch.no_grad()
def expert_usage_by_domain(
    model: Model, dataset, split: str = "val", batch_size: int = 8, seq_len: int = 64, n_batches: int = 2, seed: int = 0
) -> torch.Tensor:
    """usage (n_moe_layers, n_domains, n_routed_experts): share of each domain's routed slots per expert."""
    generator = torch.Generator().manual_seed(seed)
    per_domain = []
    with eval_mode(model):
        for domain in dataset.domains:
            counts = None
            for _ in range(n_batches):
                ids, _ = dataset.domain_batch(domain, split, batch_size, seq_len, generator)
                routing = model(ids.to(model.device)).routing
                batch_counts = torch.stack([s.counts.float().cpu() for s in routing])  # (layers, E)
                counts = batch_counts if counts is None else counts + batch_counts
            per_domain.append(counts / counts.sum(dim=-1, keepdim=True))
    return torch.stack(per_domain, dim=1)  # (layers, domains, E)


@torch.no_grad()
def loss_by_domain(
    model: Model, dataset, split: str = "val", batch_size: int = 8, seq_len: int = 64, n_batches: int = 2, seed: int = 0
) -> dict[str, float]:
    """Mean next-token loss on windows of each domain."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    with eval_mode(model):
        for domain in dataset.domains:
            losses = []
            for _ in range(n_batches):
                ids, _ = dataset.domain_batch(domain, split, batch_size, seq_len, generator)
                ids = ids.to(model.device)
                losses.append(float(model(ids, labels=ids, compute_mtp=False).main_loss))
            out[domain] = sum(losses) / len(losses)
    return out
