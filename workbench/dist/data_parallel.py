"""Data parallelism: every process holds the model, computes its shard of the global batch, and the
gradients are averaged, so N processes take the same step as one process on the whole batch.

Two ways to hold the model (``LoopConfig.parallel``):

* ``"ddp"``: ``DistributedDataParallel``. Every rank keeps a full copy of the weights and of AdamW's
  moments; during the backward the gradients are all-reduced (averaged) in buckets, overlapped with
  the rest of the backward. Memory per rank: everything.
* ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``). Every parameter is split along its
  first dimension across the ranks (a ``DTensor``); each decoder block all-gathers its weights just
  before it runs and frees them after, and the gradients are reduce-scattered, so a rank keeps only
  1/N of the weights, gradients and optimizer moments between uses. This is ZeRO-3.

Why "the same step": the loss is a mean over tokens. When every rank holds B/N of the B sequences (with
as many labelled tokens), the mean of the N shard losses is the full batch's loss, and the average of
their gradients is its gradient (``shard_loss`` weights shards whose labelled tokens differ, as in SFT).
What remains different is the order of floating-point sums, so results agree to float tolerance.

DeepSeek-V3's loss-free balancing needs one more exchange: the expert loads. Each rank routes only its
own tokens, so the counts are all-reduced (summed) before the bias moves: every rank then applies the
same ``sign(mean - load)`` step and the biases (buffers, not parameters, so no gradient sync reaches
them) stay identical everywhere.

Checkpoints do not depend on the number of processes: FSDP's shards are gathered into the full
tensors, written once by rank 0 in the single-process layout, and split again on load, so a run saved
on 4 processes resumes on 1, 2 or 3 (``workbench.train.loop``).

Where it simplifies: the batch is drawn in full on every rank and sliced (a sampler that draws only its
shard saves the draw, not the compute); no hybrid sharding, no mixed-precision policy, no activation
checkpointing; FSDP gathers one decoder block at a time.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from workbench.dist.process import Group, on_main, setup
from workbench.model import IGNORE_INDEX

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


class _DDP(DistributedDataParallel):
    """DDP that answers for the model it wraps (``model.device``, ``model.routers()``, ``model.new_cache()``),
    so a trainer written for a ``Model`` runs on it unchanged."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class DataParallel:
    """The data-parallel side of one run: the group, the wrapped model, and the exchanges the loop needs."""

    def __init__(self, mode: str, group: Group) -> None:
        if mode not in ("ddp", "fsdp"):
            raise ValueError(f"mode must be 'ddp' or 'fsdp', got {mode!r}")
        self.mode, self.group = mode, group
        self.rank, self.world_size, self.device = group.rank, group.world_size, group.device

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    # ---- the model ----------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, find_unused: bool = True) -> nn.Module:
        """The model the trainer steps: a DDP wrapper around ``model`` (same parameters), or an FSDP-sharded
        copy of it (``model`` itself stays whole; ``sync_into`` copies the trained weights back).

        find_unused: some steps leave parameters without a gradient (a trainer that skips the MTP modules);
        DDP must then search the graph for them each step. A trainer whose every step uses every parameter
        says so (``uses_every_parameter``) and saves the search."""
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            buffers = (  # sync buffers once at the start, not before every forward (the biases move alike anyway)
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                else {}
            )
            return _DDP(model, device_ids=ids, find_unused_parameters=find_unused, **buffers)
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # every rank starts from rank 0's weights (DDP does this itself)
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        tokenizer, model.tokenizer = getattr(model, "tokenizer", None), None
        try:
            work = copy.deepcopy(model)  # exact: weights, buffers and the config, no random draws
        finally:
            model.tokenizer = tokenizer
        work.tokenizer = tokenizer
        for block in work.layers:
            fully_shard(block)  # one all-gather per decoder block
        for module in work.mtp:  # MTP's norms and projection stay with the root: the model reads its head norm
            fully_shard(module.self_attn)
            fully_shard(module.mlp)
        fully_shard(work)  # the embedding, the head, the norms
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        return work

    def inner(self, work: nn.Module) -> nn.Module:
        """The ``Model`` inside what ``wrap`` returned (DDP's module; the sharded model itself)."""
        return work.module if isinstance(work, DistributedDataParallel) else work

    @torch.no_grad()
    def sync_into(self, model: nn.Module, work: nn.Module) -> None:
        """Make ``model`` hold the trained weights and buffers (FSDP: gathered from the shards; a collective,
        every rank calls it). DDP trains ``model``'s own parameters: nothing to do."""
        if self.mode == "ddp":
            return
        state = {name: full_tensor(t) for name, t in self.inner(work).state_dict().items()}
        model.load_state_dict(state)

    # ---- the batch and the loss ---------------------------------------------------------------------
    def shard(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """This rank's rows of each tensor (contiguous blocks of B / world_size rows)."""
        out = []
        for t in tensors:
            rows = t.shape[0]
            if rows % self.world_size:
                raise ValueError(
                    f"a batch of {rows} sequences does not split evenly over {self.world_size} processes; "
                    f"choose a batch_size divisible by {self.world_size} "
                    f"(e.g. {self.world_size * max(1, rows // self.world_size)})"
                )
            per = rows // self.world_size
            out.append(t[self.rank * per : (self.rank + 1) * per])
        return out[0] if len(out) == 1 else tuple(out)

    def shard_loss(self, output, labels: torch.Tensor, full_labels: torch.Tensor, config) -> tuple[torch.Tensor, dict]:
        """This shard's loss weighted so that the mean over ranks is the full batch's loss (see ``shard_loss``)."""
        return shard_loss(output, labels, full_labels, self.world_size, config)

    # ---- exchanges ----------------------------------------------------------------------------------
    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.world_size

    def global_counts(self, counts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Expert loads summed over ranks (one all-reduce for every router): every rank balances alike."""
        return global_counts(counts)

    def reduce_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A metrics row every rank agrees on: each float is averaged over the ranks (left as it is where
        all ranks have the same value); other values are rank 0's."""
        keys = sorted(k for k, v in row.items() if isinstance(v, float))
        if not keys:
            return row
        values = torch.tensor([row[k] for k in keys], dtype=torch.float64)
        low, high, total = values.clone(), values.clone(), values.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(total)
        out = dict(row)
        for i, k in enumerate(keys):
            out[k] = row[k] if low[i] == high[i] else float(total[i]) / self.world_size
        return out

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """The global gradient norm (FSDP: over the shards of every rank), clipped to ``max_norm``."""
        if self.mode == "ddp":  # whole gradients, identical on every rank after DDP's all-reduce
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norms = torch.stack([_local(g).detach().double().pow(2).sum() for g in grads])  # (n,) this rank's squares
        total = norms.sum().double()
        dist.all_reduce(total)  # the shards are disjoint: their squares add up to the full norm's square
        norm = float(total.sqrt())
        scale = min(1.0, max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s coefficient
        if scale < 1.0:
            for g in grads:
                g.mul_(scale)
        return norm

    def on_main(self, fn):
        return on_main(fn)

    def close(self) -> None:
        self.group.close()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def distribute_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` split the way ``like`` is (a DTensor parameter's shards), or ``full`` when ``like`` is whole."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full


def global_counts(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per router, the expert loads summed over every rank of the group (one all-reduce)."""
    if not counts or not dist.is_initialized() or dist.get_world_size() == 1:
        return counts
    sizes = [c.numel() for c in counts]
    flat = torch.cat([c.reshape(-1).to(torch.float64) for c in counts])  # exact for integer loads
    dist.all_reduce(flat)
    return [part.to(c.dtype).view_as(c) for part, c in zip(flat.split(sizes), counts)]


def _labelled(labels: torch.Tensor, shift: int) -> int:
    """Positions whose target (``shift`` ahead) carries a loss."""
    return int((labels[:, shift:] != IGNORE_INDEX).sum()) if shift < labels.shape[1] else 0


def shard_loss(output, labels: torch.Tensor, full_labels: torch.Tensor, world_size: int,
               config) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The loss of one rank's rows, weighted so that averaging it over the ranks gives the full batch's loss.

    output: the ``ModelOutput`` of this rank's rows; labels: their labels (B / world_size, T); full_labels:
    the whole batch's (B, T); config: the model's ``ModelConfig`` (lambda and alpha). Each cross-entropy is
    a mean over its labelled tokens, so a shard holding c of the batch's C labelled tokens counts with
    weight world_size * c / C (MTP depth d scores the targets d + 1 further ahead). The sequence-wise
    balance loss is a mean over sequences, the same in every shard of equally many rows. Returns the loss
    to back-propagate and its parts as floats (each averages over the ranks to the full batch's value).
    """

    def weight(shift: int) -> float:
        total = _labelled(full_labels, shift)
        return world_size * _labelled(labels, shift) / total if total else 0.0

    loss = main = output.main_loss * weight(1)
    parts = {"main_loss": float(main.detach())}
    if output.mtp_losses:
        mtp = torch.stack([m * weight(d + 2) for d, m in enumerate(output.mtp_losses)]).mean()
        loss = loss + config.mtp_loss_weight * mtp
        parts["mtp_loss"] = float(mtp.detach())
    if output.balance_loss is not None:
        loss = loss + config.seq_aux_loss_alpha * output.balance_loss
        parts["balance_loss"] = float(output.balance_loss.detach())
    return loss, {"loss": float(loss.detach()), **parts}


def data_parallel(parallel: str, device: str = "auto") -> DataParallel | None:
    """The data-parallel side of a run, or None for one process.

    parallel ``"auto"``: DDP when launched as several processes (torchrun, or inside a running group of
    more than one), one process otherwise. ``"ddp"`` / ``"fsdp"``: that, in any group (one of one too).
    ``"none"``: one process; refused when several were launched (each would write the same run folder).
    """
    from workbench.dist.process import distributed_requested, env_world_size

    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    several = distributed_requested() and (
        (dist.is_initialized() and dist.get_world_size() > 1) or env_world_size() > 1
    )
    if parallel == "none":
        if several:
            raise ValueError(
                "several processes were launched but parallel='none'; pass --parallel ddp or fsdp (or auto)"
            )
        return None
    if parallel == "auto":
        if not several:
            return None
        parallel = "ddp"
    return DataParallel(parallel, setup(device))


__all__ = [
    "PARALLEL_MODES",
    "DataParallel",
    "data_parallel",
    "distribute_like",
    "full_tensor",
    "global_counts",
    "shard_loss",
]
