"""DeepSeek Workbench: DeepSeek-V3 and R1 ideas implemented for real, at a scale that runs anywhere.

The package reads in the order of the ideas: ``config`` -> ``rope`` / ``mla`` / ``moe`` / ``mtp`` ->
``block`` -> ``model`` -> ``train`` / ``generate`` -> ``hf`` (checkpoints) -> ``accounting``.
"""

from workbench.config import ConfigError, ModelConfig
from workbench.hf import load_hf, save_hf
from workbench.model import Model, ModelOutput

__all__ = ["ConfigError", "Model", "ModelConfig", "ModelOutput", "load_hf", "save_hf"]
__version__ = "0.1.0"
