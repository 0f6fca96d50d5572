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

from workbench.config import ConfigError, ModelConfig
from workbench.io.files import CheckpointError
from workbench.io.fp8_layout import WEIGHT_BLOCK, check_quantization_config
from workbench.io.headers import (
    CONFIG_NAME,
    DTYPES,
    FP8_DTYPES,
    INDEX_NAME,
    WEIGHTS_NAME,
    Stored,
    checkpoint_files,
    listing,
    read_files,
    read_hf_config,
)
from workbench.io.names import BIAS, PROJS, HFNames
from workbench.io.tokenizer import load_tokenizer_files
from workbench.model import Model
from workbench.model.accounting import check_fits, format_bytes

MISSING_MTP = ("drop", "init", "error")


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
    hf_config, block, config, notes = _read_config(folder, overrides)
    files, found = read_files(folder)
    config, mtp = _decide_mtp(folder, hf_config, config, found, missing_mtp, notes)
    if dtype is None:  # the stored embedding's (an FP8 file keeps it in bf16)
        stored = found.get("model.embed_tokens.weight")
        dtype = DTYPES.get(stored.dtype, torch.float32) if stored is not None else torch.float32
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            dtype = torch.bfloat16
    targets = _targets(config, dtype)
    match = _Matcher(HFNames.of(config), targets, found, block, mtp)
    match.run()
    missing = match.missing(config, mtp)

    listed = []
    if match.wrong:
        listed.append(listing("tensors with the wrong shape", match.wrong))
    if match.bad_dtype and not allow_bad_weights:
        what = (
            "tensors in an integer or boolean dtype (weights must be floating point; allow_bad_weights=True casts them)"
        )
        listed.append(listing(what, match.bad_dtype))
    if strict and missing:
        listed.append(listing("missing tensors", missing))
    if strict and match.unexpected:
        listed.append(listing("unexpected tensors", match.unexpected))
    if listed:
        raise CheckpointError(f"checkpoint {folder} does not fit the model:\n" + "\n".join(listed))
    for items, text in (
        (match.bad_dtype, f"casting integer or boolean tensors to {dtype}"),
        (missing, "missing tensors keep their fresh initialisation"),
        (match.unexpected, "ignoring unexpected tensors"),
    ):
        if items:
            notes.append((UserWarning, f"{folder}: {text}: {items}"))
    if match.skipped:
        layers = _layer_list(sorted(mtp.dropped & mtp.present))
        kept = config.num_nextn_predict_layers
        notes.append(
            (UserWarning, f"{folder}: skipping the tensors of MTP layers {layers} (num_nextn_predict_layers={kept})")
        )
    try:
        tokenizer = load_tokenizer_files(folder)  # small, and read before any weight: a bad one fails first
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder}: {e}") from e
    plan = LoadPlan(folder, hf_config, config, dtype, block, files, targets, match.copies, match.skipped, notes,
                    match.fp8, tokenizer)  # fmt: skip
    if check_memory:
        check_fits(config, device, dtype, need=plan.nbytes, what=f"the checkpoint {folder}")
    return plan


def _read_config(folder: Path, overrides: dict[str, Any]):
    """config.json: the raw dict, the FP8 block size, our config and the notes from_hf had."""
    hf_config = read_hf_config(folder)
    block = WEIGHT_BLOCK
    if hf_config.get("quantization_config"):
        try:
            block = check_quantization_config(hf_config["quantization_config"])
        except ValueError as e:
            raise CheckpointError(f"{folder / CONFIG_NAME}: {e}") from e
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = ModelConfig.from_hf(hf_config, **overrides)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME} does not describe a model this workbench can run: {e}") from e
    return hf_config, block, config, [(w.category, str(w.message)) for w in caught]


@dataclass
class _MTP:
    """What happens to the MTP layers: those the files hold, those skipped, whether fresh ones are made."""

    present: set[int]  # file layer indices >= num_hidden_layers that hold tensors
    dropped: set[int]  # file layer indices whose tensors are skipped
    in_file: int  # MTP layers config.json declares
    fresh: bool  # MTP modules start from a fresh initialisation


def _decide_mtp(folder, hf_config, config: ModelConfig, found, missing_mtp: str, notes) -> tuple[ModelConfig, _MTP]:
    names = HFNames.of(config)
    declared = config.num_nextn_predict_layers
    in_file = hf_config.get("num_nextn_predict_layers", hf_config.get("num_mtp_layers", 0)) or 0
    present = {i for n in found if (i := names.layer_index(n)) is not None and names.is_mtp_layer(i)}
    fresh = False
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
            notes.append(
                (UserWarning, f"{what}: the model has no MTP modules (pass missing_mtp='init' to keep fresh ones)")
            )
        else:
            fresh = True
            notes.append((UserWarning, f"{what}: the MTP modules keep a fresh initialisation"))
    L, kept = config.num_hidden_layers, config.num_nextn_predict_layers
    return config, _MTP(present, set(range(L + kept, L + max(in_file, kept))), max(in_file, kept), fresh)


def _targets(config: ModelConfig, dtype: torch.dtype) -> dict[str, Target]:
    """Every tensor our model holds (from a meta-device skeleton), parameters in ``dtype``, buffers in theirs."""
    with torch.device("meta"):
        skeleton = Model(config)
    params = {n for n, _ in skeleton.named_parameters()}
    targets: dict[str, Target] = {}
    for n, t in skeleton.state_dict(keep_vars=True).items():
        if config.tie_word_embeddings and n == "lm_head.weight":
            continue  # the embedding itself
        targets[n] = Target(n, tuple(t.shape), dtype if n in params else t.dtype)
    return targets


