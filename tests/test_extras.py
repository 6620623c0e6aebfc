"""Dependencies: every package titanlm imports is declared in pyproject.toml, and an optional one that
is missing is one line naming the `pip install 'titanlm[EXTRA]'` that brings it, never a bad file."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from titanlm.errors import MissingExtraError, TitanlmError
from titanlm.extras import require

REPO = Path(__file__).resolve().parents[1]
# Where the module a package installs is named otherwise than the package.
DISTRIBUTION_OF_MODULE = {"flash_attn": "flash-attn"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_packages() -> dict[str, list[str]]:
    """Each third-party top-level module imported anywhere under titanlm/ (inside functions too), with
    the files importing it."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "titanlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "titanlm" and top not in sys.stdlib_module_names:
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def test_every_package_titanlm_imports_is_a_dependency_or_in_an_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {name: deps for name, deps in project["optional-dependencies"].items() if name != "dev"}
    declared = {
        _normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
        for requirement in [*project["dependencies"], *(dep for deps in extras.values() for dep in deps)]
    }
    imported = _imported_packages()
    assert {"tokenizers", "jinja2", "matplotlib"} <= imported.keys()  # the scan sees imports inside functions
    undeclared = {
        module: files
        for module, files in imported.items()
        if _normalized(DISTRIBUTION_OF_MODULE.get(module, module)) not in declared
    }
    assert undeclared == {}, "imported by titanlm but not in pyproject.toml's dependencies or extras"


def test_a_missing_optional_package_is_one_line_naming_its_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(MissingExtraError) as info:
        require("matplotlib.figure", "plot", "plotting")
    assert isinstance(info.value, TitanlmError)  # so a tool's main prints the line and exits 2
    assert str(info.value) == "plotting needs matplotlib: pip install 'titanlm[plot]' (or pip install matplotlib)"
    assert require("json.decoder", "none", "reading") is sys.modules["json.decoder"]


def test_an_installed_package_that_fails_to_import_keeps_its_own_error(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "broken_extra").mkdir()
    (tmp_path / "broken_extra" / "__init__.py").write_text("import its_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("broken_extra", "plot", "plotting")
    assert not isinstance(info.value, MissingExtraError) and info.value.name == "its_missing_dependency"
