"""LibreOffice help pages (aligned by page path + paragraph id) and UI catalogs (gettext msgid -> msgstr).

The help packages ship the same HTML tree per language and every paragraph keeps its ``par_id``/``hd_id``
across languages, so (relative path, id) is an exact alignment key. Hidden platform variants are dropped
except the ``default`` one (the browser shows exactly one of them).
"""

from __future__ import annotations

import gettext
import html
import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

_BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
_ID = re.compile(r"(?:par|hd)_id")


class _HelpParser(HTMLParser):
    """Collects the visible text of every ``<p|h*> id="par_id…|hd_id…"`` element of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paras: dict[str, str] = {}
        self._stack: list[tuple[str, bool]] = []  # (tag, hidden) for open elements inside a block
        self._block: tuple[str, str] | None = None  # (tag, id)
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self._block is None:
            if tag in _BLOCKS and _ID.match(a.get("id") or ""):
                self._block, self._buf, self._stack = (tag, a["id"] or ""), [], []
            return
        if tag in ("br", "img", "input", "meta", "link"):
            return
        hidden = "hidden" in a and not (a.get("id") or "").startswith("default")
        self._stack.append((tag, hidden))

    def handle_endtag(self, tag: str) -> None:
        if self._block is None:
            return
        if tag == self._block[0] and not any(t == tag for t, _ in self._stack):
            text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
            if text:
                self.paras.setdefault(self._block[1], text)
            self._block = None
            return
        while self._stack:  # tolerate unclosed inner tags
            t, _ = self._stack.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._block is not None and not any(h for _, h in self._stack):
            self._buf.append(data)


def parse_help_page(text: str) -> dict[str, str]:
    """Paragraph id -> visible text of one help page."""
    p = _HelpParser()
    p.feed(text)
    p.close()
    return p.paras


def help_root(extracted: str | os.PathLike, lang: str) -> Path:
    """``usr/share/libreoffice/help/<lang>`` inside a ``dpkg -x`` tree (lang ``en-US``, ``de``...)."""
    root = Path(extracted) / "usr/share/libreoffice/help" / lang
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not found; extract the package with dpkg -x PKG.deb DIR")
    return root


def help_pairs(src_root: str | os.PathLike, tgt_root: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Sentence pairs from two help trees, aligned by (relative page path, paragraph id)."""
    src_root, tgt_root = Path(src_root), Path(tgt_root)
    for page in sorted(src_root.rglob("*.html")):
        other = tgt_root / page.relative_to(src_root)
        if not other.is_file():
            continue
        s = parse_help_page(page.read_text(encoding="utf-8", errors="replace"))
        t = parse_help_page(other.read_text(encoding="utf-8", errors="replace"))
        for pid in sorted(s.keys() & t.keys()):
            a, b = html.unescape(s[pid]), html.unescape(t[pid])
            if a != b:
                yield a, b


def _ui_text(s: str) -> str:
    """Drop keyboard-mnemonic markers (``~Open``, ``C_onnect``) and normalise whitespace."""
    return re.sub(r"\s+", " ", re.sub(r"_(?=\w)", "", s.replace("~", ""))).strip()


def ui_pairs(extracted_l10n: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(English msgid, translation) from every gettext catalog of a ``libreoffice-l10n-xx`` tree."""
    mos = sorted(Path(extracted_l10n).rglob("*.mo"))
    if not mos:
        raise FileNotFoundError(
            f"{extracted_l10n}: no .mo catalogs; extract libreoffice-l10n-xx with dpkg -x"
        )
    for mo in mos:
        with open(mo, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # stdlib parser; msgid -> msgstr
        for key, value in sorted(catalog.items(), key=lambda kv: str(kv[0])):
            if not isinstance(key, str) or not key or not value:  # plural entries are tuple keys; "" = header
                continue
            msgid = key.split("\x04", 1)[-1]  # drop msgctxt
            a, b = _ui_text(msgid), _ui_text(value)
            if a and b and a != b:
                yield a, b
