"""DeepSeek Workbench: DeepSeek-V3 and R1 ideas implemented for real, at a scale that runs anywhere.

The package is built in layers, each importing only from those before it (``tests/test_layers.py``):
``config`` -> ``fp8`` -> ``model`` -> ``io`` -> ``data`` / ``tasks`` -> ``train`` -> ``rl`` -> ``vertical``
-> ``serve`` -> ``analysis`` -> ``viz`` -> ``cli``.
"""

from workbench.config import ConfigError, ModelConfig
from workbench.io.hf import load_hf, save_hf
from workbench.model import Model, ModelOutput

__all__ = ["ConfigError", "Model", "ModelConfig", "ModelOutput", "load_hf", "save_hf"]
__version__ = "0.1.0"
