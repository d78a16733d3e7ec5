"""Lines of the text files users hand us (class lists, XMC texts and labels), split one way everywhere.

Why: ``str.splitlines()`` and text-mode universal newlines also end a line at ``\\r``, ``\\v``, ``\\f``,
``\\x1c``-``\\x1e``, ``\\x85``, ``\\u2028`` and ``\\u2029``, so a stray character inside one document or class
name silently made two (and shifted every later line against its partner file). The rule here:

- only ``\\n`` ends a line; a ``\\r`` right before it is dropped (``\\r\\n`` files are fine);
- any other ``\\r`` is an error naming file:line (old Mac line endings or a stray CR: which was meant?);
- a byte-order mark at the very start of the file is dropped; anywhere else (two files concatenated) it is
  an error naming file:line, since left in place it glues itself to a token (a phantom label or class);
- the final ``\\n`` of a file does not start an extra empty line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "LineFormatError",
    "clean_line",
    "iter_clean_lines",
    "split_lines",
    "read_utf8",
    "read_name_list",
]

BOM = "\ufeff"


class LineFormatError(ValueError):
    """A text file breaks the line rules above; the message names the file, the line and the value."""


def clean_line(line: str, where: str, lineno: int, error: type[ValueError] = LineFormatError) -> str:
    """``line`` (as read, with or without its ``\\n``) checked and without ``\\n`` / ``\\r\\n``.

    ``lineno`` is 1-based; a BOM at the start of line 1 is dropped. ``error`` is the exception raised.
    """
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    if lineno == 1 and line.startswith(BOM):
        line = line[1:]
    if "\r" in line:
        col = line.index("\r") + 1
        raise error(
            f"{where}:{lineno}: carriage return at column {col} that does not end the line "
            f"({line[max(0, col - 30) : col + 30]!r}); only '\\n' or '\\r\\n' end a line"
        )
    if BOM in line:
        col = line.index(BOM) + 1
        raise error(
            f"{where}:{lineno}: byte-order mark U+FEFF at column {col} inside the file "
            f"({line[max(0, col - 30) : col + 30]!r}); were two files concatenated? Remove it"
        )
    return line


def iter_clean_lines(
    raw_lines: Iterable[str], where: str, error: type[ValueError] = LineFormatError
) -> Iterator[str]:
    """:func:`clean_line` over lines that end only at ``\\n`` (a file opened with ``newline="\\n"``)."""
    for lineno, line in enumerate(raw_lines, 1):
        yield clean_line(line, where, lineno, error)


def split_lines(text: str, where: str, error: type[ValueError] = LineFormatError) -> list[str]:
    """All lines of ``text`` by the rules above (no extra empty line after a final ``\\n``)."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return list(iter_clean_lines(parts, where, error))


def read_utf8(path: Path) -> str:
    """The file's text with every ``\r`` kept (``read_text`` would turn a stray one into a line break)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise LineFormatError(
            f"{path}:{lineno}: not UTF-8 text (bytes {data[exc.start : exc.end + 8]!r})"
        ) from exc


def read_name_list(path: str | Path, what: str = "class name") -> list[str]:
    """Names, one a line (line i = id i-1), of a ``classes.txt``-style file.

    An empty line (also the last line of a file ending in two newlines) or a repeated name is an error
    naming file:line: either would add or shift a class and move every later id silently. So is a line of
    several blanks; a single character is always a name (the glyph classes include the space character).
    """
    path = Path(path)
    names = split_lines(read_utf8(path), str(path))
    seen: dict[str, int] = {}
    for lineno, name in enumerate(names, 1):
        if not name or (len(name) > 1 and not name.strip()):  # " ", "\u3000", "\x1c": valid glyph names
            raise LineFormatError(
                f"{path}:{lineno}: blank line ({name!r}) in a list of {what}s; remove it "
                f"(every line is a {what}, line i is id i-1)"
            )
        if name in seen:
            raise LineFormatError(f"{path}:{lineno}: {what} {name!r} repeats line {seen[name]}")
        seen[name] = lineno
    return names
