"""Checks of a configuration's fields: every value against its annotation, and YaRN's settings.

``ModelConfig`` calls ``check_types`` first thing, before any comparison of its fields: a string where an
integer belongs would otherwise end in ``'>' not supported between 'str' and 'int'`` deep inside
``validate``. A bool is not a number here (``True`` layers is a mistake), 96.0 is not the integer 96, and a
float is finite. ``ConfigError`` is the one error every check raises; its message names the field and the fix.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import fields
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot describe a working model. The message names the field and the fix."""


_WHAT = {"int": "an integer", "float": "a finite number", "bool": "True or False", "str": "a string",
         "dict": "a mapping (a JSON object)"}  # fmt: skip


def _annotation(hint: str) -> tuple[str, bool]:
    """``"int | None"`` -> ("int", True); ``"dict[str, Any] | None"`` -> ("dict", True)."""
    parts = [p.strip() for p in str(hint).split("|")]
    base = next(p for p in parts if p != "None")
    return base.split("[")[0], "None" in parts


def type_problem(value: Any, base: str) -> str | None:
    """Why ``value`` is not of type ``base`` (None when it is). A bool is not a number here: ``True`` for
    ``num_hidden_layers`` is a mistake, not one layer; 96.0 is not the integer 96."""
    if base == "int":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    elif base == "bool":
        ok = isinstance(value, bool)
    elif base == "str":
        ok = isinstance(value, str)
    elif base == "dict":
        ok = isinstance(value, dict)
    else:
        return None
    if ok:
        return None
    hint = ""
    if base == "int" and isinstance(value, float) and value.is_integer():
        hint = f"; write {int(value)}"
    elif base == "int" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        hint = f"; write {value.strip()} without quotes"
    elif base == "bool" and isinstance(value, (str, int)):
        hint = "; without quotes: true / false in JSON, True / False in Python"
    return f"must be {_WHAT[base]}, got {value!r} ({type(value).__name__}){hint}"


def check_types(config: Any) -> None:
    """Every field against its annotation, before any comparison: a string where an integer belongs
    would otherwise end in ``'>' not supported between 'str' and 'int'`` deep inside ``validate``.
    Integers and reals of other libraries (numpy) become plain ``int`` / ``float``."""
    for f in fields(config):
        value = getattr(config, f.name)
        base, optional = _annotation(f.type)
        if value is None and optional:
            continue
        problem = type_problem(value, base)
        if problem:
            raise ConfigError(f"{f.name} {problem}")
        if base == "int" and type(value) is not int:
            setattr(config, f.name, int(value))
        elif base == "float" and type(value) not in (int, float):
            setattr(config, f.name, float(value))


# rope_scaling keys that are numbers (YaRN's), and whether each must be an integer
_ROPE_NUMBERS = {"factor": False, "original_max_position_embeddings": True, "beta_fast": False,
                 "beta_slow": False, "mscale": False, "mscale_all_dim": False}  # fmt: skip


def check_rope_scaling(rs: dict[str, Any]) -> None:
    """YaRN settings: the type, a finite ``factor`` >= 1, a positive ``original_max_position_embeddings``."""
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; use {{'type': 'yarn', 'factor': ..., "
            f"'original_max_position_embeddings': ...}} or None"
        )
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            what = "scale" if key == "factor" else "context length before YaRN"
            raise ConfigError(f"rope_scaling needs {key!r} (YaRN's {what})")
    for key, integer in _ROPE_NUMBERS.items():
        if key in rs:
            problem = type_problem(rs[key], "int" if integer else "float")
            if problem:
                raise ConfigError(f"rope_scaling[{key!r}] {problem}")
    if rs["factor"] < 1:
        raise ConfigError(f"rope_scaling['factor'] must be >= 1, got {rs['factor']!r}")
    if rs["original_max_position_embeddings"] <= 0:
        raise ConfigError(
            "rope_scaling['original_max_position_embeddings'] (the context length before YaRN) must be positive, "
            f"got {rs['original_max_position_embeddings']!r}"
        )


__all__ = ["ConfigError", "check_rope_scaling", "check_types", "type_problem"]
