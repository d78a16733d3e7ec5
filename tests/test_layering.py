"""The core's *library* (codec, checks, decode, margins, optim, distributed, heads/, metrics/) imports
nothing from the core's toolkit part nor from any adapter, so it can be used (and shipped) on its own.

Imports are read with ``ast`` (modules are never imported, so an import hidden in a function counts too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "mhe_plugins"
LIBRARY_MODULES = ("codec", "checks", "decode", "margins", "optim", "distributed")
LIBRARY_PACKAGES = ("heads", "metrics")
TOOLKIT = tuple(
    f"mhe_plugins.{m}" for m in ("training", "bench", "datasets", "demo", "entry", "mm", "bundled")
)
ADAPTERS = ("timm_ext", "xmc", "insightface_ext", "fairseq_ext")


def library_files() -> list[Path]:
    files = [CORE / f"{m}.py" for m in LIBRARY_MODULES]
    for pkg in LIBRARY_PACKAGES:
        files += sorted((CORE / pkg).rglob("*.py"))
    missing = [f for f in files if not f.is_file()]
    assert not missing, f"library modules not found: {missing}"
    return files


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def imports_in(src: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in the source of module ``name``; ``from X import y`` also yields
    ``X.y`` (y may be a submodule); relative imports are resolved against the module's package."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names if alias.name != "*"]
    return out


def forbidden(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in (*TOOLKIT, *ADAPTERS))


def violations(files: list[Path]) -> list[str]:
    return [
        f"{f.relative_to(ROOT)}:{line}: imports {mod}"
        for f in files
        for line, mod in imports(f)
        if forbidden(mod)
    ]


def test_library_imports_no_toolkit_and_no_adapter(capsys):
    files = library_files()
    bad = violations(files)
    assert not bad, "the library must not import the toolkit part or an adapter:\n" + "\n".join(bad)
    lines = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
    with capsys.disabled():
        print(f"\nlibrary of the core: {len(files)} files, {lines:,} lines")
    assert lines > 0


def test_core_package_init_stays_library_only():
    """Every library import runs ``mhe_plugins/__init__.py`` first: it must not pull the toolkit in either."""
    init = CORE / "__init__.py"
    bad = violations([init])
    assert not bad, "\n".join(bad)


def test_the_checker_sees_every_spelling():
    """Relative, absolute and ``from package import submodule`` forms all resolve to the module imported."""
    src = (
        "from ..training import atomic_copy\nfrom .. import bench\nimport mhe_plugins.mm\n"
        "from mhe_plugins import datasets\nfrom . import base\n"
        "def f():\n    import timm_ext.model\n"
    )
    found = [m for _, m in imports_in(src, "mhe_plugins.heads.probe") if forbidden(m)]
    assert found == [
        "mhe_plugins.training",
        "mhe_plugins.training.atomic_copy",
        "mhe_plugins.bench",
        "mhe_plugins.mm",
        "mhe_plugins.datasets",
        "timm_ext.model",
    ]
