"""Your own text files as documents of one domain.

``load_text_files`` turns your own UTF-8 ``.txt`` files into documents of a single domain (``"user"``
by default), split at paragraph boundaries into chunks of about ``chunk_chars`` characters. Only
regular files are opened (a FIFO or a device named ``notes.txt`` is refused, never waited on), and at
most ``max_bytes`` are read in all; every scan of the text is linear in its length.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from workbench.data.document import Document

MAX_TEXT_BYTES = 1 << 30  # 1 GiB of text in all: far more than a small model trains on, far less than memory


def _split_long_paragraph(paragraph: str, limit: int) -> list[str]:
    """Cut a paragraph longer than `limit` at the last line break, else space, before the limit.

    Walks an index through the paragraph (no copy of the rest per piece), so a long paragraph costs
    linear time: slicing off the remainder each time made a 100 MB paragraph quadratic."""
    pieces = []
    start, n = 0, len(paragraph)
    while n - start > limit:
        cut = paragraph.rfind("\n", start, start + limit + 1)
        if cut <= start:
            cut = paragraph.rfind(" ", start, start + limit + 1)
        if cut <= start:
            cut = start + limit  # one very long word: cut it hard
        pieces.append(paragraph[start:cut].rstrip())
        start = cut
        while start < n and paragraph[start].isspace():
            start += 1
    if start < n:
        pieces.append(paragraph[start:])
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
    try:
        paths = list(paths)
    except TypeError:
        raise TypeError(f"paths must be a file, a folder or a list of them, got {paths!r}") from None
    files = []
    for raw in paths:
        if not isinstance(raw, (str, Path)):
            raise TypeError(f"paths must be file or folder names, got {raw!r}")
        path = Path(raw)
        if path.is_dir():  # every *.txt below it that is a regular file (links to devices and FIFOs are skipped)
            files.extend(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        elif path.exists() or path.is_symlink():
            files.append(path)  # checked to be a regular file when it is opened
        else:
            raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
    return files


def _read_regular_file(path: Path, budget: int) -> bytes:
    """The bytes of a regular file of at most ``budget`` bytes. Opened without blocking and checked on the
    open descriptor, so a FIFO, a device or a socket named like a text file is refused instead of waited on
    (or read forever, as ``/dev/zero`` would be)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {str(path)!r} (a link to nothing?)") from None
    except OSError as e:  # a socket, a permission
        raise ValueError(f"{str(path)!r} cannot be read as a text file ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{str(path)!r} is not a regular file (a FIFO, device or socket); give text files")
        if st.st_size > budget:
            raise ValueError(
                f"{str(path)!r} is {st.st_size:,} bytes, more than the {budget:,} bytes left of max_bytes; "
                "train on a sample of your text, or raise load_text_files(max_bytes=...)"
            )
        data = f.read(budget + 1)
    if len(data) > budget:  # it grew while we read
        raise ValueError(f"{str(path)!r} grew past the {budget:,} bytes left of max_bytes while it was read")
    return data


def load_text_files(
    paths: str | Path | Iterable[str | Path],
    domain: str = "user",
    chunk_chars: int = 2000,
    *,
    max_bytes: int | None = None,
) -> list[Document]:
    """Read UTF-8 text files into documents of one domain, split at paragraphs near chunk_chars.

    `paths` is a file, a directory (meaning every ``*.txt`` file below it, recursively, in sorted
    order) or a list of those. Windows line endings become ``\\n`` and a UTF-8 byte-order mark is
    dropped. Paragraphs (separated by blank lines) are kept whole where they fit; a paragraph longer than
    chunk_chars is cut at a line break or space. Only regular files are read, at most ``max_bytes`` in
    all (the whole text is tokenized in memory; default ``MAX_TEXT_BYTES``).
    """
    max_bytes = MAX_TEXT_BYTES if max_bytes is None else max_bytes
    for name, value in (("chunk_chars", chunk_chars), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain must be a non-empty string, got {domain!r}")
    files = _expand_paths(paths)
    docs = []
    budget = max_bytes
    for path in files:
        data = _read_regular_file(path, budget)
        budget -= len(data)
        try:
            text = data.decode("utf-8")
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
