"""Regenerate the configuration reference table in docs/configuration.md from the config dataclasses."""

from pathlib import Path

from titanlm.config import reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
text = page.read_text(encoding="utf-8")
head, rest = text.split(START)
_, tail = rest.split(END)
page.write_text(f"{head}{START}\n{reference_markdown()}\n{END}{tail}", encoding="utf-8")
