"""ESFT, Expert-Specialized Fine-Tuning (Wang et al. 2024): train only the experts a new domain already uses.

The idea
--------
A fine-grained MoE sends each token to a few of many small experts, and which experts a domain uses is
concentrated: a few experts take most of a domain's tokens. ESFT measures that on a sample of the new
domain and trains only those experts, everything else frozen (attention, embeddings, shared experts, the
router, the other experts). Two scores per MoE layer l and routed expert i, over the N tokens of the sample:

* **average gate score** ``g_i = 1/N sum_t w_{t,i}``: the combine weight token t gives expert i (0 when
  i is not among its top-k): how much of the layer's output the expert writes for this domain;
* **token-selection ratio** ``r_i = 1/(N k) sum_t 1[i in topk(t)]``: the share of routed slots it takes.

Each score is normalised to sum 1 *within its layer*, the experts of a layer are sorted by it, and the
smallest set whose cumulative score reaches the threshold ``p`` is selected (``select_experts``: add the
best expert while the sum is still below p, so the last one added may overshoot p, as the released code
does). So a layer whose domain traffic is concentrated trains few experts, a diffuse one trains more.

Within the layer or across layers? The paper describes per-layer normalisation; the released script
(``scripts/expert/generate_expert_config.py``) divides by ``np.sum(scores, axis=0)``, a sum per expert
across layers. We normalise within each layer, as the paper says: a threshold p then means the same share
of each layer's traffic in every layer, whatever the layers' sizes, and each layer's choice depends only on
that layer's routing.

Training only the selected experts: the experts are stored stacked, (E, I, D), so the selected experts are
*rows* of three tensors; a gradient hook zeroes the other rows (``methods.RowMasks``) and AdamW with weight
decay 0 then leaves them bit for bit as they were. The balancing bias is frozen too (gamma 0): the token
scores count the bias-steered selections, so the base's bias is part of what ESFT measured, and loss-free
balancing would otherwise keep moving tokens (old-domain ones included) between experts while the selected
ones learn.

Where it simplifies: the paper's models have 64 routed experts and top-6, with p around 0.1-0.2 picking a
handful per layer. Ours have 8 and top-2, so p moves in coarse steps (p=0.1 picks 1 expert, p=0.2 two).
The paper computes scores on a sample of the domain's training data; we use validation windows of the same
worked traces the method trains on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.model import Model
from workbench.util import eval_mode

SCORES = ("gate", "token")
_EPS = 1e-6  # float32 cumulative sums of normalised scores may miss p = 1 by rounding


def expert_scores(routing: Sequence, score: str) -> dict[int, torch.Tensor]:
    """Per MoE layer (by layer index): the normalised (sum 1) ESFT score of each routed expert, shape (E,).

    routing: the ``ModelOutput.routing`` of a forward pass over the new domain's tokens (each item has
    ``layer_idx``, ``topk_idx`` (..., k), ``topk_weight`` (..., k) and ``counts`` (E,)).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    out = {}
    for s in routing:
        E = s.counts.numel()
        k = s.topk_idx.shape[-1]
        idx = s.topk_idx.reshape(-1, k).cpu()  # (N, k)
        if score == "gate":
            w = s.topk_weight.reshape(-1, k).detach().float().cpu()  # (N, k)
            total = torch.zeros(E).index_add_(0, idx.reshape(-1), w.reshape(-1))
        else:
            total = torch.bincount(idx.reshape(-1), minlength=E).float()
        if total.sum() <= 0:
            raise ValueError(f"layer {s.layer_idx}: no token reached any expert; score a non-empty sample")
        out[s.layer_idx] = total / total.sum()
    return out


def select_experts(scores: torch.Tensor, p: float) -> list[int]:
    """The smallest set of experts whose cumulative normalised score first reaches ``p`` (sorted indices)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"esft_p must be in (0, 1], got {p}: it is the share of the layer's score to cover")
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    chosen, cum = [], 0.0
    for e in order:
        if cum >= p - _EPS:
            break
        chosen.append(e)
        cum += float(scores[e])
    return sorted(chosen)


@torch.no_grad()
def esft_select(model: Model, ids: torch.Tensor, score: str, p: float) -> dict[int, list[int]]:
    """ESFT's selection on token windows ``ids`` (B, T) of the new domain: per MoE layer of the main model,
    the experts to train."""
    if not 0.0 < p <= 1.0:  # before the forward pass
        raise ValueError(f"esft_p must be in (0, 1], got {p}: it is the share of the layer's score to cover")
    with eval_mode(model):
        out = model(ids.to(model.device), compute_mtp=False)
    return {layer: select_experts(s, p) for layer, s in expert_scores(out.routing, score).items()}


__all__ = ["SCORES", "esft_select", "expert_scores", "select_experts"]
