"""The one reader of whole text and JSON files (`titanlm.files`): a byte-order mark is allowed, and a
file that cannot be read, is not UTF-8 or is not the JSON expected is one line naming the file, in the
error type of the caller's family. Every place that reads a whole JSON file goes through it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hf_models import INTERNLM2_TEMPLATE, write_tiny_tokenizer

from titanlm.checkpoint.manifest import MANIFEST, read_manifest, write_manifest
from titanlm.data.chat_templates import load_hf_chat_template
from titanlm.data.tokenizer import TokenizerFileError, build_tokenizer
from titanlm.errors import CheckpointError, DataError
from titanlm.files import read_json_file, read_text_file
from titanlm.models.hf_adapter import ConversionError
from titanlm.models.hf_checkpoint import read_json
from titanlm.tools.generate import GenerateError, stop_ids

BOM = "\ufeff"


def test_a_byte_order_mark_is_not_part_of_the_text_or_the_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(BOM + '{"a": [1, 2]}', encoding="utf-8")
    assert read_text_file(path) == '{"a": [1, 2]}'
    assert read_json_file(path, expect=dict) == {"a": [1, 2]}


def test_malformed_json_names_the_file_the_place_and_the_fix_in_the_callers_error_type(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(CheckpointError) as info:
        read_json_file(path, CheckpointError, "download it again")
    assert str(info.value) == f"{path} is not valid JSON (line 2, column 7: Expecting value); download it again"
    with pytest.raises(DataError, match=r"column 7: Expecting value\)$"):
        read_json_file(path, fix="")  # no fix, no "; "


@pytest.mark.parametrize(
    ("text", "expect", "found"),
    [("[1]", dict, "array"), ('"x"', dict, "string"), ("null", dict, "null"), ('{"a": 1}', list, "object")],
)
def test_a_json_value_of_another_kind_than_expected_is_named(tmp_path: Path, text: str, expect: type, found: str):
    path = tmp_path / "value.json"
    path.write_text(text)
    wanted = "object" if expect is dict else "array"
    with pytest.raises(DataError, match=rf"holds a JSON {found}, not a JSON {wanted}; fix or replace the file$"):
        read_json_file(path, expect=expect)


def test_a_file_that_is_not_utf8_or_cannot_be_read_is_one_line_naming_it(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"name": "café"}'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{latin1} is not UTF-8 text \(invalid continuation byte\); convert"):
        read_json_file(latin1)
    for unreadable, why in ((tmp_path / "absent.json", "No such file or directory"), (tmp_path, "Is a directory")):
        with pytest.raises(ConversionError) as info:
            read_text_file(unreadable, ConversionError)
        assert str(info.value) == f"{unreadable} cannot be read ({why})"


# ---- every whole JSON file titanlm reads ---------------------------------------------------------

# Each reader: (the file it reads, a call that reads it, a value of the file it accepts), set up in a folder.
Reader = tuple[Path, Callable[[], object], dict]


def _hf_config(folder: Path) -> Reader:
    return folder / "config.json", lambda: read_json(folder / "config.json"), {"model_type": "llama"}


def _tokenizer_config(folder: Path) -> Reader:
    tokenizer = write_tiny_tokenizer(folder / "tok")
    config = tokenizer.parent / "tokenizer_config.json"
    return config, lambda: build_tokenizer(str(tokenizer)), json.loads(config.read_text())


def _chat_template_config(folder: Path) -> Reader:
    tokenizer = write_tiny_tokenizer(folder / "tok", chat_template=INTERNLM2_TEMPLATE)
    tok, config = build_tokenizer(str(tokenizer)), tokenizer.parent / "tokenizer_config.json"
    return config, lambda: load_hf_chat_template(tok, str(tokenizer)), json.loads(config.read_text())


def _generation_config(folder: Path) -> Reader:
    tokenizer = write_tiny_tokenizer(folder / "tok")
    tok = build_tokenizer(str(tokenizer))
    return tokenizer.parent / "generation_config.json", lambda: stop_ids(tok, str(tokenizer)), {"eos_token_id": [1]}


def _manifest(folder: Path) -> Reader:
    (folder / "weights").write_bytes(b"123")
    write_manifest(str(folder), [])

    def read() -> object:
        manifest = read_manifest(str(folder))
        if "problem" in manifest:  # damage, which the checkpoint's loader reports as such
            raise CheckpointError(manifest["problem"])
        return manifest

    return folder / MANIFEST, read, json.loads((folder / MANIFEST).read_text())


READERS = {
    "hf-config.json": (_hf_config, ConversionError),
    "tokenizer_config.json": (_tokenizer_config, TokenizerFileError),
    "chat-template-config": (_chat_template_config, DataError),
    "generation_config.json": (_generation_config, GenerateError),
    "checkpoint-manifest": (_manifest, CheckpointError),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_json_file_reader_takes_a_bom_and_names_a_malformed_file(tmp_path: Path, reader: str) -> None:
    make, error = READERS[reader]
    path, read, value = make(tmp_path)
    path.write_text(BOM + json.dumps(value), encoding="utf-8")
    read()  # as without the mark
    path.write_text(json.dumps(value)[:-1])  # cut short
    with pytest.raises(error) as info:
        read()
    assert f"{path} is not valid JSON (line 1, column" in str(info.value)
    path.write_text("[]")  # valid JSON, not the object each of them needs
    with pytest.raises(error, match="holds a JSON array, not a JSON object"):
        read()
