"""Your own text files as documents of one domain.

``load_text_files`` turns your own UTF-8 ``.txt`` files into documents of a single domain (``"user"``
by default), split at paragraph boundaries into chunks of about ``chunk_chars`` characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from workbench.data.document import Document


def _split_long_paragraph(paragraph: str, limit: int) -> list[str]:
    """Cut a paragraph longer than `limit` at the last line break, else space, before the limit."""
    pieces = []
    while len(paragraph) > limit:
        cut = paragraph.rfind("\n", 0, limit + 1)
        if cut <= 0:
            cut = paragraph.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit  # one very long word: cut it hard
        pieces.append(paragraph[:cut].rstrip())
        paragraph = paragraph[cut:].lstrip()
    if paragraph:
        pieces.append(paragraph)
    return pieces


def _chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Group paragraphs into chunks of at most about chunk_chars characters."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    pieces = [piece for p in paragraphs if p.strip() for piece in _split_long_paragraph(p, chunk_chars)]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        if current and size + 2 + len(piece) > chunk_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece) + (2 if size else 0)
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _expand_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
    return files


def load_text_files(
    paths: str | Path | Iterable[str | Path], domain: str = "user", chunk_chars: int = 2000
) -> list[Document]:
    """Read UTF-8 text files into documents of one domain, split at paragraphs near chunk_chars.

    `paths` is a file, a directory (meaning every ``*.txt`` file below it, recursively, in sorted
    order) or a list of those. Windows line endings become ``\\n`` and a UTF-8 byte-order mark is
    dropped. Paragraphs (separated by blank lines) are kept whole where they fit; a paragraph longer than
    chunk_chars is cut at a line break or space.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    files = _expand_paths(paths)
    docs = []
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{str(path)!r} is not valid UTF-8 ({err.reason} at byte {err.start}). Re-save it as UTF-8, "
                f"for example: iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt"
            ) from None
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        docs.extend(Document(domain=domain, text=chunk) for chunk in _chunk_text(text, chunk_chars))
    if not docs:
        where = ", ".join(str(p) for p in files) if files else "the given paths (no .txt files found)"
        raise ValueError(f"no text found in {where}")
    return docs
