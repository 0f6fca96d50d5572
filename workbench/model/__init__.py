"""Model parts, one idea per module, read in this order: ``layers`` (RMSNorm, SwiGLU) -> ``rope`` ->
``mla`` (Multi-head Latent Attention and its latent cache) -> ``moe`` (DeepSeekMoE: router, routed
experts, balancing) -> ``mtp`` (Multi-Token Prediction) -> ``block`` -> ``model``; then ``generate``
(decoding with the latent cache, MTP speculation) and ``accounting`` (parameters, KV bytes, FLOPs).
"""

from workbench.model.model import IGNORE_INDEX, Model, ModelOutput

__all__ = ["IGNORE_INDEX", "Model", "ModelOutput"]
