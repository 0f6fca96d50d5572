"""Looking inside a trained model: which experts each domain uses, and how specialised they are.

``expert_usage_by_domain`` runs windows drawn from each domain of a ``TokenDataset`` through the
model and counts, per MoE layer, the share of that domain's routed slots each expert receives:
a tensor ``usage[layer, domain, expert]`` whose rows sum to one.

``specialisation`` summarises it per layer as the mean total-variation distance between each domain's
expert distribution and the average over domains: 0 when every domain uses the experts in the same
proportions, 1 when the domains use disjoint sets of experts. An untrained router is not at 0 (it
routes on whatever the random embeddings of each domain's tokens happen to look like), so always
compare against the same measurement at initialisation.
"""

from __future__ import annotations

import torch

from workbench.model import Model


@torch.no_grad()
def expert_usage_by_domain(
    model: Model, dataset, split: str = "val", batch_size: int = 8, seq_len: int = 64, n_batches: int = 2, seed: int = 0
) -> torch.Tensor:
    """usage (n_moe_layers, n_domains, n_routed_experts): share of each domain's routed slots per expert."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    per_domain = []
    for domain in dataset.domains:
        counts = None
        for _ in range(n_batches):
            ids, _ = dataset.domain_batch(domain, split, batch_size, seq_len, generator)
            routing = model(ids.to(model.device)).routing
            batch_counts = torch.stack([s.counts.float().cpu() for s in routing])  # (layers, E)
            counts = batch_counts if counts is None else counts + batch_counts
        per_domain.append(counts / counts.sum(dim=-1, keepdim=True))
    model.train(was_training)
    return torch.stack(per_domain, dim=1)  # (layers, domains, E)


def specialisation(usage: torch.Tensor) -> torch.Tensor:
    """Per layer: mean total-variation distance of each domain's expert usage from the domains' mean."""
    mean = usage.mean(dim=1, keepdim=True)  # (layers, 1, E)
    return 0.5 * (usage - mean).abs().sum(dim=-1).mean(dim=-1)  # (layers,)


@torch.no_grad()
def loss_by_domain(
    model: Model, dataset, split: str = "val", batch_size: int = 8, seq_len: int = 64, n_batches: int = 2, seed: int = 0
) -> dict[str, float]:
    """Mean next-token loss on windows of each domain."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for domain in dataset.domains:
        losses = []
        for _ in range(n_batches):
            ids, _ = dataset.domain_batch(domain, split, batch_size, seq_len, generator)
            ids = ids.to(model.device)
            losses.append(float(model(ids, labels=ids, compute_mtp=False).main_loss))
        out[domain] = sum(losses) / len(losses)
    model.train(was_training)
    return out