class _Matcher:
    """Assigns every stored tensor to its target (or to the copies, the skipped, the unexpected) and collects
    what is wrong with it."""

    def __init__(self, names: HFNames, targets, found, block, mtp: _MTP) -> None:
        self.names, self.targets, self.found, self.block, self.mtp = names, targets, found, block, mtp
        self.used: set[str] = set()
        self.unexpected: list[str] = []
        self.wrong: list[str] = []
        self.bad_dtype: list[str] = []
        self.copies: list[tuple[Stored, str]] = []
        self.skipped: list[str] = []
        self.fp8 = 0

    def part(self, s: Stored, **where: Any) -> Part:
        """A stored tensor as a part of its target, its dtype and FP8 scale checked."""
        names, block = self.names, self.block
        if s.dtype not in DTYPES:
            self.bad_dtype.append(f"{s.name}: {s.dtype}")
        scale = self.found.get(names.scale_of(s.name))
        if s.dtype in FP8_DTYPES:
            self.fp8 += 1
            if scale is None:
                self.wrong.append(f"{s.name}: stored in {s.dtype} but {names.scale_of(s.name)} is missing")
            elif len(s.shape) < 2:
                self.wrong.append(f"{s.name}: FP8 tensors must be matrices (out, in) or stacks of them, got {s.shape}")
            else:
                expected = (*s.shape[:-2], *(-(-d // b) for d, b in zip(s.shape[-2:], block)))
                if scale.shape != expected:
                    self.wrong.append(f"{scale.name}: shape {scale.shape}, but {s.name} {s.shape} in blocks of "
                                      f"{block[0]}x{block[1]} needs {expected}")  # fmt: skip
                if scale.dtype not in ("F32", "BF16", "F16", "F64"):
                    self.wrong.append(f"{scale.name}: scales must be floating point (float32), got {scale.dtype}")
            self.used.add(names.scale_of(s.name))
        elif scale is not None:
            self.wrong.append(f"{scale.name}: a scale for {s.name}, which is {s.dtype}, not FP8")
            self.used.add(scale.name)
        self.used.add(s.name)
        return Part(s, scale if s.dtype in FP8_DTYPES else None, **where)

    def check_shape(self, s: Stored, expected: tuple[int, ...]) -> bool:
        if s.shape != tuple(expected):
            self.wrong.append(f"{s.name}: expected {_fmt(expected)}, found {_fmt(s.shape)}")
            return False
        return True

    def run(self) -> None:
        names, targets = self.names, self.targets
        copies_of = names.copies(self.mtp.in_file)
        scales = {n for n in self.found if names.is_scale(n)}
        for name, s in self.found.items():
            if name in scales:
                continue
            layer = names.layer_index(name)
            if layer is not None and layer in self.mtp.dropped:
                self.skipped.append(name)
                self.used.update((name, names.scale_of(name)))
                continue
            if name in copies_of:
                original = "embed_tokens.weight" if copies_of[name] == "model.embed_tokens.weight" else "lm_head.weight"
                self.check_shape(s, targets[original].shape)
                self.copies.append((s, original))
                self.used.add(name)
                continue
            expert, fused = names.expert(name), names.fused(name)
            if expert is not None:
                target = targets.get(expert.stack)
                if target is None or not 0 <= expert.index < target.shape[0]:
                    self.unexpected.append(name)
                    continue
                self.check_shape(s, target.shape[1:])
                target.parts.append(self.part(s, index=expert.index))
            elif fused is not None:
                stacks = [f"{fused.experts}.{p}" for p in (PROJS[:2] if fused.kind == "gate_up_proj" else PROJS[2:])]
                if any(st not in targets for st in stacks):
                    self.unexpected.append(name)
                    continue
                first = targets[stacks[0]].shape  # (E, I, D) or (E, D, I)
                if self.check_shape(s, (first[0], 2 * first[1], first[2]) if len(stacks) == 2 else first):
                    for half, st in enumerate(stacks):
                        targets[st].parts.append(self.part(s, half=half if len(stacks) == 2 else None))
            else:
                try:
                    target = targets.get(names.our_name(name))
                except CheckpointError:
                    target = None
                if target is None:
                    self.unexpected.append(name)
                    continue
                self.check_shape(s, target.shape)
                target.parts.append(self.part(s))
        self.unexpected += [n for n in scales if n not in self.used]

    def missing(self, config: ModelConfig, mtp: _MTP) -> list[str]:
        """The file names of what no stored tensor fills; marks those targets fresh (or zero: a V2 router's
        bias, which V2 checkpoints do not have and which is zero in V2's routing)."""
        missing: list[str] = []
        for t in self.targets.values():
            fresh_ok = mtp.fresh and t.name.startswith("mtp.")
            if self.names.stacked(t.name) is not None:
                if any(p.index is None for p in t.parts):  # filled by a fused tensor
                    continue
                have = {p.index for p in t.parts}
                lacking = [j for j in range(t.shape[0]) if j not in have]
                if lacking:
                    t.fresh = True
                    if not fresh_ok:
                        every = self.names.expert_names(t.name, t.shape[0])
                        missing += [every[j] for j in lacking]
            elif not t.parts:
                if t.name.endswith(BIAS) and config.topk_method != "noaux_tc":
                    t.zeros = True
                else:
                    t.fresh = True
                    if not fresh_ok:
                        missing.append(self.names.hf_name(t.name))
        return missing


def _layer_list(layers: Iterable[int]) -> str:
    return ", ".join(f"model.layers.{i}" for i in layers)


def _fmt(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))


__all__ = [
    "CONFIG_NAME",
    "DTYPES",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "LoadPlan",
    "Part",
    "Stored",
    "Target",
    "checkpoint_files",
    "plan_load",
    "read_hf_config",
]
