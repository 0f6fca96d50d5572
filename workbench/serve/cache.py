"""Prefix caching: reuse the latent KV of a token prefix that an earlier request already computed.

Attention is causal, so the cache entries of a prompt's first k tokens depend on those k tokens only: two
requests that share a prefix (a prompt set's template, a system prompt, the earlier turns of a chat) share
its KV exactly. After a prefill the engine ``store``s the prompt's per-token entries; a new request
``lookup``s the longest stored prefix of its tokens, takes the first k slots of that entry (the KV of a
prefix is the prefix of the KV) and prefills only the remaining tokens. Time to first token then grows
with the new tokens, not the whole prompt.

MLA makes this affordable: in absorbed mode a token costs ``(kv_lora_rank + qk_rope_head_dim) * layers``
numbers, 576 * 61 for DeepSeek-V3 (about 70 KB in bf16) instead of the 40,960 * 61 of multi-head
attention. DeepSeek's API keeps such caches *on disk* and bills a hit at about a tenth of a miss.

Bounds and order: the cache holds at most ``max_bytes`` of tensors; inserting past the bound evicts the
least recently used entries (a lookup that hits refreshes its entry). An entry that is a prefix of another
is redundant and never kept twice. ``save``/``load`` keep the entries in one safetensors file between
restarts, with a fingerprint of the model so that a file from another model is refused, never misused.

Simplifications: entries are whole prompts matched by a linear scan (each comparison stops at the first
difference; a production server hashes fixed-size blocks into a radix tree), and the newest request always
prefills at least its last token (its logits are needed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.io.files import CheckpointError, load_tensors, save_tensors

Entries = dict[int, dict[str, torch.Tensor]]  # layer -> {name: (n_tokens, ...)}, one row's KV in token order


def entry_bytes(entries: Entries) -> int:
    return sum(t.numel() * t.element_size() for d in entries.values() for t in d.values())


def slice_entries(entries: Entries, n: int) -> Entries:
    """The KV of the first ``n`` tokens."""
    return {i: {k: v[:n] for k, v in d.items()} for i, d in entries.items()}


def common_prefix(a: tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def model_fingerprint(model) -> str:
    """A short hash of the model's config and a sample of its weights: which model a cache file belongs to."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one token
    hit_tokens: int = 0
    miss_tokens: int = 0
    evictions: int = 0
    stored: int = 0


class PrefixCache:
    """Latent KV by token prefix, bounded in bytes, least recently used out first. Thread-safe."""

    def __init__(self, max_bytes: int, fingerprint: str = "") -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0 (0 disables the cache), got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self._entries: OrderedDict[tuple[int, ...], Entries] = OrderedDict()  # oldest use first
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def tokens_held(self) -> int:
        return sum(len(k) for k in self._entries)

    def lookup(self, tokens: list[int], limit: int | None = None) -> tuple[int, Entries | None]:
        """The longest cached prefix of ``tokens`` (at most ``limit`` tokens): its length and KV (None: none)."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        with self._lock:
            self.stats.lookups += 1
            best, best_key = 0, None
            for key in self._entries:
                n = common_prefix(key, tokens[:limit])
                if n > best:
                    best, best_key = n, key
            if best_key is None:
                self.stats.miss_tokens += len(tokens)
                return 0, None
            self._entries.move_to_end(best_key)
            self.stats.hits += 1
            self.stats.hit_tokens += best
            self.stats.miss_tokens += len(tokens) - best
            return best, slice_entries(self._entries[best_key], best)

    def store(self, tokens: list[int], entries: Entries) -> bool:
        """Keep the KV of ``tokens`` (entries hold at least len(tokens) slots); False when it cannot fit."""
        key = tuple(tokens)
        if not key:
            return False
        entries = {i: {k: v[: len(key)].detach().clone() for k, v in d.items()} for i, d in entries.items()}
        size = entry_bytes(entries)
        if size > self.max_bytes:
            return False
        with self._lock:
            for old in list(self._entries):
                if len(old) >= len(key) and old[: len(key)] == key:  # already covered by a longer entry
                    self._entries.move_to_end(old)
                    return True
                if len(old) < len(key) and key[: len(old)] == old:  # the new entry covers the old one
                    self._bytes -= entry_bytes(self._entries.pop(old))
            while self._entries and self._bytes + size > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= entry_bytes(gone)
                self.stats.evictions += 1
            self._entries[key] = entries
            self._bytes += size
            self.stats.stored += 1
            return True

    def metrics(self) -> dict[str, float | int]:
        s = self.stats
        tokens = self.tokens_held
        total = s.hit_tokens + s.miss_tokens
        return {
            "entries": len(self._entries),
            "tokens_held": tokens,
            "bytes_held": self._bytes,
            "max_bytes": self.max_bytes,
            "bytes_per_token": self._bytes / tokens if tokens else 0.0,
            "lookups": s.lookups,
            "hits": s.hits,
            "hit_rate": s.hits / s.lookups if s.lookups else 0.0,
            "hit_tokens": s.hit_tokens,
            "miss_tokens": s.miss_tokens,
            "token_hit_rate": s.hit_tokens / total if total else 0.0,
            "evictions": s.evictions,
        }

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> int:
        """Write every entry to one safetensors file (atomically); returns the number of entries written."""
        tensors: dict[str, torch.Tensor] = {}
        with self._lock:
            for n, (key, entries) in enumerate(self._entries.items()):  # oldest first, so load keeps the order
                tensors[f"{n}.tokens"] = torch.tensor(key, dtype=torch.long)
                for layer, d in entries.items():
                    for name, t in d.items():
                        tensors[f"{n}.{layer}.{name}"] = t.cpu()
            count = len(self._entries)
        save_tensors(Path(path), tensors, metadata={"fingerprint": self.fingerprint, "entries": str(count)})
        return count

    def load(self, path: str | Path, device: torch.device | str = "cpu") -> int:
        """Add the entries of a file written by ``save`` (for the same model); returns how many were kept."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no prefix cache file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{path} holds the prefix cache of another model (fingerprint {meta.get('fingerprint')!r}, this "
                f"model's is {self.fingerprint!r}); delete it or pass another --cache-file"
            )
        flat = load_tensors(path, device)
        grouped: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in flat.items():
            n, _, rest = name.partition(".")
            if not n.isdigit() or not rest:
                raise CheckpointError(f"{path}: unexpected tensor {name!r}; not a prefix cache file")
            grouped.setdefault(int(n), {})[rest] = t
        kept = 0
        for n in sorted(grouped):
            parts = grouped[n]
            if "tokens" not in parts:
                raise CheckpointError(f"{path}: entry {n} has no tokens")
            entries: Entries = {}
            for rest, t in parts.items():
                if rest == "tokens":
                    continue
                layer, _, tname = rest.partition(".")
                entries.setdefault(int(layer), {})[tname] = t
            kept += self.store(parts["tokens"].tolist(), entries)
        return kept


__all__ = ["CacheStats", "Entries", "PrefixCache", "common_prefix", "entry_bytes", "model_fingerprint"]
