"""Console-script entry points that check their extra before importing the toolkit.

Why: every console script is installed whatever extras were chosen; without this check
``mhe-xmc`` on a core-only install dies with ``No module named 'sklearn'`` deep in an import chain.
Each entry point looks the extra's modules up with :func:`importlib.util.find_spec` (nothing is
imported), and if one is missing prints which ``pip install`` fixes it and exits with
:data:`EXIT_MISSING_EXTRA`.  Only then is the toolkit's ``main`` imported and called.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

__all__ = ["EXIT_MISSING_EXTRA", "FAIRSEQ_BUILD", "missing_modules", "require_extra", "run"]

#: exit status of a console script whose extra is not installed.
EXIT_MISSING_EXTRA = 3

#: fairseq-fixed cannot be an install requirement: pip would build it in an isolated environment
#: (downloading another torch) and pull its declared CUDA-only torchaudio.  This is the documented build.
FAIRSEQ_BUILD = "MAX_JOBS=2 pip install --no-build-isolation --no-deps --no-cache-dir fairseq-fixed==0.12.3.1"

#: extra -> modules its console scripts import (top-level import names, checked with find_spec).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "timm": ("timm", "torchvision", "PIL"),
    "timm-export": ("timm", "torchvision", "PIL", "onnx", "onnxscript", "onnxruntime"),
    "xmc": ("sklearn", "transformers"),
    "face": ("PIL",),
    "face-export": ("PIL", "onnx", "onnxscript", "onnxruntime"),
    "fairseq": ("hydra", "omegaconf", "sacrebleu", "sentencepiece", "fairseq", "fairseq_cli"),
}
#: modules that no extra installs; the message gives their own command.
_BUILT_BY_HAND = {"fairseq": FAIRSEQ_BUILD, "fairseq_cli": FAIRSEQ_BUILD}


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The names in ``modules`` that cannot be found on ``sys.path`` (none is imported)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require_extra(prog: str, extra: str) -> None:
    """Exit with :data:`EXIT_MISSING_EXTRA` and a fix-it message if ``extra``'s modules are missing."""
    missing = missing_modules(EXTRA_MODULES[extra])
    if not missing:
        return
    pip_extra = extra.split("-")[0]
    lines = [f"{prog}: the [{pip_extra}] extra is not installed (missing module(s): {', '.join(missing)})."]
    step = "fix:"
    if any(m not in _BUILT_BY_HAND for m in missing):
        lines.append(f"  {step} pip install 'mhe-plugins[{pip_extra}]'")
        step = "then:"
    for cmd in dict.fromkeys(_BUILT_BY_HAND[m] for m in missing if m in _BUILT_BY_HAND):
        lines.append(f"  {step} {cmd}")
        lines.append(
            "  (fairseq-fixed is compiled against the installed torch: without build isolation, which would"
            " download another torch, and without deps, as it declares a CUDA-only torchaudio)"
        )
    print("\n".join(lines), file=sys.stderr)
    raise SystemExit(EXIT_MISSING_EXTRA)


def run(prog: str, extra: str, target: str, argv: list[str] | None = None):
    """Check ``extra``, then import ``"module:function"`` and call it (with ``argv`` if given)."""
    require_extra(prog, extra)
    module, func = target.split(":")
    main: Callable = getattr(importlib.import_module(module), func)
    return main() if argv is None else main(argv)


def _script(prog: str, extra: str, target: str) -> Callable[[], object]:
    def entry():
        return run(prog, extra, target)

    entry.__name__ = entry.__qualname__ = prog.replace("-", "_")
    entry.__doc__ = f"``{prog}``: checks the [{extra.split('-')[0]}] extra, then runs ``{target}``."
    return entry


timm_train = _script("mhe-timm-train", "timm", "timm_ext.train:main")
timm_validate = _script("mhe-timm-validate", "timm", "timm_ext.validate:main")
timm_export = _script("mhe-timm-export", "timm-export", "timm_ext.export:main")
timm_predict = _script("mhe-timm-predict", "timm", "timm_ext.predict:main")
xmc = _script("mhe-xmc", "xmc", "xmc.cli:main")
face_train = _script("mhe-face-train", "face", "insightface_ext.train:main")
face_eval = _script("mhe-face-eval", "face", "insightface_ext.evaluate:main")
face_export = _script("mhe-face-export", "face-export", "insightface_ext.export:main")
fairseq_train = _script("mhe-fairseq-train", "fairseq", "fairseq_ext.cli:train_main")
fairseq_generate = _script("mhe-fairseq-generate", "fairseq", "fairseq_ext.cli:generate_main")
fairseq_interactive = _script("mhe-fairseq-interactive", "fairseq", "fairseq_ext.cli:interactive_main")
fairseq_preprocess = _script("mhe-fairseq-preprocess", "fairseq", "fairseq_ext.cli:preprocess_main")
demo = _script("mhe-demo", "xmc", "mhe_plugins.demo:main")
