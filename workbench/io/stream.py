"""Streaming load: fill a model built on the meta device, shard by shard, so memory stays near its size.

The simple way to load a checkpoint builds the model (its weights, randomly initialised), reads every
file into a second copy, stacks the per-expert tensors into a third and copies them in: two to three
times the model's size at the peak. ``materialise`` applies a ``LoadPlan`` instead:

1. the model is built on PyTorch's ``meta`` device (shapes, no memory, no initialisation);
2. each of its tensors is allocated once, empty, in its final dtype on the final device;
3. the files are read one at a time with safetensors' ``safe_open``, one tensor at a time, and each
   stored tensor is copied straight into its place (an expert into its row of the stack, half of a
   fused ``gate_up_proj`` into the gate or the up stack). FP8 weights are dequantised one tensor at a
   time, ``W = W_fp8 * scale_inv`` over each 128x128 block, on the way in. ``safe_open`` maps the file
   into memory; the mapping is dropped and reopened every ``chunk_bytes`` so that the pages already
   copied do not pile up in the resident set.

So the peak is the model plus one tensor (plus at most ``chunk_bytes`` of mapped file). The derived
buffers (the rotary tables, the routers' masks of active experts) are computed from the config, not
read. Every value is checked on the way: NaN or infinite weights are refused by name
(``allow_bad_weights=True`` loads them with a warning); a router bias may hold -inf, which is how an
expert that must never be chosen is written. A failure leaves nothing half-loaded: the model is only
returned once every tensor is in place.

``materialise(plan, device, modules=[...])`` fills only some modules of a skeleton: that is how
``workbench.io.layered`` brings one decoder layer at a time into memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from workbench.io.files import CheckpointError
from workbench.io.fp8_layout import fp8_dequantized_note
from workbench.io.headers import FP8_DTYPES, Stored
from workbench.io.names import BIAS
from workbench.io.plan import LoadPlan, Part, Target
from workbench.model import Model
from workbench.model.moe import Router
from workbench.model.rope import rope_tables

DEFAULT_CHUNK_BYTES = 256 * 1024**2


class _Reader:
    """Tensors of one safetensors file, reopened every ``chunk_bytes`` so mapped pages are let go."""

    def __init__(self, file: Path, chunk_bytes: int) -> None:
        self.file, self.chunk_bytes = file, chunk_bytes
        self._handle = None
        self._read = 0

    def get(self, stored: Stored) -> torch.Tensor:
        if self._handle is None or self._read > self.chunk_bytes:
            self.close()
            try:
                self._handle = safe_open(str(self.file), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{self.file} cannot be read ({e}); it may be truncated or corrupt") from e
            self._read = 0
        try:
            tensor = self._handle.get_tensor(stored.name)
        except Exception as e:
            raise CheckpointError(f"{self.file}: tensor {stored.name} cannot be read ({e})") from e
        self._read += stored.nbytes
        return tensor

    def close(self) -> None:
        self._handle = None  # the mapping goes with the last reference


def skeleton(plan: LoadPlan) -> Model:
    """The model of a plan on the meta device: every module, no memory."""
    with torch.device("meta"):
        return Model(plan.config)


def materialise(
    plan: LoadPlan,
    device: str | torch.device = "cpu",
    *,
    model: Model | None = None,
    modules: Iterable[str] | None = None,
    allow_bad_weights: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
) -> Model:
    """Apply ``plan``: allocate and fill the model's tensors on ``device`` and return the model (eval mode).

    model: a skeleton from ``skeleton(plan)`` to fill in place (default: a new one).
    modules: fill only the tensors under these module names (``["embed_tokens", "norm", "lm_head"]``,
        ``["layers.3"]``); the rest stays on the meta device. None: everything, the tokenizer included.
    allow_bad_weights: load NaN / infinite values with a warning instead of refusing.
    chunk_bytes: reopen a file after reading this many bytes from it (bounds its mapped pages).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    device = torch.device(device)
    model = skeleton(plan) if model is None else model
    prefixes = None if modules is None else tuple(modules)

    def selected(name: str) -> bool:
        return prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes)

    _allocate(model, plan, device, selected)
    _derived_buffers(model, plan, device, selected)
    targets = [t for n, t in plan.targets.items() if selected(n)]
    fresh_owners = sorted({t.name.rsplit(".", 1)[0] for t in targets if t.fresh})
    for owner in fresh_owners:  # fresh initialisation first: the file's parts then overwrite what they hold
        model.reset_parameters(root=model.get_submodule(owner))
    state = model.state_dict(keep_vars=True)
    for t in targets:
        if t.zeros:
            state[t.name].data.zero_()
    bad = _fill(model, plan, targets, state, chunk_bytes, allow_bad_weights, progress)
    if bad:
        warnings.warn(f"{plan.folder}: loaded NaN/inf values as asked (allow_bad_weights): {bad}", stacklevel=2)
    _check_copies(plan, state, selected, chunk_bytes)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta and selected(n)]
    if left:  # cannot happen with a whole plan; guards against a model part the loader does not know
        raise CheckpointError(f"internal error: tensors {left} were not materialised")
    if prefixes is None:
        model.tokenizer = plan.tokenizer
    return model.eval()


