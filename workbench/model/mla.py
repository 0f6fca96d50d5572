"""Multi-head Latent Attention (MLA): attention whose KV cache holds a small latent, not keys and values.

Standard multi-head attention caches, for every token and layer, a key and a value per head:
``n_heads * (d_k + d_v)`` numbers. For DeepSeek-V3 that would be 128 * (192 + 128) = 40,960 values
per token per layer. MLA caches 512 + 64 = 576.

How (shapes for one token, ``H`` heads):

1. **Joint KV compression.** ``kv_a_proj_with_mqa`` maps the hidden state ``h`` to a latent
   ``c_KV`` of width ``kv_lora_rank`` (r) plus one rotary key ``k_pe`` of width ``qk_rope_head_dim``
   (d_r). ``c_KV`` is RMS-normalised (``kv_a_layernorm``).
2. **Up-projection.** ``kv_b_proj`` (r -> H * (d_nope + d_v)) expands ``c_KV`` into each head's
   position-free key part ``k_nope`` and value ``v``.
3. **Decoupled RoPE.** Rotary position can't pass through the up-projection (it would depend on the
   position and spoil absorption), so position lives in a separate slice: ``k_pe`` is rotated and
   *shared by all heads*; each head's query has its own rotated slice ``q_pe``.
   The key of head i is ``[k_nope_i ; k_pe]``, the query ``[q_nope_i ; q_pe_i]``.
4. **Query compression.** Queries go through their own low-rank bottleneck (``q_a_proj`` ->
   RMSNorm -> ``q_b_proj``, width ``q_lora_rank``) to save activation memory in training; with
   ``q_lora_rank=None`` a plain ``q_proj`` is used (DeepSeek-V2-Lite does this).

Two ways to compute the same thing:

* ``naive``: expand the latent into full per-head keys and values and run ordinary attention.
  This is what training does. The naive cache keeps the expanded keys and values (as DeepSeek's
  reference code does), so its size is the MHA size: the point of comparison.
* ``absorb``: never expand. Because ``q_nope_i . k_nope_i = q_nope_i . (W_UK_i c) =
  (W_UK_i^T q_nope_i) . c``, the key up-projection can be *absorbed* into the query, and likewise
  the value up-projection into the output (``o_i = W_UV_i (sum_s p_s c_s)``). Attention then runs
  directly against the cached latents: it is multi-query attention whose single key is
  ``[c_KV ; k_pe]`` (width r + d_r) and whose single value is ``c_KV``. The cache holds only
  ``c_KV`` and ``k_pe``.

Both modes give the same outputs up to float rounding (tested).

Padding. Sequences of different lengths share a batch by padding, and a mask keeps every real token from
seeing a pad: ``KVCache.valid`` (B, S) marks the cache slots that hold real tokens, and ``padded_layout``
turns it into the attention rule "query slot q sees key slot s when s <= q and s is real" (a pad sees only
itself, so nothing is ever fully masked and no row turns into NaN) and into each row's positions (a real
token's position is the number of real tokens before it in its row, so a left-padded prompt is rotated
exactly as the same prompt alone). Without padding (``valid`` None) attention takes the unmasked path,
unchanged. Simplifications: no dropout, no attention bias terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import ModelConfig
from workbench.model.layers import RMSNorm
from workbench.model.rope import apply_rope, softmax_scale

# The norms of the compressed query and latent use a fixed eps, not config.rms_norm_eps: so do
# DeepSeek's reference code and transformers (their RMSNorm default), and checkpoints expect it.
LATENT_NORM_EPS = 1e-6


class KVCache:
    """What attention keeps between decoding steps, for every layer of one model.

    Per layer (keyed by its index) a dict of tensors whose dim 0 is the batch row and dim 1 the slot:
    absorb mode: ``c_kv`` (B, S, kv_lora_rank) and ``k_pe`` (B, S, qk_rope_head_dim);
    naive mode: ``k`` (B, S, H, qk_head_dim) and ``v`` (B, S, H, v_head_dim).
    ``length`` counts the slots already cached (S); ``truncate`` rolls back (speculative decoding).
    ``valid`` (B, S) bool marks the slots that hold real tokens, None when every slot does (no padding).

    Rows can be taken out (``select``), joined (``concat``, which left-pads the shorter caches so that all
    rows end at the same slot) and read out token by token (``row``): what a server batching requests that
    come and go needs (``workbench.serve.engine``).
    """

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self.length = 0
        self.valid: torch.Tensor | None = None  # (B, S) bool, None: no padding anywhere

    def update(self, layer_idx: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Append this step's entries to layer ``layer_idx`` and return everything cached there."""
        old = self.layers.get(layer_idx)
        if old is None:
            merged = dict(new)
        else:
            if set(old) != set(new):
                raise ValueError(
                    f"cache of layer {layer_idx} holds {sorted(old)} but got {sorted(new)}: "
                    "do not switch attn_mode in the middle of a generation"
                )
            merged = {k: torch.cat([old[k], new[k]], dim=1) for k in new}
        self.layers[layer_idx] = merged
        return merged

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.layers = {i: {k: v[:, :length] for k, v in d.items()} for i, d in self.layers.items()}
        if self.valid is not None:
            self.valid = self.valid[:, :length]
        self.length = length

    def nbytes(self) -> int:
        """Bytes held by the cache (all layers, all sequences of the batch)."""
        return sum(t.numel() * t.element_size() for d in self.layers.values() for t in d.values())

    # ---- rows: what continuous batching needs ---------------------------------------------------
    @property
    def batch_size(self) -> int:
        for d in self.layers.values():
            for t in d.values():
                return t.shape[0]
        return 0 if self.valid is None else self.valid.shape[0]

    @property
    def device(self) -> torch.device:
        for d in self.layers.values():
            for t in d.values():
                return t.device
        return torch.device("cpu") if self.valid is None else self.valid.device

    def valid_mask(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """(batch, length) bool: the real slots (all of them when the cache has no padding)."""
        if self.valid is not None:
            return self.valid
        return torch.ones(batch, self.length, dtype=torch.bool, device=device)

    def select(self, rows: list[int] | torch.Tensor) -> KVCache:
        """A cache of these rows only (in this order), without the slots that none of them uses."""
        out = KVCache()
        index = torch.as_tensor(rows, dtype=torch.long)
        for i, d in self.layers.items():
            out.layers[i] = {k: v.index_select(0, index.to(v.device)) for k, v in d.items()}
        out.length = self.length
        if self.valid is not None:
            out.valid = self.valid.index_select(0, index.to(self.valid.device))
        out.trim()
        return out

    def trim(self) -> None:
        """Drop the leading slots that are padding in every row (a row that left took them with it)."""
        if self.valid is None or self.valid.shape[0] == 0:
            return
        used = self.valid.any(dim=0)  # (S,)
        first = int(used.int().argmax()) if bool(used.any()) else self.length
        if first:
            self.layers = {i: {k: v[:, first:] for k, v in d.items()} for i, d in self.layers.items()}
            self.valid = self.valid[:, first:]
            self.length -= first
        if bool(self.valid.all()):
            self.valid = None

    @staticmethod
    def concat(caches: list[KVCache]) -> KVCache:
        """The rows of several caches in one, each left-padded to the longest so that all end together."""
        caches = [c for c in caches if c.batch_size > 0]
        out = KVCache()
        if not caches:
            return out
        S = max(c.length for c in caches)
        names = {i: sorted(d) for i, d in caches[0].layers.items()}
        for c in caches:
            if {i: sorted(d) for i, d in c.layers.items()} != names:
                raise ValueError("cannot join caches of different layers or attention modes")
        for i, keys in names.items():
            out.layers[i] = {k: torch.cat([_left_pad(c.layers[i][k], S) for c in caches], dim=0) for k in keys}
        out.valid = torch.cat([_left_pad(c.valid_mask(c.batch_size, c.device), S) for c in caches], dim=0)
        out.length = S
        if bool(out.valid.all()):
            out.valid = None
        return out

    def row(self, b: int) -> dict[int, dict[str, torch.Tensor]]:
        """Row ``b``'s entries at its real slots, in token order: per layer {name: (n_real, ...)}."""
        if self.valid is None:
            return {i: {k: v[b] for k, v in d.items()} for i, d in self.layers.items()}
        idx = self.valid[b].nonzero().view(-1)
        return {i: {k: v[b].index_select(0, idx.to(v.device)) for k, v in d.items()} for i, d in self.layers.items()}

    @staticmethod
    def from_rows(rows: list[dict[int, dict[str, torch.Tensor]] | None]) -> KVCache:
        """A cache holding these token runs (per layer {name: (n_b, ...)}; None: nothing), left-padded to the
        longest. Empty when no row holds anything."""
        out = KVCache()
        known = next((r for r in rows if r), None)
        if known is None:
            return out
        # a row with nothing cached (None) is a run of length 0 of the same shapes
        rows = [r if r else {i: {k: v[:0] for k, v in d.items()} for i, d in known.items()} for r in rows]
        S = max(_row_length(r) for r in rows)
        layer_names = {i: sorted(d) for i, d in known.items()}
        for i, keys in layer_names.items():
            out.layers[i] = {k: torch.cat([_left_pad(r[i][k][None], S) for r in rows], dim=0) for k in keys}
        slots = torch.arange(S, device=out.device)
        out.valid = torch.stack([slots >= S - _row_length(r) for r in rows])  # (B, S): the real slots are the last n_b
        out.length = S
        if bool(out.valid.all()):
            out.valid = None
        return out


def _row_length(row: dict[int, dict[str, torch.Tensor]]) -> int:
    for d in row.values():
        for t in d.values():
            return t.shape[0]
    return 0


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """t (B, S, ...) -> (B, length, ...) with zeros (False) in the first length - S slots."""
    missing = length - t.shape[1]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros((t.shape[0], missing, *t.shape[2:])), t], dim=1)


