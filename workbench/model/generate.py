"""Generation with MLA's latent KV cache, and speculative decoding that drafts with the MTP module.

``generate`` prefills the prompt once, then decodes one token at a time; each step attends to the
cache instead of recomputing the past. Sampling: greedy (``temperature=0``), temperature, and nucleus
(``top_p``).

Which attention mode. Training runs ``config.attn_mode`` (naive by default: expanded keys and values,
the straightforward computation). Inference runs **absorbed** MLA unless told otherwise
(``INFERENCE_ATTN_MODE``, resolved by ``inference_attn_mode``; every generating function here, the
rollouts and the server use it): the cache then holds only the latent ``c_KV`` and the rotary key per
token and layer, which is MLA's whole point. Both modes compute the same function up to float rounding
(tested), so the rule changes memory, never the meaning.

Prompts of different lengths batch together: pass them as a list of lists (or a left-padded tensor with
its ``attention_mask``). They are padded on the left, so that every row's last prompt token sits in the
last column and new tokens append at the same slot in every row; the mask keeps pads out of attention and
out of the positions (``workbench.model.mla.padded_layout``), so each row decodes as it would alone.

Sampling values are checked before anything runs: temperature and top_p must be finite numbers, and a
temperature as small as 1e-30 is a defined limit (the logits are shifted by their maximum before the
division, so the distribution collapses onto the best tokens instead of overflowing into NaN).

``speculative_generate`` reuses the first MTP module as a *draft model*, as DeepSeek-V3 suggests:
after the main model has produced token t+1, the MTP module (given the main model's hidden state at
t and the embedding of t+1) guesses token t+2 at almost no cost (``Model.predict_ahead``, the code that
trains it). One forward of the main model over [t+1, guess] then both *verifies* the guess and yields the
token after it. If the guess was right, two tokens come out of one main-model step; if not, the guess is
dropped and the cache rolled back. With greedy decoding the output is exactly the same as ``generate``'s;
only the speed changes. The acceptance rate (DeepSeek reports 85-90% for the second token) is reported
with the result. Simplifications: one draft token per step (DeepSeek's setting), batch size 1 for speculation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.model.mla import KVCache
from workbench.model.model import Model
from workbench.util import eval_mode

ATTN_MODES = ("naive", "absorb")
INFERENCE_ATTN_MODE = "absorb"  # the one default of every generating function (see the module docstring)


def inference_attn_mode(attn_mode: str | None = None) -> str:
    """The attention mode of inference: the one asked for, else ``INFERENCE_ATTN_MODE`` (absorbed MLA)."""
    if attn_mode is None:
        return INFERENCE_ATTN_MODE
    if attn_mode not in ATTN_MODES:
        raise ValueError(f"attn_mode must be 'naive' or 'absorb', got {attn_mode!r}")
    return attn_mode


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse sampling values that have no meaning, with the fix (before any work)."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy; top_p < 1 keeps the nucleus."""
    check_sampling(temperature, top_p)
    if torch.isnan(logits).any():
        raise ValueError("the model produced NaN logits; its weights or inputs are broken (nothing was sampled)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float()
    z = (z - z.max(dim=-1, keepdim=True).values) / temperature  # (B, V) <= 0, the best tokens exactly 0
    probs = torch.softmax(z, dim=-1)  # a tiny temperature underflows the rest to 0: the limit, not NaN
    if torch.isnan(probs).any():
        raise ValueError("no token can be sampled: every logit of a row is -inf")
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the best token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).view(-1).to(logits.device)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths -> ids (B, T) padded on the left with ``pad_id`` and their mask (B, T)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, T - len(p) :] = 1
    return ids, mask


