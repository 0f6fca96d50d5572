"""The padding mask and per-row positions: padded rows compute what they compute alone, as transformers does.

Checked four ways: against transformers' DeepseekV3ForCausalLM under the same attention mask (left and right
padding, explicit position ids); a padded row against the same row alone, prefill and decoding, both attention
modes; the cache's row operations (select, concat, from_rows, trim) that a batching server needs; and the
unmasked path, which an all-ones mask must leave bit for bit as it was.
"""

from __future__ import annotations

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.model.generate import generate, left_pad
from workbench.model.mla import KVCache

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Model(ModelConfig.from_preset("tiny")).eval()


def _ragged(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- transformers under the same mask ---------------------------------------------------------------
transformers = pytest.importorskip("transformers")

HF_BASE = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    num_attention_heads=2,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=64,
    initializer_range=0.15,
    num_nextn_predict_layers=0,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}


@pytest.fixture(scope="module", params=["plain", "yarn"])
def pair(request, tmp_path_factory):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from workbench.io.hf import load_hf

    config = ModelConfig(**HF_BASE, rope_scaling=YARN if request.param == "yarn" else None)
    torch.manual_seed(11)
    hf_config = DeepseekV3Config(**config.to_hf())
    hf_config._attn_implementation = "eager"
    theirs = DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, b in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(12)))
    folder = tmp_path_factory.mktemp("hf") / request.param
    theirs.save_pretrained(folder)
    return load_hf(folder).eval(), theirs


