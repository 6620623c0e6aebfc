"""The documentation stays true: the README and every docs/ page name train configs, scripts, modules,
source files and config flags that exist, link to pages and sections that exist, carry Python examples
that compile, and the config reference in docs/configuration.md is the generated table."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from trainer_runs import REPO

from titanlm.config import reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIG_PAGE = REPO / "docs" / "configuration.md"


def text_of(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def config_keys() -> set[str]:
    return set(re.findall(r"^\| `([\w.]+)` \|", reference_markdown(), flags=re.MULTILINE))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text_of(page), flags=re.DOTALL), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_pages_exist() -> None:
    names = {page.name for page in PAGES}
    expected = {"architecture.md", "benchmarks.md", "checkpoints.md", "configuration.md", "data.md"}
    expected |= {"fine-tuning.md", "metrics.md", "operations.md", "parallelism.md", "README.md"}
    assert expected <= names


def test_config_reference_is_the_generated_table() -> None:
    text = text_of(CONFIG_PAGE)
    documented = text[text.index(START) + len(START) : text.index(END)].strip()
    assert documented == reference_markdown(), "the config table is stale: run `python scripts/update_readme.py`"


def test_config_reference_is_in_one_place() -> None:
    holders = [page.name for page in PAGES if START in text_of(page)]
    assert holders == ["configuration.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_train_configs_named_exist(page: Path) -> None:
    text = text_of(page)
    for name in set(re.findall(r"train_configs/([\w.]+\.toml)", text)) | set(re.findall(r"`(\w+\.toml)`", text)):
        assert (REPO / "train_configs" / name).exists(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_scripts_files_and_modules_named_exist(page: Path) -> None:
    text = text_of(page)
    for path in set(re.findall(r"\b((?:benchmarks|scripts|tests|titanlm)/[\w/]+\.(?:py|sh))", text)):
        assert (REPO / path).exists(), path
    for module in set(re.findall(r"python -m (titanlm(?:\.\w+)+)", text)):
        assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_config_flags_named_exist(page: Path) -> None:
    keys = config_keys()
    sections = {key.split(".")[0] for key in keys}
    flags = {f"{s}.{f}" for s, f in re.findall(r"--([a-z_0-9]+)\.([a-z_0-9]+)", text_of(page)) if s in sections}
    assert flags <= keys, sorted(flags - keys)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_to_pages_and_sections_resolve(page: Path) -> None:
    for target, anchor in re.findall(r"\]\(([^)#\s]*\.md)?(?:#([\w-]+))?\)", text_of(page)):
        linked = (page.parent / target).resolve() if target else page
        assert linked.exists(), target
        if anchor:
            assert anchor in anchors(linked), f"{target}#{anchor}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_examples_compile(page: Path) -> None:
    for source in re.findall(r"<<'PY'\n(.*?)\nPY\n", text_of(page), flags=re.DOTALL):
        compile(source, f"{page.name} example", "exec")