def emit_notes(plan: LoadPlan, device: torch.device | str, stacklevel: int = 3) -> None:
    """Show the plan's warnings (and the FP8 note) once the load has succeeded."""
    for category, text in plan.notes:
        warnings.warn(text, category, stacklevel=stacklevel)
    if plan.fp8_tensors:
        warnings.warn(
            fp8_dequantized_note(str(plan.folder), plan.fp8_tensors, plan.dtype, device), stacklevel=stacklevel
        )


def _allocate(model: Model, plan: LoadPlan, device: torch.device, selected) -> None:
    """Give every selected meta tensor real, empty storage in its final dtype (tied tensors stay tied)."""
    made: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            slots = getattr(module, kind)
            for name, t in list(slots.items()):
                full = f"{module_name}.{name}" if module_name else name
                if t is None or not t.is_meta or not selected(full):
                    continue
                if id(t) not in made:
                    target = plan.targets.get(full)
                    dtype = target.dtype if target is not None else t.dtype
                    empty = torch.empty(t.shape, dtype=dtype, device=device)
                    made[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if kind == "_parameters" else empty
                slots[name] = made[id(t)]


def _derived_buffers(model: Model, plan: LoadPlan, device: torch.device, selected) -> None:
    """The tensors that are computed from the config, not stored: rotary tables and active-expert masks."""
    c = plan.config
    if selected("rope_cos") or selected("rope_sin"):
        cos, sin = rope_tables(c.qk_rope_head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling, device)
        model.rope_cos, model.rope_sin = cos, sin
    for name, module in model.named_modules():
        if isinstance(module, Router) and selected(f"{name}.active"):
            moe = model.get_submodule(name.rsplit(".", 1)[0])  # the MoE layer that owns the router
            module.active = Router.active_mask(c, moe.layer_idx).to(device)


def _fill(
    model: Model,
    plan: LoadPlan,
    targets: list[Target],
    state: dict[str, torch.Tensor],
    chunk_bytes: int,
    allow_bad: bool,
    progress: bool,
) -> list[str]:
    """Copy every part into its place, file by file; returns the names of non-finite tensors let through."""
    by_file: dict[Path, list[tuple[Target, Part]]] = {}
    for t in targets:
        for p in t.parts:
            by_file.setdefault(p.stored.file, []).append((t, p))
    total = sum(p.stored.nbytes for items in by_file.values() for _, p in items)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {plan.folder.name}")
    readers: dict[Path, _Reader] = {}
    bad: list[str] = []
    try:
        for file, items in by_file.items():
            readers.setdefault(file, _Reader(file, chunk_bytes))
            for target, part in items:
                dest = state[target.name]
                dest = dest[part.index] if part.index is not None else dest  # an expert's row of the stack
                with torch.no_grad():
                    _write_part(plan, part, dest, readers, chunk_bytes)
                if dest.is_floating_point():  # checked in its final dtype: an overflow to inf shows too
                    problem = _non_finite(dest, allow_neg_inf=target.name.endswith(BIAS))
                    if problem:
                        if not allow_bad:
                            raise CheckpointError(
                                f"checkpoint {plan.folder}: {part.stored.name} (in {file.name}) holds {problem}; "
                                "nothing was loaded. Pass allow_bad_weights=True to load it anyway"
                            )
                        bad.append(part.stored.name)
                if bar is not None:
                    bar.update(part.stored.nbytes)
            readers.pop(file).close()
    finally:
        for r in readers.values():
            r.close()
        if bar is not None:
            bar.close()
    return bad


def _write_part(plan: LoadPlan, part: Part, dest: torch.Tensor, readers: dict[Path, _Reader], chunk_bytes: int) -> None:
    """Copy one stored tensor into ``dest``: FP8 dequantised block row by block row, a fused half cut out."""
    value = readers[part.stored.file].get(part.stored)
    rows = None  # the rows of the stored matrices that dest takes: all, or one half of a fused gate_up_proj
    if part.half is not None:
        n = value.shape[1] // 2
        rows = (part.half * n, (part.half + 1) * n)
    if part.stored.dtype not in FP8_DTYPES:
        dest.copy_(value if rows is None else value[:, rows[0] : rows[1]])
        return
    scale_file = part.scale.file
    reader = readers.get(scale_file) or readers.setdefault(scale_file, _Reader(scale_file, chunk_bytes))
    scale = reader.get(part.scale)
    if not torch.isfinite(scale.float()).all():
        raise CheckpointError(f"checkpoint {plan.folder}: {part.scale.name} holds NaN/inf scales")
    if value.dim() == 2:
        _dequantize_into(dest, value, scale, plan.block, rows)
    else:  # stacked experts: one scale grid per expert
        for e in range(value.shape[0]):
            _dequantize_into(dest[e], value[e], scale[e], plan.block, rows)


def _dequantize_into(
    dest: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], rows: tuple[int, int] | None
) -> None:
    """dest (r1 - r0, cols) = q[r0:r1] * scale_inv expanded over its (br, bc) blocks, one block row at a time,
    so the float32 temporaries stay at one block row (the same products, element by element, as
    ``fp8.formats.dequantize``). The 8-bit codes go to dest's device first: on a GPU the products are
    computed there."""
    br, bc = block
    r0, r1 = rows if rows is not None else (0, q.shape[0])
    cols = q.shape[1]
    codes = q[r0:r1].to(dest.device)  # rows r0..r1 of q: row r of q is row r - r0 here
    scale_inv = scale_inv.to(dest.device)
    for blk in range(r0 // br, -(-r1 // br)):
        a, b = max(r0, blk * br), min(r1, (blk + 1) * br)
        per_col = scale_inv[blk].float().repeat_interleave(bc)[:cols]  # (cols,)
        dest[a - r0 : b - r0].copy_(codes[a - r0 : b - r0].float() * per_col)


def _non_finite(t: torch.Tensor, allow_neg_inf: bool, chunk: int = 1 << 22) -> str | None:
    """What is wrong with a tensor's values (NaN, inf; -inf allowed in a router bias), or None. Checked in
    chunks of ``chunk`` elements: a whole-tensor ``isnan`` on bf16 would allocate several times the tensor."""
    flat = t.reshape(-1)
    nan = inf = 0
    for c in flat.split(chunk):
        if bool(torch.isfinite(c).all()):
            continue
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isposinf(c).sum()) + (0 if allow_neg_inf else int(torch.isneginf(c).sum()))
    if nan or inf:
        return f"{nan} NaN and {inf} infinite value(s) out of {t.numel()}"
    return None


def _check_copies(plan: LoadPlan, state: dict[str, torch.Tensor], selected, chunk_bytes: int) -> None:
    """The MTP layers' embedding and head copies (and a tied lm_head) must equal the originals."""
    for stored, original in plan.copies:
        if not selected(original) or original not in state:
            continue
        copy = _Reader(stored.file, chunk_bytes).get(stored)
        dest = state[original]
        if copy.shape != dest.shape or not torch.equal(copy.to(dest.device, dest.dtype), dest):
            warnings.warn(
                f"{stored.name} is meant to be a copy of {_hf(original)} but differs from it; {_hf(original)} is used",
                stacklevel=3,
            )


def _hf(ours: str) -> str:
    return ours if ours == "lm_head.weight" else f"model.{ours}"


__all__ = ["DEFAULT_CHUNK_BYTES", "emit_notes", "materialise", "skeleton"]
