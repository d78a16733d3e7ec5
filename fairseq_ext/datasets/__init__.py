"""Offline parallel corpora for the NMT benchmark (Debian DDTP + LibreOffice help/UI)."""

from .build import build

__all__ = ["build"]
