"""A routing report of any checkpoint: expert load per layer, MaxVio, specialisation, shared experts.

``routing_report(model, sources)`` runs token windows from a few named *sources* (the domains of the
generated corpus, or one per input file) through a model, whole (``Model``) or one layer at a time
(``workbench.io.layered.LayeredModel``, for checkpoints bigger than memory), and measures per MoE layer:

* **expert load**: how many routed slots each expert received, over all sources, and its share;
* **MaxVio**: ``(max load - mean load) / mean load``, DeepSeek-V3's balance figure (0 is perfect balance;
  the loss-free bias keeps it low in training, and a trained checkpoint shows what it reached);
* **specialisation per source**: each source's expert distribution and, with two or more sources, the
  mean total-variation distance from the sources' mean (``workbench.analysis.routing.specialisation``:
  0 when every source uses the experts alike, 1 when they use disjoint experts);
* **shared-expert contribution**: the share of the shared experts in the MoE layer's output,
  ``sum_t |shared_t| / sum_t (|shared_t| + |routed_t|)`` over tokens (Euclidean norms): how much of what
  the layer adds every token gets whatever the routing.

``report_html`` draws it as one self-contained page (plotly.js inlined, no network needed) and the
report itself is plain JSON. Where it simplifies: the windows of a source are cut from its concatenated
tokens (no padding, so the last partial window is dropped unless it is the only one); the MTP modules
are not run; a router's decision is recorded, not the scores of the experts it passed over.
"""

from __future__ import annotations

import contextlib
import html
import json
import resource
import time
from collections.abc import Sequence
from typing import Any

import torch

from workbench.analysis.routing import specialisation
from workbench.util import eval_mode


def windows(ids: Sequence[int], seq_len: int, max_tokens: int | None = None) -> list[list[int]]:
    """Cut a token stream into windows of ``seq_len`` (the last partial one dropped, unless it is the only
    one), using at most ``max_tokens`` tokens."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = list(ids)[: max_tokens if max_tokens is not None else None]
    if len(ids) < 2:
        raise ValueError(f"a source needs at least 2 tokens, got {len(ids)}")
    if len(ids) < seq_len:
        return [ids]
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


class _Contribution:
    """Forward hooks on a MoE layer's shared and routed experts: the norms of what each adds per token."""

    def __init__(self) -> None:
        self.shared: dict[int, float] = {}
        self.routed: dict[int, float] = {}

    def attach(self, block: torch.nn.Module) -> list[Any]:
        if not getattr(block, "is_moe", False) or block.mlp.shared_experts is None:
            return []
        idx = block.mlp.layer_idx

        def on_shared(_module, _inputs, output):  # (B, T, D)
            self.shared[idx] = self.shared.get(idx, 0.0) + float(output.float().norm(dim=-1).sum())

        def on_routed(_module, _inputs, output):  # (N, D)
            self.routed[idx] = self.routed.get(idx, 0.0) + float(output.float().norm(dim=-1).sum())

        return [
            block.mlp.shared_experts.register_forward_hook(on_shared),
            block.mlp.experts.register_forward_hook(on_routed),
        ]


