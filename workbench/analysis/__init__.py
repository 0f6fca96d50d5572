"""Analysis: read models and their measurements, never train them. ``routing``: how specialised the
experts are; the measurements themselves (expert usage and loss per domain) are ``workbench.train.measure``."""

from workbench.analysis.routing import specialisation
from workbench.train.measure import expert_usage_by_domain, loss_by_domain

__all__ = ["expert_usage_by_domain", "loss_by_domain", "specialisation"]
