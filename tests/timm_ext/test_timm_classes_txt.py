"""classes.txt readers: a blank line or a repeated name is an error naming file:line, never an extra class."""

from __future__ import annotations

import pytest

from mhe_plugins.datasets.glyphs import read_classes
from timm_ext.export import read_class_names


def _write(tmp_path, text: str):
    path = tmp_path / "classes.txt"
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("a\nb\nc\n\n", r"classes\.txt:4: blank line"),  # a blank last line added a 4th class
        ("a\n\nb\nc\n", r"classes\.txt:2: blank line"),
        ("a\n  \nb\n", r"classes\.txt:2: blank line"),
        ("a\nb\na\n", r"classes\.txt:3: class name 'a' repeats line 1"),
        ("a\nb\rc\n", r"classes\.txt:2: carriage return"),
        ("a\n\ufeffb\n", r"classes\.txt:2: byte-order mark"),
    ],
)
def test_bad_classes_txt_is_an_error_naming_the_line(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=pattern):
        read_classes(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        read_class_names(path, 3)


@pytest.mark.parametrize("text", ["a\nb\nc\n", "a\nb\nc", "\ufeffa\r\nb\r\nc\r\n"])
def test_good_classes_txt(tmp_path, text):
    path = _write(tmp_path, text)
    assert read_classes(tmp_path) == ["a", "b", "c"]
    assert read_class_names(path, 3) == ["a", "b", "c"]


def test_class_names_may_be_any_character(tmp_path):
    # str.splitlines() also splits on \x1c, \x85, \u2028 ...: each such character is a valid glyph class
    names = ["\x1c", "\x85", "\u2028", "\u4e00"]
    _write(tmp_path, "".join(n + "\n" for n in names))
    assert read_classes(tmp_path) == names
