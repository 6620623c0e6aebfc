"""Optional packages, imported where a feature needs them: `require` gives the module, or one line
naming the `pip install 'titanlm[EXTRA]'` that brings it. The extras are pyproject.toml's
[project.optional-dependencies]; a package every run needs is a plain dependency, imported at the
top of its module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from titanlm.errors import MissingExtraError


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`module`, imported; if its package is not installed, a MissingExtraError saying that `feature`
    needs it and which extra installs it. A package that is installed but fails to import (one of its
    own dependencies missing, say) keeps its traceback, which says why."""
    package = module.split(".")[0]
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name != package:
            raise
        raise MissingExtraError(
            f"{feature} needs {package}: pip install 'titanlm[{extra}]' (or pip install {package})"
        ) from None
    return importlib.import_module(module)
