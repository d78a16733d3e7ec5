"""``python -m timm_ext.glyph_builder [--fonts-dir DIR]``: fetch the Debian CJK font packages the glyph set is
rendered from (``apt-get download`` + ``dpkg -x``), once, into a per-user font cache.

Why here and not in the core: fetching needs system tools (apt-get, dpkg) and a place on this machine to
keep 184 MB of fonts; the core's glyph module only renders and reads (:mod:`mhe_plugins.datasets.glyphs`).
The cache is ``$MHE_FONTS_DIR`` when set, else ``$XDG_CACHE_HOME/mhe-plugins/fonts``, else
``~/.cache/mhe-plugins/fonts``; each package is unpacked as ``<cache>/<package>/usr/share/fonts/...``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: Debian packages rendered by default (issue 4); all "free" CJK fonts of Debian bookworm.
FONT_PACKAGES: tuple[str, ...] = (
    "fonts-noto-cjk",
    "fonts-wqy-zenhei",
    "fonts-wqy-microhei",
    "fonts-arphic-ukai",
    "fonts-arphic-uming",
    "fonts-droid-fallback",
    "fonts-babelstone-han",
    "fonts-hanazono",
    "fonts-ipamj-mincho",
    "fonts-cwtex-ming",
    "fonts-cwtex-kai",
    "fonts-cwtex-heib",
    "fonts-cwtex-yen",
    "fonts-cwtex-fs",
    "fonts-seto",
    "fonts-ipaexfont-gothic",
    "fonts-ipaexfont-mincho",
)

__all__ = ["FONT_PACKAGES", "default_fonts_dir", "ensure_fonts", "main"]


def default_fonts_dir(environ: dict[str, str] | None = None) -> Path:
    """The user's font cache: ``$MHE_FONTS_DIR``, else ``$XDG_CACHE_HOME/mhe-plugins/fonts``, else
    ``~/.cache/mhe-plugins/fonts`` (never a fixed machine path)."""
    env = os.environ if environ is None else environ
    if env.get("MHE_FONTS_DIR"):
        return Path(env["MHE_FONTS_DIR"]).expanduser()
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "mhe-plugins" / "fonts"


def missing_packages(fonts_dir: str | Path, packages: Sequence[str] = FONT_PACKAGES) -> list[str]:
    return [p for p in packages if not (Path(fonts_dir) / p).is_dir()]


def ensure_fonts(fonts_dir: str | Path | None = None, packages: Sequence[str] = FONT_PACKAGES) -> Path:
    """Unpack the missing ``packages`` into ``fonts_dir/<package>/`` via ``apt-get download`` + ``dpkg -x``;
    returns ``fonts_dir`` (default :func:`default_fonts_dir`). A package already there is not fetched again,
    and a package is renamed into place only once fully unpacked."""
    fonts_dir = default_fonts_dir() if fonts_dir is None else Path(fonts_dir)
    missing = missing_packages(fonts_dir, packages)
    if not missing:
        return fonts_dir
    debs = fonts_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(
            f"fonts {missing} are not in {fonts_dir} and apt-get/dpkg are unavailable: unpack the font "
            "packages there yourself (<package>/usr/share/fonts/...) or pass another --fonts-dir"
        )
    subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    for pkg in missing:
        deb = sorted(debs.glob(f"{pkg}_*.deb"))
        if not deb:
            raise RuntimeError(f"apt-get download produced no .deb for {pkg} in {debs}")
        tmp = Path(tempfile.mkdtemp(dir=fonts_dir, prefix=f".{pkg}."))
        subprocess.run(["dpkg", "-x", str(deb[-1]), str(tmp)], check=True)
        os.replace(tmp, fonts_dir / pkg)
    return fonts_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m timm_ext.glyph_builder", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--fonts-dir",
        type=Path,
        default=None,
        help=f"font cache to fill (default here: {default_fonts_dir()}; $MHE_FONTS_DIR overrides)",
    )
    p.add_argument("--packages", nargs="+", default=list(FONT_PACKAGES), help="Debian font packages")
    p.add_argument("--check", action="store_true", help="only list the missing packages (exit 1 if any)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    fonts_dir = default_fonts_dir() if a.fonts_dir is None else a.fonts_dir
    if a.check:
        missing = missing_packages(fonts_dir, a.packages)
        print(f"{fonts_dir}: " + (f"missing {' '.join(missing)}" if missing else "all packages present"))
        return 1 if missing else 0
    print(ensure_fonts(fonts_dir, a.packages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
