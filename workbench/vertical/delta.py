"""A vertical as a delta: only the tensors a method trained, applied onto the untouched base at load time.

A method that leaves the base untouched (everything but full fine-tuning, ``methods.py``) changes a few
known things: rows of some tensors (new experts and their router rows, ESFT's selected experts, the rows of
new tokens), whole adapter tensors (peft's ``lora_A`` / ``lora_B``), and, when it grew the MoE, the
shape of the expert tensors and the new experts' balancing biases. A delta folder holds exactly that:

* ``delta.safetensors``: for each trained tensor ``name``, its trained rows as ``name`` and their row
  indices as ``name@rows`` (whole tensors have no ``@rows``); for a grown model the routers' biases;
* ``delta.json``: the format, the *fingerprint* of the base it was trained on (SHA-256 of its config and
  every tensor), the structure to rebuild (``grow``: how many experts where, from which sources; ``lora``:
  rank, alpha, targets), the recipe, and the sizes.

``apply_delta(base, folder)`` refuses a base with another fingerprint (a delta's rows mean nothing on
other weights), copies the base, repeats the structure (grows the same slots, injects the same adapters),
then writes the stored rows in place: the result computes exactly what the trained model computed (the
tests compare logits bit for bit). The folder is written atomically: both files or none.

Where it simplifies: peft's own ``save_pretrained`` stores adapters only; ours stores adapters and rows
in one file because our methods mix them. A delta is not merged into the weights: merged deltas of two
verticals do not compose by summing (``gate.py`` switches them per request instead).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from workbench.io.files import MODEL_FOLDER_FILES, CheckpointError, load_tensors, read_json, write_folder_atomically
from workbench.model import Model
from workbench.vertical.methods import Prepared, grow_like, inject_lora

FORMAT = "workbench-delta/1"
DELTA_JSON, DELTA_FILE = "delta.json", "delta.safetensors"
ROWS = "@rows"
BIAS = "e_score_correction_bias"


def fingerprint(model: Model) -> str:
    """SHA-256 of a model's config and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def delta_tensors(prepared: Prepared) -> dict[str, torch.Tensor]:
    """The trained rows (and their indices) of a prepared model after training, plus grown routers' biases."""
    state = dict(prepared.model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for name, rows in prepared.masks.rows.items():
        t = state[name].detach().cpu()
        if bool(rows.all()):
            out[name] = t.clone()
        else:
            idx = rows.nonzero().flatten()
            out[name] = t[idx].clone()  # (R, ...) only the trained rows
            out[name + ROWS] = idx
    if prepared.structure.get("grow"):
        for name, t in state.items():
            if name.endswith(BIAS):
                out[name] = t.detach().cpu().clone()  # (E,) the woken new experts' biases
    return out


def save_delta(prepared: Prepared, folder: str | Path, base: Model, *, recipe: dict | None = None,
               overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Write the delta of a trained ``prepared`` model (trained from ``base``) to ``folder``; returns its
    JSON (with ``bytes``, the size of the tensor file)."""
    if prepared.structure == {"grow": None, "lora": None} and all(bool(r.all()) for r in prepared.masks.rows.values()):
        raise ValueError("this model was fully fine-tuned: it changed the base itself; save it as a model (save_hf)")
    tensors = delta_tensors(prepared)
    meta = {
        "format": FORMAT,
        "base_fingerprint": fingerprint(base),
        "structure": prepared.structure,
        "recipe": recipe or {},
        "trained_parameters": prepared.trained_parameters,
        "tensors": sorted(n for n in tensors if not n.endswith(ROWS)),
    }

    def fill(tmp: Path) -> None:
        from workbench.io.files import save_tensors

        save_tensors(tmp / DELTA_FILE, tensors)
        meta["bytes"] = (tmp / DELTA_FILE).stat().st_size
        (tmp / DELTA_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    write_folder_atomically(folder, fill, overwrite=overwrite, allowed=MODEL_FOLDER_FILES)
    return meta


def read_delta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / DELTA_JSON
    if not path.exists():
        raise CheckpointError(f"{path} not found: {folder} holds no delta (write one with save_delta or "
                              "`python -m workbench vertical --method ...`)")  # fmt: skip
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} delta (format {meta.get('format')!r})")
    return meta


def apply_delta(base: Model, folder: str | Path, *, check_base: bool = True) -> Model:
    """A copy of ``base`` with the delta in ``folder`` applied (the base itself is not changed)."""
    meta = read_delta(folder)
    if check_base:
        fp = fingerprint(base)
        if fp != meta["base_fingerprint"]:
            raise CheckpointError(
                f"{folder} was trained on another base (fingerprint {meta['base_fingerprint'][:12]}..., this base is "
                f"{fp[:12]}...): its rows mean nothing on other weights. Load the base it names, or retrain the delta"
            )
    tensors = load_tensors(Path(folder) / DELTA_FILE)
    model = copy.deepcopy(base)
    structure = meta["structure"]
    if structure.get("grow"):
        grow_like(model, structure)
    if structure.get("lora"):
        model = inject_lora(model, structure)
    state = model.state_dict(keep_vars=True)
    missing = [n for n in tensors if not n.endswith(ROWS) and n not in state]
    if missing:
        raise CheckpointError(
            f"{folder}: tensors {missing[:3]} do not exist in the rebuilt model; the delta is corrupt"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            if name.endswith(ROWS):
                continue
            target = state[name]
            if name + ROWS in tensors:
                idx = tensors[name + ROWS].to(target.device)
                if value.shape[1:] != target.shape[1:] or int(idx.max()) >= target.shape[0]:
                    raise CheckpointError(f"{folder}: rows of {name} do not fit {tuple(target.shape)}")
                target.index_copy_(0, idx, value.to(target.device, target.dtype))
            else:
                if value.shape != target.shape:
                    raise CheckpointError(
                        f"{folder}: {name} is {tuple(value.shape)}, the model's {tuple(target.shape)}"
                    )
                target.copy_(value.to(target.device, target.dtype))
    model.requires_grad_(False)
    return model


__all__ = ["FORMAT", "apply_delta", "delta_tensors", "fingerprint", "read_delta", "save_delta"]
