"""Token streams and batches: tokenized documents split by document into train and validation.

``TokenDataset`` tokenizes documents (``<|bos|> text <|eos|>``), splits them into train and validation
sets by document, and concatenates each split into one flat stream of token ids. Training draws random
windows from that stream; evaluation reads consecutive windows. Windows may cross document boundaries
(the ``<|bos|>``/``<|eos|>`` tokens show the model where one document ends and the next begins), which
is what GPT-style pre-training does too: no padding, no wasted compute.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from workbench.data.document import Document

if TYPE_CHECKING:
    from workbench.io.tokenizer import Tokenizer

DATASET_SPLITS: tuple[str, ...] = ("train", "val")


def _check_split(split: str) -> None:
    if split not in DATASET_SPLITS:
        raise ValueError(f"split must be one of {DATASET_SPLITS}, got {split!r}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class TokenDataset:
    """Tokenized documents as one flat token stream per split, with the domain of every token.

    ``tokens[split]`` is a 1-D ``torch.long`` tensor: ``<|bos|> doc <|eos|> <|bos|> doc <|eos|> ...``.
    ``token_domains[split]`` has the same length and holds, for every token, the index of its document's
    domain in ``self.domains`` (the sorted names of the domains present).

    All batch methods return CPU tensors; move them to your device in the training loop.
    """

    def __init__(
        self,
        tokens: dict[str, Tensor],
        token_domains: dict[str, Tensor],
        domains: list[str],
        n_docs: dict[str, int],
    ) -> None:
        for split in DATASET_SPLITS:
            if tokens[split].shape != token_domains[split].shape:
                raise ValueError(f"{split}: tokens and token_domains must have the same shape")
        self.tokens = tokens
        self.token_domains = token_domains
        self.domains = domains
        self.n_docs = n_docs
        self.tokenizer: Tokenizer | None = None  # set by from_documents
        # per split and domain: the tokens of only that domain's documents, in order (for domain_batch)
        self._domain_tokens = {
            split: {name: tokens[split][token_domains[split] == i] for i, name in enumerate(domains)}
            for split in DATASET_SPLITS
        }

    @classmethod
    def from_documents(
        cls, docs: Sequence[Document], tokenizer: Tokenizer, val_fraction: float = 0.1, seed: int = 0
    ) -> TokenDataset:
        """Tokenize `docs` and split them, by document, into train and validation streams.

        The split is stratified: each domain gives round(val_fraction * its documents) documents (at
        least one, when it has two or more and val_fraction > 0) to validation, chosen by
        ``random.Random(seed)``. Within a split, documents keep their order in `docs`.
        """
        if len(docs) == 0:
            raise ValueError("no documents to tokenize")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        domains = sorted({d.domain for d in docs})
        domain_index = {name: i for i, name in enumerate(domains)}

        rng = random.Random(seed)
        val_docs: set[int] = set()
        for name in domains:
            members = [i for i, d in enumerate(docs) if d.domain == name]
            n_val = round(val_fraction * len(members))
            if val_fraction > 0 and len(members) >= 2:
                n_val = max(1, n_val)
            val_docs.update(rng.sample(members, n_val))

        encoded = tokenizer.encode_batch([d.text for d in docs])
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        tokens, token_domains, n_docs = {}, {}, {}
        for split in DATASET_SPLITS:
            chosen = [i for i in range(len(docs)) if (i in val_docs) == (split == "val")]
            flat: list[int] = []
            lengths: list[int] = []
            for i in chosen:
                flat.append(bos)
                flat.extend(encoded[i])
                flat.append(eos)
                lengths.append(len(encoded[i]) + 2)
            doc_domains = torch.tensor([domain_index[docs[i].domain] for i in chosen], dtype=torch.long)
            tokens[split] = torch.tensor(flat, dtype=torch.long)  # (N,)
            token_domains[split] = torch.repeat_interleave(doc_domains, torch.tensor(lengths, dtype=torch.long))
            n_docs[split] = len(chosen)
        dataset = cls(tokens, token_domains, domains, n_docs)
        dataset.tokenizer = tokenizer  # the ids' meaning: trainers hand it to the model they train
        return dataset

    def n_tokens(self, split: str) -> int:
        """Number of tokens in a split's stream."""
        _check_split(split)
        return self.tokens[split].numel()

    def _check_length(self, stream: Tensor, seq_len: int, what: str) -> None:
        if stream.numel() < seq_len + 1:
            raise ValueError(
                f"{what} has {stream.numel()} tokens, too few for windows of seq_len={seq_len} "
                f"(needs at least {seq_len + 1}). Use a smaller seq_len or more documents "
                f"(or a larger val_fraction for the val split)."
            )

    @staticmethod
    def _random_windows(
        stream: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random window starts and the windows themselves: (B,) and (B, T)."""
        starts = torch.randint(0, stream.numel() - seq_len + 1, (batch_size,), generator=generator)  # (B,)
        positions = starts[:, None] + torch.arange(seq_len)[None, :]  # (B, T)
        return starts, stream[positions]

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows of seq_len tokens from a split.

        Returns ``input_ids`` (B, T) and ``domain_ids`` (B,), the domain of each window's first token.
        A window may run across a document boundary (and so across domains); its domain id is that of
        where it starts. All randomness comes from `generator`, so restoring its state replays batches.
        """
        _check_split(split)
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        stream = self.tokens[split]
        self._check_length(stream, seq_len, f"the {split} split")
        starts, input_ids = self._random_windows(stream, batch_size, seq_len, generator)  # (B,), (B, T)
        domain_ids = self.token_domains[split][starts]  # (B,)
        return input_ids, domain_ids

    def eval_batches(
        self, batch_size: int, seq_len: int, n_batches: int | None = None, split: str = "val"
    ) -> list[tuple[Tensor, Tensor]]:
        """Consecutive, non-overlapping windows from the start of a split (validation by default).

        No randomness: every call returns the same batches, so evaluation losses are comparable across
        runs. Returns at most `n_batches` full batches (all that fit when None); if the split is too short
        for even one batch, raises ValueError.
        """
        _check_split(split)
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        stream, domain_stream = self.tokens[split], self.token_domains[split]
        self._check_length(stream, seq_len, f"the {split} split")
        available = stream.numel() // (batch_size * seq_len)
        if available == 0:
            raise ValueError(
                f"the {split} split has {stream.numel()} tokens, fewer than one batch of "
                f"{batch_size} x {seq_len} = {batch_size * seq_len}. Use a smaller batch_size or seq_len, "
                f"or more documents."
            )
        n = available if n_batches is None else min(n_batches, available)
        batches = []
        for b in range(n):
            start = b * batch_size * seq_len
            chunk = stream[start : start + batch_size * seq_len].view(batch_size, seq_len)  # (B, T)
            domain_ids = domain_stream[start : start + batch_size * seq_len : seq_len]  # (B,)
            batches.append((chunk.clone(), domain_ids.clone()))
        return batches

    def domain_batch(
        self, domain: str, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random windows drawn only from the documents of one domain.

        The domain's documents are concatenated in order (windows can cross between two documents of
        that domain, never into another domain). Returns ``input_ids`` (B, T) and ``domain_ids`` (B,),
        the latter all equal to ``self.domains.index(domain)``.
        """
        _check_split(split)
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        if domain not in self.domains:
            raise ValueError(f"domain {domain!r} is not in this dataset; it has {self.domains}")
        stream = self._domain_tokens[split][domain]
        self._check_length(stream, seq_len, f"domain {domain!r} in the {split} split")
        _, input_ids = self._random_windows(stream, batch_size, seq_len, generator)  # (B, T)
        domain_ids = torch.full((batch_size,), self.domains.index(domain), dtype=torch.long)  # (B,)
        return input_ids, domain_ids

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.n_tokens(s):,} tokens in {self.n_docs[s]:,} docs" for s in DATASET_SPLITS)
        return f"TokenDataset({counts}, domains={self.domains})"
