"""Command-line flags made from the config dataclasses, and the one ``--set FIELD=VALUE`` parser.

Every setting of a run lives in one dataclass field (``TrainConfig.lr``, ``GRPOConfig.group_size``,
``ModelConfig.n_routed_experts``); the comment beside the field is its documentation. So the flags are
derived, not written again: ``add_config_flags(parser, TrainConfig)`` adds ``--lr``, ``--group-size``,
... with the field's type, its default and its comment as the help, and ``config_from_args`` builds the
dataclass from the flags the user gave (the dataclass supplies the rest and validates everything).

``--set FIELD=VALUE`` changes a field of ``ModelConfig`` (or of another dataclass); the value is typed
by the field's annotation, the same way in every command: ``--set fp8=true`` and ``--set fp8=True`` are
both the boolean True; ``--set q_lora_rank=none`` is None; a misspelled field is refused with the
closest name.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import tokenize
from typing import Any

from workbench.config import ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """The comment on each field's line in the source of ``cls`` and its bases (the field's documentation)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.lineno in comments:
                docs[node.target.id] = comments[node.lineno]
    return docs


def _kind(cls: type, name: str) -> tuple[str, bool]:
    """(base type name, whether None is allowed) of a field, from its annotation."""
    hint = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    text = str(hint).replace("typing.", "")
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    base = next((p for p in parts if p != "None"), "str")
    return base.split("[")[0], optional


def coerce(cls: type | None, name: str, raw: str) -> Any:
    """The value of ``raw`` for field ``name`` of ``cls``, typed by its annotation (untyped without ``cls``)."""
    if cls is None:
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    base, optional = _kind(cls, name)
    text = raw.strip()
    bad_float = False
    where = f"{name}={raw!r}"
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if base == "int":
            return int(text)
        if base == "float":
            value = float(text)
            if math.isfinite(value):
                return value
            bad_float = True
        if base == "dict":
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except ValueError:
        expected = {"bool": "true or false", "int": "an integer", "float": "a number", "dict": "a JSON object"}[base]
        raise ConfigError(f"{where}: {name} must be {expected}" + (" or none" if optional else "")) from None
    if base == "float" and bad_float:
        raise ConfigError(f"{where}: {name} must be a finite number")
    return raw


def parse_sets(items: list[str] | None, cls: type | None = None) -> dict[str, Any]:
    """``["n_group=4", "fp8=true"]`` -> ``{"n_group": 4, "fp8": True}``, typed and checked against ``cls``."""
    out: dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(cls)] if cls is not None else None
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if names is not None and key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; fields are: {', '.join(sorted(names))}"
            raise ConfigError(f"--set: unknown config field {key!r} of {cls.__name__}{hint}")
        if key in out:
            raise ConfigError(f"--set {key} is given twice")
        out[key] = coerce(cls, key, raw)
    return out


def _flag_type(cls: type, name: str):
    def parse(raw: str) -> Any:
        try:
            return coerce(cls, name, raw)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = _kind(cls, name)[0]  # argparse names the type in its error message
    return parse


def int_at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum`` (``--n-examples 0`` is refused at the flag, by name)."""

    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {raw!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {raw!r}")
        return value

    parse.__name__ = "int"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_number(raw: str) -> float:
    """An argparse ``type``: a finite float (``nan`` and ``inf`` are refused at the flag, by name)."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {raw!r}")
    return value


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    title: str | None = None,
) -> list[str]:
    """Add ``--field-name`` for the fields of ``cls`` (bools as ``--x / --no-x``); returns the field names.

    Flags default to None, so ``config_from_args`` passes on only what the user gave."""
    docs = field_help(cls)
    group = parser.add_argument_group(title) if title else parser
    added = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "none" if default is None else default
        help_text = f"{docs.get(f.name, f.name.replace('_', ' '))} (default: {shown})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if _kind(cls, f.name)[0] == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = f.name.upper()
            group.add_argument(flag, dest=f.name, type=_flag_type(cls, f.name), default=None, metavar=metavar,
                               help=help_text)  # fmt: skip
        added.append(f.name)
    return added


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that the user gave as flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def config_from_args(cls: type, args: argparse.Namespace, **fixed: Any):
    """``cls(**the fields the user gave, **fixed)``: the dataclass's defaults and validation do the rest."""
    given = {k: v for k, v in given_fields(cls, args).items() if k not in fixed}
    return cls(**given, **fixed)


__all__ = [
    "add_config_flags",
    "coerce",
    "config_from_args",
    "field_help",
    "finite_number",
    "given_fields",
    "int_at_least",
    "non_negative_int",
    "parse_sets",
    "positive_int",
]
