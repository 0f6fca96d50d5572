"""The DeepSeek-V3-style model: embedding -> decoder blocks (MLA + dense/MoE) -> norm -> head, plus MTP.

Read it top to bottom: ``Model.__init__`` builds the parts, ``Model.forward`` runs them and adds up
the training objective

    loss = main cross-entropy + lambda * mean(MTP cross-entropies) + alpha * sequence balance loss

and returns every part separately (``ModelOutput``), together with the routing statistics of each
MoE layer so that lessons can look inside. ``labels`` follow the Hugging Face convention: pass the
same ids as ``input_ids`` (or -100 where no loss is wanted); the model shifts them itself.

After each optimiser step call ``model.update_expert_bias(output.routing)`` to apply DeepSeek-V3's
auxiliary-loss-free balancing (see ``workbench.model.moe``); ``workbench.train`` does this for you.

With ``config.fp8`` the linear layers become ``fp8.FP8Linear`` (same parameters, same state-dict
keys; the embedding, head, norms and routers stay in high precision) and the routed experts run their
GEMMs through ``fp8.fp8_linear``: the whole model trains on DeepSeek-V3's FP8 path.

Parameter names match Hugging Face's ``DeepseekV3ForCausalLM`` without its ``model.`` prefix, except
that the routed experts of a layer are stored stacked (``mlp.experts.gate_proj`` of shape
(E, I, D)) and MTP modules live in ``mtp``; ``workbench.io.hf`` converts both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import ModelConfig
from workbench.fp8 import convert_to_fp8
from workbench.model.accounting import check_fits
from workbench.model.block import Block
from workbench.model.layers import RMSNorm
from workbench.model.mla import KVCache, padded_layout
from workbench.model.moe import GrowthLayout, RoutedExperts, Router, RoutingStats
from workbench.model.mtp import MTPModule
from workbench.model.rope import rope_tables

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    hidden: torch.Tensor  # (B, T, D) final hidden state before the final norm (what MTP reads)
    loss: torch.Tensor | None = None  # the training objective
    main_loss: torch.Tensor | None = None  # next-token cross-entropy
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # one per MTP depth
    mtp_loss: torch.Tensor | None = None  # their mean
    balance_loss: torch.Tensor | None = None  # mean sequence-wise balance loss over MoE layers
    routing: list[RoutingStats] = field(default_factory=list)  # main layers, then MTP layers

    def loss_parts(self) -> dict[str, float]:
        """The loss and its parts as plain floats (for logs)."""
        parts = {
            "loss": self.loss,
            "main_loss": self.main_loss,
            "mtp_loss": self.mtp_loss,
            "balance_loss": self.balance_loss,
        }
        return {k: float(v.detach()) for k, v in parts.items() if v is not None}


class Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        # refuse, before allocating, weights the device cannot hold (the meta device always passes)
        check_fits(config, torch.get_default_device(), torch.get_default_dtype(), what="Model(config)")
        self.config = config
        # the tokenizer whose ids this model reads (a workbench.io.tokenizer.Tokenizer, or None): set by
        # load_hf from the checkpoint folder and by training from its data; the model itself never uses it
        self.tokenizer = None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList([MTPModule(config, d) for d in range(1, config.num_nextn_predict_layers + 1)])
        cos, sin = rope_tables(
            config.qk_rope_head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device=self.embed_tokens.weight.device,
        )
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_len, d_rope/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if config.fp8:
            # Linear -> FP8Linear sharing its weight; keeps embedding, head, norms, router in high precision
            convert_to_fp8(self, grad_fmt=config.fp8_grad_format, backend=config.fp8_backend)

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, root: nn.Module | None = None) -> None:
        """Fresh weights (normal with std ``initializer_range``, norms at one, zero bias) for every module
        inside ``root`` (default: the whole model)."""
        std = self.config.initializer_range
        for module in (self if root is None else root).modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RoutedExperts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    nn.init.normal_(p, 0.0, std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, 0.0, std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def routers(self) -> list[Router]:
        """Every router, main layers first, then MTP layers (the order of ``ModelOutput.routing``)."""
        blocks = [*self.layers, *self.mtp]
        return [b.mlp.gate for b in blocks if b.is_moe]

    def new_cache(self) -> KVCache:
        return KVCache()

    # ---------------------------------------------------------------------------------------------
    def rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (length, d_rope/2) of positions start .. start + length - 1 (every row alike)."""
        end = start + length
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"positions up to {end} exceed max_position_embeddings="
                f"{self.config.max_position_embeddings}; use shorter inputs or a config with a "
                "larger max_position_embeddings"
            )
        return self.rope_cos[start:end], self.rope_sin[start:end]

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, T, d_rope/2) of per-row positions (B, T)."""
        if positions.numel():
            top, low = int(positions.max()), int(positions.min())
            if top >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {top} exceeds max_position_embeddings={self.config.max_position_embeddings}; use "
                    "shorter inputs or a config with a larger max_position_embeddings"
                )
            if low < 0:
                raise ValueError(f"positions must be >= 0, got {low}")
        return self.rope_cos[positions], self.rope_sin[positions]

    def _layout(
        self,
        B: int,
        T: int,
        cache: KVCache | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """cos, sin, the attention mask (None: plain causal) and the cache's new validity of one forward."""
        for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have the shape of input_ids {(B, T)}, got {tuple(t.shape)}")
        if cache is not None and cache.length and cache.batch_size not in (0, B):
            raise ValueError(f"the cache holds {cache.batch_size} rows but input_ids has {B}")
        cache_padded = cache is not None and cache.valid is not None
        if attention_mask is not None and position_ids is None and not cache_padded and bool(attention_mask.all()):
            attention_mask = None  # nothing is padded: the unmasked path, bit for bit
        padded = attention_mask is not None or position_ids is not None or cache_padded
        if not padded:  # every row at the same positions, nothing to mask: the plain causal path
            cos, sin = self.rope(cache.length if cache is not None else 0, T)
            return cos, sin, None, None
        positions, mask, valid = padded_layout(B, T, cache, attention_mask, position_ids, self.device)
        cos, sin = self.rope_at(positions)
        return cos, sin, mask, valid

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        attn_mode: str | None = None,
        compute_mtp: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput. With labels (B, T) the loss and its parts are computed.

        cache: a ``KVCache`` to read earlier positions from and append these to (generation).
        attn_mode: "naive" or "absorb" (default: the config's).
        compute_mtp: run the MTP modules (default: when labels are given).
        attention_mask (B, T): 1 for real tokens, 0 for padding (Hugging Face's convention); a real token
            never attends to a pad, and its position counts only the real tokens before it (the cache's
            included). position_ids (B, T): explicit positions instead (as transformers takes them).
            Without either (and a cache without padding) the model runs the unmasked causal path.
        """
        self._check_ids(input_ids, labels)
        B, T = input_ids.shape
        mode = attn_mode or self.config.attn_mode
        cos, sin, mask, valid = self._layout(B, T, cache, attention_mask, position_ids)

        x = self.embed_tokens(input_ids)  # (B, T, D)
        routing: list[RoutingStats] = []
        for block in self.layers:
            x, stats = block(x, cos, sin, mode=mode, cache=cache, mask=mask)
            if stats is not None:
                routing.append(stats)
        if cache is not None:
            _commit(cache, T, valid)
        hidden = x  # (B, T, D)
        logits = self.lm_head(self.norm(hidden))  # (B, T, V)
        out = ModelOutput(logits=logits, hidden=hidden, routing=routing)

        if compute_mtp is None:
            compute_mtp = labels is not None
        mtp_logits: list[torch.Tensor] = []
        if compute_mtp and len(self.mtp) > 0:
            h = hidden
            own = None if mask is None else mask[..., -T:]  # MTP attends within these T tokens (no cache)
            for module in self.mtp:
                k = module.depth
                ahead = F.pad(input_ids[:, k:], (0, k))  # (B, T): token i+k at position i (tail padded)
                h, lg, stats = self._run_mtp(module, h, ahead, cos, sin, mode, None, own)
                if stats is not None:
                    routing.append(stats)
                mtp_logits.append(lg)  # (B, T, V)

        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            real = None
            if attention_mask is not None:  # a pad is never predicted, nor predicts
                real = attention_mask.bool()
                labels = labels.masked_fill(~real, IGNORE_INDEX)
            out.main_loss = _shifted_cross_entropy(logits, labels, shift=1, source=real)
            out.mtp_losses = [
                _shifted_cross_entropy(lg, labels, shift=i + 2, source=real) for i, lg in enumerate(mtp_logits)
            ]
            loss = out.main_loss
            if out.mtp_losses:
                out.mtp_loss = torch.stack(out.mtp_losses).mean()
                loss = loss + self.config.mtp_loss_weight * out.mtp_loss
            if routing:
                out.balance_loss = torch.stack([s.balance_loss for s in routing]).mean()
                loss = loss + self.config.seq_aux_loss_alpha * out.balance_loss
            out.loss = loss
        return out

    def _check_ids(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Refuse, before any compute, ids the embedding cannot look up (an IndexError deep in torch otherwise)
        and labels cross-entropy cannot score. Costs one min/max reduction over the ids."""
        V = self.config.vocab_size
        for name, t, extra in (("input_ids", input_ids, ()), ("labels", labels, (IGNORE_INDEX,))):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of token ids (batch, seq_len), got {type(t).__name__}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {t.dtype}; use .long()")
            if t.dim() != 2 or t.numel() == 0:
                raise ValueError(f"{name} must be (batch, seq_len) with at least one token, got shape {tuple(t.shape)}")
            if t is labels and labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            bad = (t < 0) | (t >= V)
            for allowed in extra:
                bad &= t != allowed
            if bool(bad.any()):
                value = int(t[bad][0])
                where = tuple(int(i) for i in bad.nonzero()[0])
                allowed_text = f"[0, {V})" + (f" or {IGNORE_INDEX} (no loss)" if extra else "")
                raise ValueError(
                    f"{name} holds token id {value} at position {where}, outside the vocabulary {allowed_text} of this "
                    f"model (vocab_size={V}); was it tokenized for another model?"
                )

    def _run_mtp(
        self,
        module: MTPModule,
        h: torch.Tensor,
        ahead: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mode: str,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, RoutingStats | None]:
        """One MTP depth: h (B, T, D) and the tokens ahead (B, T) -> its hidden state, logits, routing."""
        h, stats = module(h, self.embed_tokens(ahead), cos, sin, mode=mode, cache=cache, mask=mask)
        return h, module.logits(h, self.lm_head), stats

    def predict_ahead(
        self,
        hidden: torch.Tensor,
        ahead_ids: torch.Tensor,
        *,
        depth: int = 1,
        cache: KVCache | None = None,
        attn_mode: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module ``depth`` on new positions, as in training: the main model's hidden states (B, m, D) at
        positions i and the tokens that follow them (B, m) -> its hidden states (B, m, D) and logits (B, m, V)
        for the tokens after those. With a ``cache`` (the module's own) the positions continue from it: what
        speculative decoding drafts with."""
        if not 1 <= depth <= len(self.mtp):
            raise ValueError(f"depth must be between 1 and num_nextn_predict_layers={len(self.mtp)}, got {depth}")
        B, m = ahead_ids.shape
        cos, sin, mask, valid = self._layout(B, m, cache, None, None)
        h, logits, _ = self._run_mtp(self.mtp[depth - 1], hidden, ahead_ids, cos, sin,
                                     attn_mode or self.config.attn_mode, cache, mask)  # fmt: skip
        if cache is not None:
            _commit(cache, m, valid)
        return h, logits

    @torch.no_grad()
    def update_expert_bias(
        self,
        routing: list[RoutingStats] | list[torch.Tensor],
        gamma: float | None = None,
        masks: list[torch.Tensor | None] | None = None,
    ) -> None:
        """Auxiliary-loss-free balancing: nudge every router's bias from the observed expert loads.

        routing: the ``ModelOutput.routing`` of the step (or one counts tensor per router, in the order
        of ``routers()``, e.g. summed over gradient-accumulation micro-batches). ``workbench.train.loop`` gives
        a router that did not run in the forward (MTP's, with ``compute_mtp=False``) zero counts: no move.
        gamma: the bias update speed (default: ``config.bias_update_speed``).
        masks: per router, a bool (E,) tensor of the experts whose bias may move (None: all of them).
        """
        gamma = self.config.bias_update_speed if gamma is None else gamma
        routers = self.routers()
        if len(routing) != len(routers):
            raise ValueError(
                f"got routing statistics for {len(routing)} MoE layers, the model has {len(routers)} "
                "(run the MTP modules in the forward, or pass counts for every router)"
            )
        if masks is not None and len(masks) != len(routers):
            raise ValueError(f"got {len(masks)} balancing masks for {len(routers)} routers")
        for i, (router, item) in enumerate(zip(routers, routing)):
            counts = item.counts if isinstance(item, RoutingStats) else item
            router.update_bias(counts, gamma, mask=None if masks is None else masks[i])

    @torch.no_grad()
    def grow_experts(
        self,
        n: int,
        live_layers: Sequence[int],
        init: str = "copy",
        *,
        sources: dict[int, list[int]] | None = None,
        generator: torch.Generator | None = None,
        margin: float = 2.0,
    ) -> GrowthLayout:
        """Give every MoE layer ``n`` more routed experts, in place (one config, one expert count).

        In ``live_layers`` the new experts are dormant (never chosen until their bias is raised, see
        ``MoE.grow``); in the other MoE layers they are inactive. ``self.config`` becomes a new config with
        ``n_routed_experts + n`` and the inactive experts recorded (``inactive_experts``), so the grown model
        saves and loads like any other. sources: per layer, the old expert each new one copies (``init="copy"``).
        Returns the layout (where old and new experts now live).
        """
        cfg = self.config
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer (experts to add per layer), got {n!r}")
        if isinstance(live_layers, (str, bytes)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in live_layers
        ):
            raise ValueError(f"live_layers must be a list of MoE layer indices, got {live_layers!r}")
        if n % cfg.n_group:
            raise ValueError(
                f"n={n} new experts do not split evenly over n_group={cfg.n_group} routing groups; the new experts "
                f"go n / n_group to each group so that old experts keep their group: use n="
                f"{cfg.n_group * max(1, round(n / cfg.n_group))}"
            )
        layout = GrowthLayout(cfg.n_routed_experts, n, cfg.n_group)
        new_config = cfg.replace(n_routed_experts=layout.experts_after, inactive_experts=None)  # validated first
        inactive: dict[int, list[int]] = {}
        for block in [*self.layers, *self.mtp]:
            if not block.is_moe:
                continue
            idx, live = block.mlp.layer_idx, block.mlp.layer_idx in live_layers
            block.mlp.grow(layout, init, live=live, sources=(sources or {}).get(idx), std=cfg.initializer_range,
                           generator=generator, margin=margin)  # fmt: skip
            before = [layout.old_to_new[j] for j in (cfg.inactive_experts or {}).get(idx, [])]
            inactive[idx] = sorted(before + ([] if live else layout.new))
        self.config = new_config.replace(inactive_experts={k: v for k, v in inactive.items() if v} or None)
        return layout

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _commit(cache: KVCache, n: int, valid: torch.Tensor | None) -> None:
    """After every layer has appended its n new slots: the cache's length and which slots are real."""
    cache.advance(n)
    if valid is not None:
        cache.valid = None if bool(valid.all()) else valid


def _shifted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, shift: int, source: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of logits at position i against labels at position i + shift (only where ``source``
    (B, T) is true at i, when given)."""
    B, T, V = logits.shape
    target = torch.full_like(labels, IGNORE_INDEX)
    if shift < T:
        target[:, : T - shift] = labels[:, shift:]
        if source is not None:
            target[:, : T - shift] = target[:, : T - shift].masked_fill(~source[:, : T - shift], IGNORE_INDEX)
    if (target != IGNORE_INDEX).sum() == 0:
        return logits.sum() * 0.0  # sequences too short for this depth: no signal, keep the graph
    return F.cross_entropy(logits.float().view(B * T, V), target.view(B * T), ignore_index=IGNORE_INDEX)
