"""A document: text and the name of the domain it belongs to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One document of text and the name of the domain it belongs to."""

    domain: str
    text: str
