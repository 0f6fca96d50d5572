"""The load plan: what each stored tensor of a checkpoint becomes, every problem found, nothing allocated.

Loading a checkpoint is two steps. ``plan_load`` is the first, and it is pure: it reads ``config.json``,
the shard index and the safetensors *headers* (names, shapes, dtypes; no tensor data), and decides

* the model config (``ModelConfig.from_hf`` plus overrides; every field honoured or refused),
* for every tensor of our model (a ``Target``), the stored tensors that fill it (its ``Part`` s: one
  tensor, one row per routed expert, or half of transformers' fused ``gate_up_proj``), their FP8 block
  scales, and the dtype it will have,
* which stored tensors are copies to check (the MTP layers' embedding and head) or skipped (MTP modules
  the config drops), and which targets start from a fresh initialisation (MTP modules a transformers
  folder lacks, when asked to keep them; missing tensors with ``strict=False``),
* how many bytes the model will take, checked against the memory free on the device,
* the folder's tokenizer (small, read here so that a broken one fails before any weight is read).

Every problem is collected and reported at once in one ``CheckpointError``: a missing or unreadable
shard, an index naming a file outside the folder (``..``, an absolute path, a link out of it), a
truncated shard, a tensor stored twice, missing / unexpected / wrongly shaped tensors (by name, with
both shapes), integer or boolean weights, FP8 weights without their scales, an unimplemented config
field. Nothing is allocated until the plan is whole; ``workbench.io.stream`` then applies it.

Transformers' ``save_pretrained`` drops the MTP layer while ``config.json`` keeps
``num_nextn_predict_layers: 1``. Such a folder loads by default: the MTP modules are dropped (the config
says 0) with one warning; ``missing_mtp="init"`` keeps them freshly initialised, ``"error"`` refuses.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from workbench.config import ConfigError, ModelConfig
from workbench.io.files import CheckpointError, read_json
from workbench.io.fp8_layout import WEIGHT_BLOCK, check_quantization_config
from workbench.io.names import BIAS, PROJS, HFNames
from workbench.io.tokenizer import load_tokenizer_files
from workbench.model import Model
from workbench.model.accounting import check_fits, format_bytes

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MISSING_MTP = ("drop", "init", "error")

# safetensors dtype names -> torch
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
          "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """One tensor as a safetensors header describes it."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: BF16, F32, F8_E4M3, ...

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _SIZES.get(self.dtype, 1)


@dataclass(frozen=True)
class Part:
    """A stored tensor that fills (part of) a target."""

    stored: Stored
    scale: Stored | None = None  # FP8: its float32 *_scale_inv
    index: int | None = None  # the row of a stacked target it fills (an expert); None: the whole target
    half: int | None = None  # fused gate_up_proj: 0 its gate rows, 1 its up rows; None: all of it


