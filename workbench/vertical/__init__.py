"""Add a vertical: specialise a trained MoE for a new domain, and ship the change as a delta.

Which method buys what (``methods.py``, one ``Recipe``, ``python -m workbench vertical --method ...``):
full fine-tuning (the ceiling), ESFT (``esft.py``: train only the experts the domain already uses), new
experts (below), peft LoRA adapters on attention and the dense/shared MLP, and combinations. Every method
but full fine-tuning leaves the base untouched and ships as a delta (``delta.py``: a safetensors file of
only the trained tensors, applied onto the base at load time), served behind a per-request gate
(``gate.py``: a probe on the base's prompt features switches the delta on for its own requests; several
verticals on one base, each request to its own). ``specialise.py`` runs and measures one recipe.

Growing new experts
-------------------
The idea
--------
A Mixture-of-Experts model already divides its feed-forward knowledge among many small experts, and a
router decides, token by token, which ones run. That suggests a cheap way to teach a trained model a
new speciality (a new "vertical") without retraining it or damaging what it knows: **add an expert per
MoE layer, and train only the new experts and the router rows that send tokens to them.** Everything
else (attention, embeddings, shared experts, the old experts, the old router rows) stays frozen.

Three steps, one module each (``grow``, ``wake``, ``freeze``), run by ``recipe`` and measured by ``measure``:

1. ``add_expert(model, n, layers, init)`` grows each chosen MoE layer by ``n`` routed experts. Their
   weights start as a **copy** of an existing expert (by default the one the new domain already uses
   most), the **average** of the layer's experts, or **random** (the model's initialisation). Their
   router rows start the same way. Their balancing bias starts *dormant*: lower than any old expert's
   bias by more than the whole range of a sigmoid affinity, so the new experts are never selected and
   **the grown model computes exactly what the base computed**, token for token: in float64 the logits
   are identical (the tests check it). In float32 the router's matrix product has more rows, BLAS may
   sum in another order, and the two agree to rounding; a token whose k-th and (k+1)-th affinities tie
   within rounding can then pick the other expert. Layers not chosen still get the slots, since every
   layer of a config has the same number of experts, but there the new experts are *inactive*
   (``Router.active``, saved as ``config.inactive_experts``): never selected, never trained. The growing
   itself is the model's own seam, ``Model.grow_experts`` / ``MoE.grow``; this module decides what to
   grow from (the busiest expert of the new domain) and where the vertical lives.
2. ``wake_experts(model, added, new_ids, old_ids, old_rate)`` makes the new experts reachable for the
   new domain. Each new router row becomes a linear classifier of the new domain's tokens: logistic
   regression on the router's inputs x of new-domain against old-domain tokens (``fit_probe``; a router
   row computes ``sigmoid(x . w)``, exactly a logistic model without intercept). Then the dormant bias is
   raised, by bisection through the real router, as far as a *forgetting budget* allows: at most
   ``old_rate`` of the old domain's tokens may select a new expert (or, with ``rate``, until that share of
   new-domain tokens do). From here the old-domain function is no longer exact: it changes only where an
   old-domain token picks a new expert.
3. ``train_only_new_experts(model, added)`` is a context manager: inside it only the new experts, their
   router rows (and, if asked, the rows of new tokens in the embedding and the output head) receive
   gradients, and loss-free balancing moves only the new experts' biases. Any of our loops then trains
   the vertical: ``train_vertical`` (language modelling on the new domain mixed with replay of the old
   corpus: the cold start of the vertical's chain of thought, since its documents are worked traces),
   ``rl.sft.sft_train`` and ``rl.grpo.grpo_train`` (the chain of thought by RL). Because the experts
   are stored stacked, (E, I, D), freezing *some* experts of a tensor is done with gradient masks (a
   hook zeroes the old rows' gradients; AdamW with weight decay 0 then leaves them bit for bit
   unchanged, which the tests check).

What it buys: the trained parameters are a few percent of the model, the optimiser state shrinks in
proportion, and the backward pass skips the weight gradients of every frozen matrix (``VerticalReport``
reports trained vs total parameters and an estimate of the compute saved; lesson 9 measures the step
time).

What it cannot do: new experts are feed-forward networks. They learn new *mappings* of what attention
brings them, not new ways of *reading* the context. A vertical must lean on reading the base already does
(lesson 9: subtraction grown onto a model that adds works; Roman numerals grown onto ``data/tiny-model``,
which cannot copy a number out of its context, learn every letter and never the right digit).

Balancing: ``train_vertical`` keeps the new experts' bias where waking put it (``bias_update_speed`` 0
by default): loss-free balancing pushes every expert toward the mean load, and the only way for a new
expert to get it is to take old-domain tokens.

Where it simplifies
-------------------
Real systems that grow MoE models (e.g. "expert expansion" for new languages) also re-balance the
routers on a large replay set and sometimes unfreeze more; we keep the strict version so that what
changes is exactly what we added. With group-limited routing (``n_group > 1``) the new experts are
inserted at the end of each group, ``n / n_group`` per group, so that every old expert keeps its group;
so ``n`` must be a multiple of ``n_group``. The new tokens' rows (``<think>`` and friends) are the one
place the vertical touches shared weights, and only when ``train_tokens`` names them.
"""

from workbench.vertical.delta import apply_delta, fingerprint, read_delta, save_delta
from workbench.vertical.esft import esft_select, expert_scores, select_experts
from workbench.vertical.freeze import Trainable, flops_saved_estimate, new_token_ids, train_only_new_experts
from workbench.vertical.gate import DomainGate, Verticals, gated_choice, prompt_features
from workbench.vertical.grow import DORMANT_MARGIN, INITS, AddedExperts, add_expert, moe_layers
from workbench.vertical.measure import completion_loss, domain_windows, expert_share, old_windows, vertical_metrics
from workbench.vertical.methods import PARTS, Prepared, Recipe, RowMasks, prepare
from workbench.vertical.recipe import (
    VerticalConfig,
    VerticalReport,
    load_vertical,
    replay_documents,
    run_vertical,
    save_vertical,
    train_vertical,
    vertical_dataset,
)
from workbench.vertical.specialise import correctness, describe_row, fit_gate, recipe_dataset, specialise
from workbench.vertical.wake import PROBES, fit_probe, selection_rate, wake_experts

__all__ = [
    "DORMANT_MARGIN",
    "PARTS",
    "DomainGate",
    "Prepared",
    "Recipe",
    "RowMasks",
    "Verticals",
    "apply_delta",
    "correctness",
    "describe_row",
    "esft_select",
    "expert_share",
    "expert_scores",
    "fingerprint",
    "fit_gate",
    "gated_choice",
    "prepare",
    "prompt_features",
    "read_delta",
    "recipe_dataset",
    "save_delta",
    "select_experts",
    "specialise",
    "INITS",
    "PROBES",
    "AddedExperts",
    "Trainable",
    "VerticalConfig",
    "VerticalReport",
    "add_expert",
    "domain_windows",
    "fit_probe",
    "completion_loss",
    "flops_saved_estimate",
    "load_vertical",
    "run_vertical",
    "vertical_metrics",
    "moe_layers",
    "new_token_ids",
    "old_windows",
    "replay_documents",
    "save_vertical",
    "selection_rate",
    "train_only_new_experts",
    "train_vertical",
    "vertical_dataset",
    "wake_experts",
]
