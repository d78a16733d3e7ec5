"""Real offline datasets shared by the adapters (glyph images: timm and face recognition)."""

from .glyphs import (
    FONT_PACKAGES,
    TEST_PACKAGES,
    GlyphDataset,
    build_glyph_dataset,
    charset_codepoints,
    load_glyph_split,
    read_classes,
    subset_glyph_dataset,
)

__all__ = [
    "FONT_PACKAGES",
    "TEST_PACKAGES",
    "GlyphDataset",
    "build_glyph_dataset",
    "charset_codepoints",
    "load_glyph_split",
    "read_classes",
    "subset_glyph_dataset",
]
