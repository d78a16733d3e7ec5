"""Make the harness importable as the package ``crash`` (tests/ on sys.path), as ``run.py`` does."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
