"""Generation with MLA's latent KV cache, and speculative decoding that drafts with the MTP module.

``generate`` prefills the prompt once, then decodes one token at a time; each step attends to the
cache instead of recomputing the past. In ``absorb`` mode (the default here) the cache holds only
the latent ``c_KV`` and the rotary key per token and layer, which is MLA's whole point. Sampling:
greedy (``temperature=0``), temperature, and nucleus (``top_p``).

``speculative_generate`` reuses the first MTP module as a *draft model*, as DeepSeek-V3 suggests:
after the main model has produced token t+1, the MTP module (given the main model's hidden state at
t and the embedding of t+1) guesses token t+2 at almost no cost. One forward of the main model over
[t+1, guess] then both *verifies* the guess and yields the token after it. If the guess was right,
two tokens come out of one main-model step; if not, the guess is dropped and the cache rolled back.
With greedy decoding the output is exactly the same as ``generate``'s; only the speed changes.
The acceptance rate (DeepSeek reports 85-90% for the second token) is reported with the result.
Simplifications: one draft token per step (DeepSeek's setting), batch size 1 for speculation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from workbench.model.mla import KVCache
from workbench.model.model import Model


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy; top_p < 1 keeps the nucleus."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the best token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).view(-1).to(logits.device)


def _as_batch(prompt: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"prompt must be a non-empty list of ids or a (batch, len) tensor, got shape {tuple(ids.shape)}"
        )
    return ids


@torch.no_grad()
def generate(
    model: Model,
    prompt: torch.Tensor | list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    attn_mode: str = "absorb",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (B, T0) by up to ``max_new_tokens``; returns (B, T0 + new) ids.

    Sequences that produce ``eos_id`` keep emitting it; generation stops when all have.
    """
    was_training = model.training
    model.eval()
    ids = _as_batch(prompt, model.device)
    cache = model.new_cache()
    logits = model(ids, cache=cache, attn_mode=attn_mode).logits[:, -1]  # prefill: (B, V)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out = [ids]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        out.append(nxt[:, None])
        if bool(finished.all()) or i == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache, attn_mode=attn_mode).logits[:, -1]
    model.train(was_training)
    return torch.cat(out, dim=1)


@dataclass
class SpeculativeResult:
    tokens: torch.Tensor  # (1, T0 + new)
    drafted: int  # draft tokens proposed by the MTP module
    accepted: int  # of which the main model agreed with
    main_forwards: int  # main-model forward passes after the prefill
    seconds: float
    prompt_len: int

    @property
    def new_tokens(self) -> int:
        return self.tokens.shape[1] - self.prompt_len

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(1, self.main_forwards)


@torch.no_grad()
def speculative_generate(
    model: Model,
    prompt: torch.Tensor | list[int],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    attn_mode: str = "absorb",
) -> SpeculativeResult:
    """Greedy decoding with MTP drafts; the tokens equal ``generate(..., temperature=0)``'s."""
    if len(model.mtp) == 0:
        raise ValueError(
            "speculative decoding drafts with the MTP module, but this model has "
            "num_nextn_predict_layers=0; train a model with MTP"
        )
    was_training = model.training
    model.eval()
    ids = _as_batch(prompt, model.device)
    if ids.shape[0] != 1:
        raise ValueError(f"speculative decoding here takes one prompt at a time, got a batch of {ids.shape[0]}")
    t0 = time.perf_counter()
    mtp = model.mtp[0]
    cache, mtp_cache = model.new_cache(), KVCache()  # the MTP block keeps its own cache

    out = model(ids, cache=cache, attn_mode=attn_mode)  # prefill
    tokens = ids[0].tolist()
    n0 = len(tokens)
    tokens.append(int(out.logits[0, -1].argmax()))
    # MTP inputs not yet consumed: hidden h_i paired with the token that follows position i
    pending_h = out.hidden  # (1, T0, D)
    drafted = accepted = forwards = 0

    while len(tokens) - n0 < max_new_tokens and not (eos_id is not None and tokens[-1] == eos_id):
        # 1. draft: feed the MTP module the new (h_i, token_{i+1}) pairs, read its guess for the next token
        m = pending_h.shape[1]
        following = torch.tensor([tokens[-m:]], device=ids.device)  # (1, m)
        draft_h = _mtp_step(model, pending_h, following, mtp_cache, attn_mode)
        draft = int(model.lm_head(mtp.shared_head.norm(draft_h[:, -1])).argmax())
        drafted += 1

        # 2. verify: one main forward over [last token, draft]
        step_in = torch.tensor([[tokens[-1], draft]], device=ids.device)
        ver = model(step_in, cache=cache, attn_mode=attn_mode)
        forwards += 1
        y0, y1 = int(ver.logits[0, 0].argmax()), int(ver.logits[0, 1].argmax())
        if y0 == draft:  # accepted: two tokens from one main forward
            accepted += 1
            tokens += [draft, y1]
            pending_h = ver.hidden  # (1, 2, D)
        else:  # rejected: keep the main model's own token, forget the draft's cache entry
            tokens.append(y0)
            cache.truncate(cache.length - 1)
            pending_h = ver.hidden[:, :1]
        if eos_id is not None and eos_id in tokens[n0:]:
            cut = tokens.index(eos_id, n0)
            tokens = tokens[: cut + 1]
            break

    tokens = tokens[: n0 + max_new_tokens]
    model.train(was_training)
    return SpeculativeResult(
        tokens=torch.tensor([tokens], device=ids.device),
        drafted=drafted,
        accepted=accepted,
        main_forwards=forwards,
        seconds=time.perf_counter() - t0,
        prompt_len=n0,
    )


def _mtp_step(model: Model, h: torch.Tensor, following: torch.Tensor, cache: KVCache, attn_mode: str) -> torch.Tensor:
    """Run MTP module 1 on new positions: h (1, m, D) main hidden states, following (1, m) next tokens."""
    mtp = model.mtp[0]
    cos, sin = model.rope(cache.length, h.shape[1])
    out, _ = mtp(h, model.embed_tokens(following), cos, sin, mode=attn_mode, cache=cache)
    cache.advance(h.shape[1])
    return out