@dataclass
class Target:
    """One tensor of our model and where it comes from."""

    name: str  # our state-dict name
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: list[Part] = field(default_factory=list)
    fresh: bool = False  # starts from a fresh initialisation (not in the file)
    zeros: bool = False  # not in the file and zero by definition (a V2 router's absent balancing bias)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class LoadPlan:
    """Everything ``plan_load`` decided; ``workbench.io.stream.materialise`` applies it."""

    folder: Path
    hf_config: dict[str, Any]
    config: ModelConfig
    dtype: torch.dtype  # the parameters' dtype (buffers keep theirs: the router bias stays float32)
    block: tuple[int, int]  # FP8 weight block
    files: list[Path]
    targets: dict[str, Target]
    copies: list[tuple[Stored, str]]  # (a stored copy, our name of the tensor it must equal)
    skipped: list[str]  # stored tensors deliberately not read (MTP modules the config drops)
    notes: list[tuple[type[Warning], str]]  # warnings to show when the plan is applied
    fp8_tensors: int = 0
    tokenizer: Any = None  # the folder's tokenizer (workbench.io.tokenizer.Tokenizer), or None

    @property
    def nbytes(self) -> int:
        """Bytes the model's tensors take (tied tensors once; rope tables and masks not included)."""
        return sum(t.nbytes for t in self.targets.values())

    def targets_under(self, prefix: str) -> list[Target]:
        """The targets of one module (``layers.3``, ``mtp.0``, ``embed_tokens``...)."""
        dotted = prefix + "."
        return [t for n, t in self.targets.items() if n.startswith(dotted) or n == prefix]

    def layer_bytes(self, prefix: str) -> int:
        return sum(t.nbytes for t in self.targets_under(prefix))

    def stored_bytes(self) -> int:
        seen = {p.stored.name: p.stored.nbytes for t in self.targets.values() for p in t.parts}
        return sum(seen.values())

    def describe(self) -> str:
        """A few lines for people: the model, its size, where it comes from and what was decided."""
        c = self.config
        dt = str(self.dtype).removeprefix("torch.")
        lines = [
            f"{self.folder}: {len(self.files)} file(s), {len(self.targets)} tensors, "
            f"{format_bytes(self.nbytes)} as {dt} ({format_bytes(self.stored_bytes())} stored)",
            f"  {c.num_hidden_layers} layers ({c.first_k_dense_replace} dense), {c.n_routed_experts} routed experts "
            f"(top-{c.num_experts_per_tok}, {c.topk_method}, {c.scoring_func}), {c.num_nextn_predict_layers} MTP",
        ]
        if self.fp8_tensors:
            lines.append(
                f"  {self.fp8_tensors} FP8 tensors, dequantised block by block ({self.block[0]}x{self.block[1]})"
            )
        fresh = [t.name for t in self.targets.values() if t.fresh]
        if fresh:
            lines.append(f"  {len(fresh)} tensors start fresh")
        if self.skipped:
            lines.append(f"  {len(self.skipped)} stored tensors skipped")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a checkpoint folder."""
    path = Path(folder) / CONFIG_NAME
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def checkpoint_files(folder: Path, problems: list[str]) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint (the single file, or the shards its index lists) and the
    index's weight map. Index entries that leave the folder or name missing files are problems."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return [single], None
    if not index.exists():
        raise CheckpointError(f"{folder} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' (tensor name -> file)")
    root = folder.resolve()
    files: list[Path] = []
    for filename in dict.fromkeys(weight_map.values()):
        if not isinstance(filename, str) or not filename:
            problems.append(f"{index} maps a tensor to {filename!r}, which is not a file name")
            continue
        rel = Path(filename)
        if rel.is_absolute() or ".." in rel.parts:
            problems.append(f"{index} names {filename!r}, which is outside the checkpoint folder")
            continue
        if not filename.endswith(".safetensors"):
            problems.append(f"{index} names {filename!r}; checkpoints are read from .safetensors files only")
            continue
        file = folder / rel
        try:
            inside = file.resolve().is_relative_to(root)
        except OSError:
            inside = False
        if not inside:
            problems.append(f"{index} names {filename!r}, which leads outside the checkpoint folder")
        elif not file.is_file():
            problems.append(f"{index} lists {filename}, which is missing from {folder}")
        else:
            files.append(file)
    return files, {str(k): str(v) for k, v in weight_map.items()}


def read_headers(files: Iterable[Path], problems: list[str]) -> dict[str, Stored]:
    """Every tensor's shape and dtype from the safetensors headers (no tensor data is read)."""
    found: dict[str, Stored] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    s = f.get_slice(name)
                    if name in found:
                        problems.append(f"tensor {name} is stored twice: in {found[name].file.name} and {file.name}")
                        continue
                    found[name] = Stored(name, file, tuple(int(d) for d in s.get_shape()), s.get_dtype())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            problems.append(f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt")
    return found


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
def plan_load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    missing_mtp: str = "drop",
    allow_bad_weights: bool = False,
    check_memory: bool = True,
    **overrides: Any,
) -> LoadPlan:
    """Plan the load of a Hugging Face checkpoint folder (ours, DeepSeek's or transformers'): see the module
    docstring. Raises ``CheckpointError`` listing every problem; allocates nothing.

    dtype: the parameters' dtype (default: the stored embedding's; FP8 weights are dequantised to it).
    strict: with ``False``, missing tensors start fresh and unexpected ones are skipped, each named in a
        warning (wrong shapes are always an error).
    missing_mtp: what to do when config.json declares MTP layers the files do not hold (transformers'
        ``save_pretrained`` writes none): ``"drop"`` them (the default), ``"init"`` them fresh, or ``"error"``.
    allow_bad_weights: load integer or boolean weights (cast) and, at apply time, NaN/inf values, with a
        warning naming them, instead of refusing.
    check_memory: refuse a model bigger than the memory free on ``device`` (``LayeredModel`` checks its own
        smaller need instead).
    overrides: config fields to change, e.g. ``num_nextn_predict_layers=0``.
    """
    if missing_mtp not in MISSING_MTP:
        raise ValueError(f"missing_mtp must be one of {', '.join(MISSING_MTP)}, got {missing_mtp!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder}")
    hf_config = read_hf_config(folder)
    block = WEIGHT_BLOCK
    if hf_config.get("quantization_config"):
        try:
            block = check_quantization_config(hf_config["quantization_config"])
        except ValueError as e:
            raise CheckpointError(f"{folder / CONFIG_NAME}: {e}") from e
    notes: list[tuple[type[Warning], str]] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = ModelConfig.from_hf(hf_config, **overrides)
        notes += [(w.category, str(w.message)) for w in caught]
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME} does not describe a model this workbench can run: {e}") from e

    problems: list[str] = []
    files, weight_map = checkpoint_files(folder, problems)
    found = read_headers(files, problems)
    if weight_map is not None:
        listed_elsewhere = [
            f"{n} (the index says {weight_map[n]}, found in {s.file.name})"
            for n, s in found.items()
            if n in weight_map and weight_map[n] != s.file.name
        ]
        absent = [f"{n} (in {f})" for n, f in weight_map.items() if n not in found and (folder / f) in files]
        if listed_elsewhere:
            problems.append(_listing("tensors the index places in another file", listed_elsewhere))
        if absent:
            problems.append(_listing("tensors the index lists but its file does not hold", absent))
    if problems:
        raise CheckpointError(f"checkpoint {folder} cannot be read:\n" + "\n".join(problems))

    # MTP modules: those the file declares and holds, and what to do when it holds none
    names = HFNames.of(config)
    L, declared = config.num_hidden_layers, config.num_nextn_predict_layers
    in_file = hf_config.get("num_nextn_predict_layers", hf_config.get("num_mtp_layers", 0)) or 0
    present = {i for n in found if (i := names.layer_index(n)) is not None and names.is_mtp_layer(i)}
    fresh_mtp = False
    if declared > 0 and not present & set(names.mtp_layers()):
        what = (
            f"{folder} holds no tensor of the MTP layers {_layer_list(names.mtp_layers())} although config.json "
            f"declares num_nextn_predict_layers={declared} (transformers' save_pretrained does not write them)"
        )
        if missing_mtp == "error":
            raise CheckpointError(
                f"{what}; pass missing_mtp='drop' to build the model without them or 'init' for fresh ones"
            )
        if missing_mtp == "drop":
            config = config.replace(num_nextn_predict_layers=0)
            names = HFNames.of(config)
            notes.append(
                (UserWarning, f"{what}: the model has no MTP modules (pass missing_mtp='init' to keep fresh ones)")
            )
        else:
            fresh_mtp = True
            notes.append((UserWarning, f"{what}: the MTP modules keep a fresh initialisation"))
    kept = config.num_nextn_predict_layers
    dropped_layers = set(range(L + kept, L + max(in_file, kept)))

    # What our model holds, with the dtypes it will have
    stored_embed = found.get("model.embed_tokens.weight")
    if dtype is None:
        dtype = DTYPES.get(stored_embed.dtype, torch.float32) if stored_embed is not None else torch.float32
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            dtype = torch.bfloat16
    with torch.device("meta"):
        skeleton = Model(config)
    params = {n for n, _ in skeleton.named_parameters()}
    targets: dict[str, Target] = {}
    for n, t in skeleton.state_dict(keep_vars=True).items():
        if config.tie_word_embeddings and n == "lm_head.weight":
            continue  # the embedding itself
        targets[n] = Target(n, tuple(t.shape), dtype if n in params else t.dtype)

    # Match every stored tensor to a target
    used: set[str] = set()
    unexpected: list[str] = []
    wrong: list[str] = []
    bad_dtype: list[str] = []
    scales = {n for n in found if names.is_scale(n)}
    copies_of = names.copies(max(in_file, kept))
    copies: list[tuple[Stored, str]] = []
    skipped: list[str] = []
    fp8 = 0

    def part_of(s: Stored, **where: Any) -> Part:
        nonlocal fp8
        if s.dtype not in DTYPES:
            bad_dtype.append(f"{s.name}: {s.dtype}")
        scale = found.get(names.scale_of(s.name))
        if s.dtype in FP8_DTYPES:
            fp8 += 1
            if scale is None:
                wrong.append(f"{s.name}: stored in {s.dtype} but {names.scale_of(s.name)} is missing")
            elif len(s.shape) < 2:
                wrong.append(f"{s.name}: FP8 tensors must be matrices (out, in) or stacks of them, got {s.shape}")
            else:
                expected = (*s.shape[:-2], *(-(-d // b) for d, b in zip(s.shape[-2:], block)))
                if scale.shape != expected:
                    wrong.append(f"{scale.name}: shape {scale.shape}, but {s.name} {s.shape} in blocks of "
                                 f"{block[0]}x{block[1]} needs {expected}")  # fmt: skip
                if scale.dtype not in ("F32", "BF16", "F16", "F64"):
                    wrong.append(f"{scale.name}: scales must be floating point (float32), got {scale.dtype}")
            used.add(names.scale_of(s.name))
        elif scale is not None:
            wrong.append(f"{scale.name}: a scale for {s.name}, which is {s.dtype}, not FP8")
            used.add(scale.name)
        used.add(s.name)
        return Part(s, scale if s.dtype in FP8_DTYPES else None, **where)

    for name, s in found.items():
        if name in scales:
            continue
        layer = names.layer_index(name)
        if layer is not None and layer in dropped_layers:
            skipped.append(name)
            used.add(name)
            used.add(names.scale_of(name))
            continue
        if name in copies_of:
            original = copies_of[name]
            our_original = "embed_tokens.weight" if original == "model.embed_tokens.weight" else "lm_head.weight"
            if s.shape != targets[our_original].shape:
                wrong.append(f"{name}: expected {_fmt(targets[our_original].shape)}, found {_fmt(s.shape)}")
            copies.append((s, our_original))
            used.add(name)
            continue
        expert = names.expert(name)
        fused = names.fused(name) if expert is None else None
        if expert is not None:
            target = targets.get(expert.stack)
            if target is None or not 0 <= expert.index < target.shape[0]:
                unexpected.append(name)
                continue
            if s.shape != target.shape[1:]:
                wrong.append(f"{name}: expected {_fmt(target.shape[1:])}, found {_fmt(s.shape)}")
            target.parts.append(part_of(s, index=expert.index))
        elif fused is not None:
            stacks = [f"{fused.experts}.{p}" for p in (PROJS[:2] if fused.kind == "gate_up_proj" else PROJS[2:])]
            if any(st not in targets for st in stacks):
                unexpected.append(name)
                continue
            first = targets[stacks[0]].shape
            expected = (first[0], 2 * first[1], first[2]) if fused.kind == "gate_up_proj" else first
            if s.shape != expected:
                wrong.append(f"{name}: expected {_fmt(expected)}, found {_fmt(s.shape)}")
                continue
            for half, st in enumerate(stacks):
                targets[st].parts.append(part_of(s, half=half if len(stacks) == 2 else None))
        else:
            try:
                ours = names.our_name(name)
            except CheckpointError:
                unexpected.append(name)
                continue
            target = targets.get(ours)
            if target is None:
                unexpected.append(name)
                continue
            if s.shape != target.shape:
                wrong.append(f"{name}: expected {_fmt(target.shape)}, found {_fmt(s.shape)}")
            target.parts.append(part_of(s))
    unexpected += [n for n in scales if n not in used]

    # What is missing, and what may be
    missing: list[str] = []
    for t in targets.values():
        stack = names.stacked(t.name)
        is_mtp = t.name.startswith("mtp.")
        if stack is not None:
            if any(p.index is None for p in t.parts):  # filled by a fused tensor
                continue
            have = {p.index for p in t.parts}
            lacking = [j for j in range(t.shape[0]) if j not in have]
            if lacking:
                if fresh_mtp and is_mtp:
                    t.fresh = True
                    continue
                all_names = names.expert_names(t.name, t.shape[0])
                missing += [all_names[j] for j in lacking]
                t.fresh = True
        elif not t.parts:
            if t.name.endswith(BIAS) and config.topk_method != "noaux_tc":
                t.zeros = True  # V2 checkpoints have no balancing bias: zero, which is V2's routing exactly
            elif fresh_mtp and is_mtp:
                t.fresh = True
            else:
                missing.append(names.hf_name(t.name))
                t.fresh = True

    listed = []
    if wrong:
        listed.append(_listing("tensors with the wrong shape", wrong))
    if bad_dtype and not allow_bad_weights:
        listed.append(
            _listing(
                "tensors in an integer or boolean dtype (weights must be floating point; "
                "allow_bad_weights=True casts them)",
                bad_dtype,
            )  # fmt: skip
        )
    if strict and missing:
        listed.append(_listing("missing tensors", missing))
    if strict and unexpected:
        listed.append(_listing("unexpected tensors", unexpected))
    if listed:
        raise CheckpointError(f"checkpoint {folder} does not fit the model:\n" + "\n".join(listed))
    if bad_dtype:
        notes.append((UserWarning, f"{folder}: casting integer or boolean tensors to {dtype}: {bad_dtype}"))
    if missing:
        notes.append((UserWarning, f"{folder}: missing tensors keep their fresh initialisation: {missing}"))
    if unexpected:
        notes.append((UserWarning, f"{folder}: ignoring unexpected tensors {unexpected}"))
    if skipped:
        layers = _layer_list(sorted(dropped_layers & present))
        notes.append(
            (UserWarning, f"{folder}: skipping the tensors of MTP layers {layers} (num_nextn_predict_layers={kept})")
        )
    try:
        tokenizer = load_tokenizer_files(folder)  # small, and read before any weight: a bad one fails first
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder}: {e}") from e
    plan = LoadPlan(folder, hf_config, config, dtype, block, files, targets, copies, skipped, notes, fp8, tokenizer)
    if check_memory:
        check_fits(config, device, dtype, need=plan.nbytes, what=f"the checkpoint {folder}")
    return plan


def _layer_list(layers: Iterable[int]) -> str:
    return ", ".join(f"model.layers.{i}" for i in layers)


def _fmt(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))


def _listing(title: str, items: list[str], limit: int = 50) -> str:
    lines = [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return f"{title} ({len(items)}):\n" + "\n".join(lines)


__all__ = ["DTYPES", "LoadPlan", "Part", "Stored", "Target", "checkpoint_files", "plan_load", "read_hf_config"]