def _hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """transformers' generate: positions count the real tokens (pads get 1, unused)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_logits_match_transformers(pair, side):
    ours, theirs = pair
    rows = _ragged(96, [20, 13, 7, 20], seed=1)
    ids, mask = left_pad(rows)
    if side == "right":  # the same rows padded at the end
        ids, mask = ids.flip(1), mask.flip(1)
        ids = torch.stack([torch.cat([r[m.bool()].flip(0), r[~m.bool()]]) for r, m in zip(ids, mask)])
        mask = torch.stack([m.sort(descending=True).values for m in mask])
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=_hf_positions(mask), use_cache=False).logits
        real = mask.bool()
        assert ref[real].abs().max() > 1.0
        for mode in ("naive", "absorb"):
            got = ours(ids, attention_mask=mask, attn_mode=mode).logits
            diff = (got[real] - ref[real]).abs().max().item()
            assert diff <= TOL, f"{side} padding, {mode}: {diff:.2e}"


def test_explicit_position_ids_match_transformers(pair):
    ours, theirs = pair
    ids = torch.tensor(_ragged(96, [12, 12], seed=2))
    positions = torch.arange(12).repeat(2, 1) * torch.tensor([[1], [3]])  # the second row: every third position
    with torch.no_grad():
        # with a mask given, transformers does not read gaps in position_ids as packed sequences
        ref = theirs(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=False).logits
        got = ours(ids, position_ids=positions, attn_mode="absorb").logits
    assert (got - ref).abs().max().item() <= TOL
    with torch.no_grad():  # and the positions matter (RoPE is relative: gaps change scores, shifts would not)
        plain = ours(ids).logits
    assert (plain[1] - ref[1]).abs().max() > 10 * TOL


# ---- a padded row computes what it computes alone --------------------------------------------------
@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_padded_rows_equal_rows_alone_in_prefill_and_decoding(model, mode):
    rows = _ragged(2048, [9, 3, 14], seed=3)
    ids, mask = left_pad(rows)
    steps = torch.randint(1, 2048, (3, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = KVCache()
        batch = [model(ids, cache=cache, attention_mask=mask, attn_mode=mode).logits]
        for t in range(steps.shape[1]):
            batch.append(model(steps[:, t : t + 1], cache=cache, attn_mode=mode).logits)
        assert cache.valid is not None and cache.valid.shape == (3, 14 + 4)
        for b, row in enumerate(rows):
            alone_cache = KVCache()
            alone = [model(torch.tensor([row]), cache=alone_cache, attn_mode=mode).logits]
            for t in range(steps.shape[1]):
                alone.append(model(steps[b : b + 1, t : t + 1], cache=alone_cache, attn_mode=mode).logits)
            real = mask[b].bool()
            assert (batch[0][b, real] - alone[0][0]).abs().max() <= TOL
            for t in range(1, len(alone)):
                assert (batch[t][b] - alone[t][0]).abs().max() <= TOL


def test_an_all_ones_mask_is_the_unmasked_path_bit_for_bit(model):
    ids = torch.randint(0, 2048, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(ids, labels=ids)
        masked = model(ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(plain.logits, masked.logits) and torch.equal(plain.loss, masked.loss)


def test_the_loss_of_a_right_padded_batch_skips_the_pads(model):
    rows = _ragged(2048, [12, 6], seed=6)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        out = model(ids, labels=ids, attention_mask=mask)
        alone = [model(torch.tensor([r]), labels=torch.tensor([r])) for r in rows]
    n = [len(r) - 1 for r in rows]  # predicted tokens per row
    expected = sum(a.main_loss * k for a, k in zip(alone, n)) / sum(n)
    assert out.main_loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_predict_ahead_is_the_trained_mtp_computation(model):
    """Drafting and training run the same MTP code: predict_ahead on the main model's hidden states and the
    next tokens gives the logits that the training forward computes for MTP depth 1."""
    ids = torch.randint(0, 2048, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(ids, labels=ids, compute_mtp=True)
        _, logits = model.predict_ahead(out.hidden[:, :-1], ids[:, 1:])
        cache = KVCache()  # the same in two steps through the module's own cache
        _, first = model.predict_ahead(out.hidden[:, :6], ids[:, 1:7], cache=cache, attn_mode="absorb")
        _, rest = model.predict_ahead(out.hidden[:, 6:-1], ids[:, 7:], cache=cache, attn_mode="absorb")
    # logits at position i predict token i + 2: the MTP loss of training, recomputed from predict_ahead's logits
    again = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 2:])
    assert again.item() == pytest.approx(out.mtp_losses[0].item(), abs=1e-5)
    assert (torch.cat([first, rest], dim=1) - logits).abs().max() <= TOL
    with pytest.raises(ValueError, match="depth"):
        model.predict_ahead(out.hidden, ids, depth=2)


# ---- the cache's rows ---------------------------------------------------------------------------------
def test_cache_rows_select_concat_and_rebuild(model):
    rows = _ragged(2048, [5, 9, 2], seed=8)
    caches = []
    with torch.no_grad():
        for r in rows:
            c = KVCache()
            model(torch.tensor([r]), cache=c, attn_mode="absorb")
            caches.append(c)
    joined = KVCache.concat(caches)
    assert joined.batch_size == 3 and joined.length == 9
    assert joined.valid.sum(1).tolist() == [5, 9, 2]
    for b, c in enumerate(caches):  # row b's real slots hold exactly what its own cache held
        got, want = joined.row(b), c.row(0)
        assert all(torch.equal(got[i][k], want[i][k]) for i in want for k in want[i])
    rebuilt = KVCache.from_rows([c.row(0) for c in caches])
    assert torch.equal(rebuilt.valid, joined.valid)
    assert all(torch.equal(rebuilt.layers[i][k], joined.layers[i][k]) for i in joined.layers for k in joined.layers[i])
    kept = joined.select([0, 2])  # the longest row left: its leading slots are trimmed away
    assert kept.batch_size == 2 and kept.length == 5 and kept.valid.sum(1).tolist() == [5, 2]
    only = joined.select([1])
    assert only.valid is None and only.length == 9
    empty = KVCache.from_rows([None, None])
    assert empty.length == 0 and empty.batch_size == 0


def test_decoding_a_joined_cache_continues_every_row(model):
    """Rows prefilled apart, joined, decoded together: each row's greedy tokens are its own generate()."""
    rows = _ragged(2048, [4, 11, 7], seed=9)
    want = [generate(model, r, 8)[0, len(r) :].tolist() for r in rows]
    caches, last = [], []
    with torch.no_grad():
        for r in rows:
            c = KVCache()
            last.append(model(torch.tensor([r]), cache=c, attn_mode="absorb").logits[0, -1])
            caches.append(c)
        cache = KVCache.concat(caches)
        logits = torch.stack(last)
        got = [[] for _ in rows]
        for _ in range(8):
            nxt = logits.argmax(-1)
            for b in range(3):
                got[b].append(int(nxt[b]))
            logits = model(nxt[:, None], cache=cache, attn_mode="absorb").logits[:, -1]
    assert got == want


# ---- generate on prompts of different lengths ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_generate_batches_prompts_of_different_lengths(model, mode):
    rows = _ragged(2048, [3, 10, 6, 10], seed=10)
    out = generate(model, rows, 12, attn_mode=mode)
    assert out.shape == (4, 10 + 12)
    for b, r in enumerate(rows):
        alone = generate(model, r, 12, attn_mode=mode)[0]
        assert out[b, 10 - len(r) :].tolist() == alone.tolist()
    ids, mask = left_pad(rows)
    assert torch.equal(generate(model, ids, 12, attn_mode=mode, attention_mask=mask), out)


def test_generate_refuses_bad_masks_and_lengths(model):
    ids, mask = left_pad([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, ids, 2, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="shape"):
        generate(model, ids, 2, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [1, 2, 3], model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2, 3], -1)
