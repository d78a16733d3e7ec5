"""``python -m timm_ext.stock PATH/TO/timm/train.py [timm args]``: run timm's own script with the MHE model
names registered (timm's train.py/validate.py live in the timm git repo, not in the wheel)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import timm_ext  # noqa: F401  (registers resnet50_mhp & co.)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not Path(argv[0]).is_file():
        raise SystemExit("usage: python -m timm_ext.stock PATH/TO/train.py|validate.py [timm arguments]")
    script = str(Path(argv[0]).resolve())
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
