"""Model configuration: every switch of a DeepSeek-V3-style model in one validated dataclass.

The field names are those of Hugging Face transformers' ``DeepseekV3Config`` (and of the
``config.json`` DeepSeek publishes), so a config read from a real checkpoint maps one-to-one onto
ours and back. On top of the architecture we keep the knobs of training that DeepSeek-V3 describes:

* ``bias_update_speed`` (the paper's gamma): how far the auxiliary-loss-free balancing bias moves
  after each optimiser step.
* ``seq_aux_loss_alpha`` (alpha): weight of the complementary sequence-wise balance loss.
* ``mtp_loss_weight`` (lambda): weight of the Multi-Token Prediction loss.
* ``attn_mode``: ``"naive"`` (expand the latent into per-head keys and values, as in training) or
  ``"absorb"`` (fold the up-projections into the query and output, cache only the latent).
* ``fp8``: run every linear layer's and routed expert's GEMMs in FP8 (E4M3, 1x128 activation tiles,
  128x128 weight blocks) as DeepSeek-V3 trains, keeping FP32 master weights (see ``workbench.fp8``).

Presets:

* ``tiny``: CI scale; trains in about a minute on two CPU cores.
* ``small``: a laptop lesson; a few minutes of training shows every effect.
* ``gpu``: fills one H100 usefully (about 0.9B parameters in total, a fraction active).
* ``deepseek-v3``: the real 671B shape. Use it on the ``meta`` device for accounting only; it is
  never allocated.

``ModelConfig.validate()`` (called on construction) rejects impossible configurations with a message
that names the field and says how to fix it.

Published configs (``from_hf``): DeepSeek-V3 / R1 (``model_type`` deepseek_v3, also kimi_k2) and V2 /
V2-Lite (deepseek_v2) read field for field. ``topk_method`` selects the routing rule (V3's ``noaux_tc``,
V2's ``group_limited_greedy``, V2-Lite's ``greedy``), and a field a V2 file leaves out takes V2's value
(softmax scoring, no renormalisation, a scaling factor of 1, no MTP), not V3's. A field that would change
the computation and is not implemented here (another activation, attention or MLP biases,
``moe_layer_freq`` > 1, a rope scaling type other than YaRN, an unknown routing method) is refused by
name; fields that do not change the forward pass (``HF_IGNORED_FIELDS``: loss weights, parallelism) are
ignored with one ``ConfigNote``. Where DeepSeek's V2 code and transformers disagree (``norm_topk_prob``
with a scaling factor other than 1: one normalises and does not scale, the other scales and does not
normalise) a published V2 file is refused; our own files (which carry a ``workbench`` block) use V3's
rule, normalise then scale.

Before those comparisons every field is checked against its annotation (an integer is an integer, not
96.0, "96" or True; a float is finite). A misspelled field is refused with the closest name
(``from_preset``, ``replace``); in a ``config.json``, which holds many keys we do not read, a near miss of
a field is warned about by name.

The package, one job per module: ``checks`` (every field against its annotation, YaRN's settings, the
``ConfigError`` they raise), ``model`` (the dataclass, its validation and ``from_preset`` / ``replace``),
``presets`` (the presets' values), ``hf`` (``from_hf`` / ``to_hf``: reading and writing ``config.json``).
"""

from workbench.config.checks import ConfigError
from workbench.config.model import TOPK_METHODS, ModelConfig

from workbench.config.hf import HF_IGNORED_FIELDS, HF_MODEL_TYPES, ConfigNote  # isort: skip (after model)

__all__ = ["HF_IGNORED_FIELDS", "HF_MODEL_TYPES", "TOPK_METHODS", "ConfigError", "ConfigNote", "ModelConfig"]