def padded_layout(
    batch: int,
    T: int,
    cache: KVCache | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions, attention rule and cache validity for T new tokens per row when rows are padded.

    attention_mask (B, T): 1 for the new real tokens, 0 for pads (None: all real). position_ids (B, T):
    explicit positions (default: the real tokens before each one in its row, cached ones included).
    Returns positions (B, T), allowed (B, 1, T, S) bool (query slot past + t sees key slot s when s <= it and
    s is real, and always itself) and valid (B, S) over the S = past + T slots.
    """
    past = cache.length if cache is not None else 0
    new_valid = (
        torch.ones(batch, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    )
    old_valid = cache.valid_mask(batch, device) if cache is not None else new_valid[:, :0]
    valid = torch.cat([old_valid, new_valid], dim=1)  # (B, S)
    if position_ids is None:
        before = old_valid.sum(dim=1, keepdim=True)  # (B, 1) real tokens already cached
        positions = (before + new_valid.cumsum(dim=1) - 1).clamp_min(0)  # a pad takes its predecessor's (unused)
    else:
        positions = position_ids.long()
    q_slot = past + torch.arange(T, device=device)  # (T,)
    k_slot = torch.arange(past + T, device=device)  # (S,)
    causal = k_slot[None, :] <= q_slot[:, None]  # (T, S)
    itself = k_slot[None, :] == q_slot[:, None]  # (T, S)
    allowed = causal[None] & (valid[:, None, :] | itself[None])  # (B, T, S)
    return positions, allowed[:, None], valid


class MLA(nn.Module):
    """Multi-head Latent Attention: (B, T, hidden) -> (B, T, hidden)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        D, H = config.hidden_size, self.n_heads

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=False)
        self.softmax_scale = softmax_scale(self.qk_head_dim, config.rope_scaling)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mode: str = "naive",
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D); cos/sin (T, d_rope/2), or (B, T, d_rope/2) for per-row positions; mask (B, 1, T, S)
        bool from ``padded_layout`` (None: causal, no padding)."""
        B, T, _ = x.shape
        H, r, d_nope, d_rope, d_v = (
            self.n_heads,
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
        )
        past = cache.length if cache is not None else 0

        # Queries: (B, T, H, d_nope + d_rope), position on the last d_rope dims only
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.qk_head_dim)
        q_nope, q_pe = q.split([d_nope, d_rope], dim=-1)  # (B, T, H, d_nope), (B, T, H, d_rope)
        q_pe = apply_rope(q_pe, cos, sin)

        # The latent and the shared rotary key: what MLA needs to remember about each token
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, d_rope], dim=-1)  # (B, T, r), (B, T, d_rope)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin)[:, :, 0]  # (B, T, d_rope)

        if mode == "naive":
            # Expand the latent into every head's key and value
            kv = self.kv_b_proj(c_kv).view(B, T, H, d_nope + d_v)
            k_nope, v = kv.split([d_nope, d_v], dim=-1)  # (B, T, H, d_nope), (B, T, H, d_v)
            k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, T, H, d_rope)], dim=-1)  # (B, T, H, d_qk)
            if cache is not None:
                stored = cache.update(self.layer_idx, k=k, v=v)
                k, v = stored["k"], stored["v"]  # (B, S, H, ...)
            q_full = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, d_qk)
            out = _attention(
                q_full.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), past, self.softmax_scale, mask
            )  # (B, H, T, d_v)
            out = out.transpose(1, 2)  # (B, T, H, d_v)
        elif mode == "absorb":
            # Absorb W_UK into the query and W_UV into the output: attention runs on the latent
            w = _effective_weight(self.kv_b_proj, q_nope.dtype).view(H, d_nope + d_v, r)
            w_uk, w_uv = w[:, :d_nope], w[:, d_nope:]  # (H, d_nope, r), (H, d_v, r)
            q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # (B, T, H, r)
            if cache is not None:
                stored = cache.update(self.layer_idx, c_kv=c_kv, k_pe=k_pe)
                c_kv, k_pe = stored["c_kv"], stored["k_pe"]  # (B, S, r), (B, S, d_rope)
            # Multi-query attention: one key [c_kv ; k_pe] and one value c_kv shared by all heads
            q_mqa = torch.cat([q_lat, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, r + d_rope)
            k_mqa = torch.cat([c_kv, k_pe], dim=-1)[:, None]  # (B, 1, S, r + d_rope)
            v_mqa = c_kv[:, None]  # (B, 1, S, r)
            o_lat = _attention(q_mqa, k_mqa, v_mqa, past, self.softmax_scale, mask)  # (B, H, T, r)
            out = torch.einsum("bhtr,hvr->bthv", o_lat, w_uv)  # (B, T, H, d_v)
        else:
            raise ValueError(f"attention mode must be 'naive' or 'absorb', got {mode!r}")
        return self.o_proj(out.reshape(B, T, H * d_v))


def _effective_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a linear layer applies, as a ``dtype`` matrix absorbed attention can multiply by.

    Its ``weight``, plus the active adapters' deltas when a peft LoRA layer wraps it (peft's ``.weight`` is the
    frozen base layer's: absorb mode would silently drop the adapter). A layer that stores its weight in 8 bits
    (``workbench.fp8.QuantizedLinear``) is multiplied by its dequantised weight, as its own ``forward`` is."""
    base = getattr(linear, "base_layer", None)
    if base is None or not hasattr(linear, "get_delta_weight"):
        return _stored_weight(linear, dtype)
    w = _stored_weight(base, dtype)
    if getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False):
        return w
    for name in linear.active_adapters:
        if name in linear.lora_A:
            w = w + linear.get_delta_weight(name)
    return w


def _stored_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``linear.weight`` itself (untouched: the plain path stays bit-identical), or, for a layer that keeps an
    8-bit weight with scales and says how to expand it (``dequantized_weight``), that expansion in ``dtype``."""
    dequantize = getattr(linear, "dequantized_weight", None)
    return dequantize(dtype) if callable(dequantize) else linear.weight


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal scaled dot-product attention for queries at positions past..past+T-1 over keys 0..S-1.

    q (B, H, T, d), k (B, Hk, S, d), v (B, Hk, S, dv) with Hk = H or 1 -> (B, H, T, dv).
    mask (B, 1, T, S) bool: the padded rule of ``padded_layout`` instead of the plain causal one.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if past == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if T == 1:  # one new token sees everything cached
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    # several new tokens after a cached prefix: query i sees keys 0..past+i
    allowed = torch.arange(S, device=q.device)[None, :] <= (past + torch.arange(T, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
