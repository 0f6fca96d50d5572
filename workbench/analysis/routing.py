"""How specialised the experts are: a summary of ``expert_usage_by_domain`` (``workbench.train.measure``).

``specialisation`` is, per layer, the mean total-variation distance between each domain's expert
distribution and the average over domains: 0 when every domain uses the experts in the same
proportions, 1 when the domains use disjoint sets of experts. An untrained router is not at 0 (it
routes on whatever the random embeddings of each domain's tokens happen to look like), so always
compare against the same measurement at initialisation.
"""

from __future__ import annotations

import torch


def specialisation(usage: torch.Tensor) -> torch.Tensor:
    """Per layer: mean total-variation distance of each domain's expert usage from the domains' mean."""
    mean = usage.mean(dim=1, keepdim=True)  # (layers, 1, E)
    return 0.5 * (usage - mean).abs().sum(dim=-1).mean(dim=-1)  # (layers,)