@torch.no_grad()
def routing_report(
    model: Any,
    sources: dict[str, list[list[int]]],
    *,
    batch_size: int = 8,
    attn_mode: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure routing on ``sources`` (name -> token windows) with ``model`` (a ``Model`` or a
    ``LayeredModel``). Returns a JSON-ready dict (see the module docstring)."""
    if not sources:
        raise ValueError("give at least one source of tokens (a file, or the corpus)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    config = model.config
    if config.n_moe_layers == 0:
        raise ValueError("this model has no MoE layer (first_k_dense_replace == num_hidden_layers): nothing is routed")
    layered = hasattr(model, "load_layer")
    device = torch.device(model.device)
    vocab = config.vocab_size
    for name, wins in sources.items():
        bad = [i for w in wins for i in w if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"source {name!r} holds token id {bad[0]} outside the model's vocabulary (0..{vocab - 1})")
    contribution = _Contribution()
    counts: dict[str, dict[int, torch.Tensor]] = {}
    tokens: dict[str, int] = {}
    weights_sum: dict[int, float] = {}
    slots: dict[int, int] = {}
    start = time.perf_counter()
    batches = [
        (name, wins[i : i + batch_size]) for name, wins in sources.items() for i in range(0, len(wins), batch_size)
    ]
    # windows of one batch must share their length (there are no padding masks): group by length
    grouped = []
    for name, wins in batches:
        by_len: dict[int, list[list[int]]] = {}
        for w in wins:
            by_len.setdefault(len(w), []).append(w)
        grouped += [(name, ws) for ws in by_len.values()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grouped), desc="routing report", unit="batch")
    handles: list[Any] = []
    if not layered:
        for block in model.layers:
            handles += contribution.attach(block)
    try:
        with eval_mode(model) if not layered else contextlib.nullcontext():
            for name, wins in grouped:
                ids = torch.tensor(wins, dtype=torch.long, device=device)  # (B, T)
                if layered:
                    out = model(
                        ids, attn_mode=attn_mode, on_layer=lambda _i, block: _remover(contribution.attach(block))
                    )
                else:
                    out = model(ids, attn_mode=attn_mode, compute_mtp=False)
                tokens[name] = tokens.get(name, 0) + ids.numel()
                per = counts.setdefault(name, {})
                for s in out.routing:
                    c = s.counts.detach().cpu().long()
                    per[s.layer_idx] = per[s.layer_idx] + c if s.layer_idx in per else c
                    weights_sum[s.layer_idx] = weights_sum.get(s.layer_idx, 0.0) + float(s.topk_weight.float().sum())
                    slots[s.layer_idx] = slots.get(s.layer_idx, 0) + s.topk_idx.numel()
                if bar is not None:
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start

    names = list(sources)
    layer_ids = sorted({i for per in counts.values() for i in per})
    E = config.n_routed_experts
    layers = []
    usage = torch.zeros(len(layer_ids), len(names), E)  # (layers, sources, E)
    for li, idx in enumerate(layer_ids):
        total = sum(counts[n][idx] for n in names).float()  # (E,)
        share = total / total.sum()
        per_source = {}
        for si, n in enumerate(names):
            c = counts[n][idx].float()
            usage[li, si] = c / c.sum()
            per_source[n] = [round(float(x), 6) for x in usage[li, si]]
        shared, routed = contribution.shared.get(idx), contribution.routed.get(idx)
        layers.append(
            {
                "layer": idx,
                "load": [int(x) for x in total],
                "load_share": [round(float(x), 6) for x in share],
                "max_vio": round(float((total.max() - total.mean()) / total.mean().clamp_min(1e-9)), 6),
                "idle_experts": int((total == 0).sum()),
                "mean_gate_weight": round(weights_sum[idx] / max(1, slots[idx]), 6),
                "per_source": per_source,
                "shared_share": None if shared is None else round(shared / max(1e-30, shared + routed), 6),
            }
        )
    spec = specialisation(usage).tolist() if len(names) > 1 else None
    vios = [entry["max_vio"] for entry in layers]
    if torch.cuda.is_available() and device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        memory = {"peak_cuda_allocated_bytes": peak}
    else:
        memory = {}
    memory["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": _describe(model, layered),
        "execution": "layer by layer" if layered else "whole model",
        "attn_mode": attn_mode or config.attn_mode,
        "sources": {n: {"windows": len(sources[n]), "tokens": tokens.get(n, 0)} for n in names},
        "layers": layers,
        "max_vio": {"mean": sum(vios) / len(vios), "max": max(vios)},
        "specialisation": None
        if spec is None
        else {"per_layer": [round(x, 6) for x in spec], "mean": sum(spec) / len(spec)},  # fmt: skip
        "shared_share": [entry["shared_share"] for entry in layers],
        "seconds": round(seconds, 3),
        "memory": memory,
    }


def _remover(handles: list[Any]):
    def remove() -> None:
        for h in handles:
            h.remove()

    return remove


def _describe(model: Any, layered: bool) -> dict[str, Any]:
    from workbench.model.accounting import count_params

    c = model.config
    counts = count_params(c)
    out = {
        "layers": c.num_hidden_layers,
        "moe_layers": c.n_moe_layers,
        "routed_experts": c.n_routed_experts,
        "shared_experts": c.n_shared_experts,
        "experts_per_token": c.num_experts_per_tok,
        "topk_method": c.topk_method,
        "scoring_func": c.scoring_func,
        "n_group": c.n_group,
        "topk_group": c.topk_group,
        "params_total": counts["total"],
        "params_active": counts["active"],
    }
    if layered:
        out["folder"] = str(model.plan.folder)
        out["resident_bytes"] = model.resident_bytes
        out["layers_read"] = model.layers_loaded
    return out


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------
def report_figures(report: dict[str, Any]) -> list[Any]:
    """The report's plotly figures: expert load per layer, MaxVio, specialisation, shared share, and each
    source's usage of the most specialised layer."""
    import plotly.graph_objects as go

    layers = report["layers"]
    labels = [f"layer {e['layer']}" for e in layers]
    figs = []
    load = go.Figure(go.Heatmap(z=[e["load_share"] for e in layers], y=labels, colorscale="Viridis",
                                colorbar={"title": "share"}))  # fmt: skip
    load.update_layout(title="Expert load per MoE layer (share of routed slots)", xaxis_title="expert",
                       height=max(300, 24 * len(layers) + 150))  # fmt: skip
    figs.append(load)
    vio = go.Figure(go.Bar(x=labels, y=[e["max_vio"] for e in layers]))
    vio.update_layout(title="MaxVio per layer: (max load - mean load) / mean load", yaxis_title="MaxVio")
    figs.append(vio)
    shared = [e["shared_share"] for e in layers]
    if any(s is not None for s in shared):
        fig = go.Figure(go.Bar(x=labels, y=shared))
        fig.update_layout(title="Shared experts' share of the MoE output (|shared| / (|shared| + |routed|))",
                          yaxis={"range": [0, 1]})  # fmt: skip
        figs.append(fig)
    spec = report.get("specialisation")
    if spec is not None:
        fig = go.Figure(go.Scatter(x=labels, y=spec["per_layer"], mode="lines+markers"))
        fig.update_layout(title="Specialisation per layer (mean total-variation distance between sources)",
                          yaxis={"range": [0, 1]})  # fmt: skip
        figs.append(fig)
        best = max(range(len(layers)), key=lambda i: spec["per_layer"][i])
        per_source = layers[best]["per_source"]
        fig = go.Figure([go.Bar(name=n, y=share) for n, share in per_source.items()])
        fig.update_layout(barmode="group", title=f"Expert usage per source, {labels[best]} (the most specialised)",
                          xaxis_title="expert", yaxis_title="share of the source's slots")  # fmt: skip
        figs.append(fig)
    return figs


def report_html(report: dict[str, Any], title: str = "Routing report") -> str:
    """One self-contained HTML page (plotly.js inlined once) with a summary table and the figures."""
    figs = report_figures(report)
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs)]
    summary = {k: report[k] for k in ("model", "execution", "attn_mode", "sources", "max_vio", "seconds", "memory")}
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(json.dumps(v, default=str))}</code></td></tr>"
        for k, v in summary.items()
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}th{text-align:left;padding-right:1em;"
        "vertical-align:top}td code{white-space:pre-wrap;word-break:break-all}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table>{rows}</table>" + "".join(parts) + "</body></html>\n"
    )


__all__ = ["report_figures", "report_html", "routing_report", "windows"]