def _as_batch(
    prompt: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) ids and the mask (None when no row is padded) of a prompt, a batch, or ragged prompts."""
    if not isinstance(prompt, torch.Tensor) and len(prompt) and not isinstance(prompt[0], int):
        rows = [list(p) for p in prompt]
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt must hold at least one token")
        if attention_mask is None and len({len(r) for r in rows}) > 1:
            ids, attention_mask = left_pad(rows)
            return ids.to(device), attention_mask.to(device)
        prompt = rows
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"prompt must be a non-empty list of ids or a (batch, len) tensor, got shape {tuple(ids.shape)}"
        )
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device)
        if attention_mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have the prompt's shape {tuple(ids.shape)}"
            )
        if not bool(attention_mask[:, -1].bool().all()):
            raise ValueError("pad prompts on the left: the last column of attention_mask must be all ones")
        if bool(attention_mask.bool().all()):
            attention_mask = None
    return ids, attention_mask


def _check_length(model: Model, prompt_len: int, max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    limit = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {prompt_len} tokens and {max_new_tokens} new tokens exceed the context of {limit} "
            f"(max_position_embeddings); ask for at most {max(0, limit - prompt_len)} new tokens"
        )


@torch.no_grad()
def generate(
    model: Model,
    prompt: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    attn_mode: str | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (B, T0) by up to ``max_new_tokens``; returns (B, T0 + new) ids.

    prompt: one list of ids, a (B, T0) tensor, or a list of prompts of any lengths (left-padded with 0 in
    the result; ``attention_mask`` gives the mask of a left-padded tensor). attn_mode: default absorbed
    (``inference_attn_mode``). Sequences that produce ``eos_id`` keep emitting it; generation stops when all have.
    """
    check_sampling(temperature, top_p)
    mode = inference_attn_mode(attn_mode)
    ids, mask = _as_batch(prompt, attention_mask, model.device)
    _check_length(model, ids.shape[1] if mask is None else int(mask.sum(1).max()), max_new_tokens)
    with eval_mode(model):
        cache = model.new_cache()
        logits = model(ids, cache=cache, attn_mode=mode, attention_mask=mask).logits[:, -1]  # prefill: (B, V)
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
            logits = model(nxt[:, None], cache=cache, attn_mode=mode).logits[:, -1]
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
    attn_mode: str | None = None,
) -> SpeculativeResult:
    """Greedy decoding with MTP drafts; the tokens equal ``generate(..., temperature=0)``'s."""
    if len(model.mtp) == 0:
        raise ValueError(
            "speculative decoding drafts with the MTP module, but this model has "
            "num_nextn_predict_layers=0; train a model with MTP"
        )
    mode = inference_attn_mode(attn_mode)
    ids, _ = _as_batch(prompt, None, model.device)
    if ids.shape[0] != 1:
        raise ValueError(f"speculative decoding here takes one prompt at a time, got a batch of {ids.shape[0]}")
    _check_length(model, ids.shape[1], max_new_tokens)  # a verify step never reaches past the last kept token
    t0 = time.perf_counter()
    with eval_mode(model):
        cache, mtp_cache = model.new_cache(), KVCache()  # the MTP block keeps its own cache

        out = model(ids, cache=cache, attn_mode=mode)  # prefill
        tokens = ids[0].tolist()
        n0 = len(tokens)
        tokens.append(int(out.logits[0, -1].argmax()))
        # MTP inputs not yet consumed: hidden h_i paired with the token that follows position i
        pending_h = out.hidden  # (1, T0, D)
        drafted = accepted = forwards = 0

        while len(tokens) - n0 < max_new_tokens and not (eos_id is not None and tokens[-1] == eos_id):
            # 1. draft: the MTP module reads the new (h_i, token_{i+1}) pairs and guesses the next token
            m = pending_h.shape[1]
            following = torch.tensor([tokens[-m:]], device=ids.device)  # (1, m)
            _, draft_logits = model.predict_ahead(pending_h, following, cache=mtp_cache, attn_mode=mode)
            draft = int(draft_logits[0, -1].argmax())
            drafted += 1

            # 2. verify: one main forward over [last token, draft]
            step_in = torch.tensor([[tokens[-1], draft]], device=ids.device)
            ver = model(step_in, cache=cache, attn_mode=mode)
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
    return SpeculativeResult(
        tokens=torch.tensor([tokens], device=ids.device),
        drafted=drafted,
        accepted=accepted,
        main_forwards=forwards,
        seconds=time.perf_counter() - t0,
        prompt_len=n0,
    )
