"""Add a vertical: grow a trained MoE by new experts and train only them on a new domain."""

from workbench.vertical.extend import *  # noqa: F403
from workbench.vertical.extend import __all__  # noqa: F401
