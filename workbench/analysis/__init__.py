"""Analysis: read models and their measurements, never train them.

``routing``: how specialised the experts are, and knock-outs; ``outputs``: what a model writes, per
sequence, prompt or problem; ``kv``: post-hoc compression of a trained cache; ``cost``: the FLOPs a
training run spent; ``serving``: how many contexts fit in a GPU or on a disk, and what a request costs at
per-token prices; ``stats``: intervals and verdicts that only conclude beyond the noise; ``claims``:
the claims ledger. The measurements themselves (expert usage and loss per domain) are
``workbench.train.measure``.
"""

from workbench.analysis.routing import effective_experts, specialisation
from workbench.analysis.stats import Estimate, Verdict, mean_interval, paired_difference, proportion
from workbench.train.measure import expert_usage_by_domain, loss_by_domain

__all__ = [
    "Estimate",
    "Verdict",
    "effective_experts",
    "expert_usage_by_domain",
    "loss_by_domain",
    "mean_interval",
    "paired_difference",
    "proportion",
    "specialisation",
]
