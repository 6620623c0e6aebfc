"""The README stays true: its config table is the generated one, and its commands name real things."""

from __future__ import annotations

import importlib.util
import re

from trainer_runs import REPO

from titanlm.config import reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_config_reference_is_the_generated_table() -> None:
    text = readme()
    documented = text[text.index(START) + len(START) : text.index(END)].strip()
    assert documented == reference_markdown(), "README's config table is stale: run `python scripts/update_readme.py`"


def test_readme_train_configs_exist() -> None:
    for name in set(re.findall(r"train_configs/([\w.]+\.toml)", readme())) | set(
        re.findall(r"`(\w+\.toml)`", readme())
    ):
        assert (REPO / "train_configs" / name).exists(), name


def test_readme_scripts_and_modules_exist() -> None:
    text = readme()
    for path in set(re.findall(r"\b((?:benchmarks|scripts)/\w+\.(?:py|sh))", text)):
        assert (REPO / path).exists(), path
    for module in set(re.findall(r"python -m (titanlm(?:\.\w+)+)", text)):
        assert importlib.util.find_spec(module) is not None, module
