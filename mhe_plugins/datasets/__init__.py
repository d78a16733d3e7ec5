"""Real offline datasets shared by the adapters (glyph images: timm and face recognition) and the line
rules of the text files users hand us (:mod:`.lines`). The glyph names load on first use, so reading a
text file does not import the image stack."""

__all__ = [
    "TEST_PACKAGES",
    "GlyphDataset",
    "build_glyph_dataset",
    "charset_codepoints",
    "load_glyph_split",
    "read_classes",
    "subset_glyph_dataset",
]


def __getattr__(name: str):
    if name in __all__:
        from . import glyphs

        return getattr(glyphs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
