"""Tests of titanlm.data.binmeta: reading InternEvo bin/meta folders, and every way one can be broken.

The fixtures write folders the way InternEvo's tools do (json.dumps lines, np.save metas), by the
format's description rather than through titanlm's writer, so reader and writer are checked
against the format and not against each other.
"""

from __future__ import annotations

import logging
import os
import pickle
import re

import numpy as np
import pytest
from binmeta_files import write_internevo

from titanlm.data.binmeta import BinMetaFolder, BinWriter, DataFormatError, encode_line, validate_folder

# The three documents of InternLM's data-preparation example (doc/usage.md), whose meta it prints as
# (0, 11), (90, 15), (208, 13).
USAGE_DOCS = [
    [73075, 75302, 69522, 69022, 98899, 67713, 68015, 81269, 74637, 75445, 99157],
    [69469, 60355, 73026, 68524, 60846, 61844, 98899, 67775, 79241, 98899, 67713, 67800, 67453, 67838, 99157],
    [68057, 79017, 60378, 68014, 98899, 67713, 67990, 68015, 70381, 67428, 61003, 67622, 99157],
]


def _docs(first: int, lengths: list[int], masked: int = 0) -> list[list[int]]:
    """Documents of the given lengths with unique ids from `first`; the first `masked` ids of each negated."""
    out = []
    for n in lengths:
        doc = list(range(first, first + n))
        out.append([-t for t in doc[:masked]] + doc[masked:])
        first += n
    return out


@pytest.fixture()
def folder(tmp_path):
    """Several types, nested sub-folders, int32 and int64 metas, masked tokens; returns (root, expected)
    where expected lists (type, tokens) in the documented order: sorted paths, then lines."""
    files = {  # written out of order on purpose
        "en/sub/deeper/b.bin": (_docs(5000, [3, 9]), np.int64),
        "en/a.bin": (_docs(1000, [5, 1, 12, 7], masked=2), np.int32),
        "cn/x.bin": (USAGE_DOCS, np.int32),
        "code/z/c.bin": (_docs(9000, [20, 2, 6]), np.int64),
    }
    for rel, (docs, dtype) in files.items():
        write_internevo(tmp_path / rel, docs, dtype)
    expected = [(rel.split("/")[0], doc) for rel in sorted(files) for doc in files[rel][0]]
    return str(tmp_path), expected


def test_internevo_folder_reads_back_exact_signed_tokens(folder):
    root, expected = folder
    data = BinMetaFolder(root)
    assert data.types == ["cn", "code", "en"]
    assert [f.type_name for f in data.files] == ["cn", "code", "en", "en"]
    assert data.num_documents == len(data) == len(expected)
    for i, (type_name, tokens) in enumerate(expected):
        got = data.read(i)
        assert got.dtype == np.int64 and got.tolist() == tokens
        assert data.document_type(i) == type_name
        assert data.lengths()[i] == len(tokens)
    assert data.lengths().dtype == np.int64
    assert data.lengths().tolist() == [len(t) for _, t in expected]
    assert [data.types[t] for t in data.type_ids()] == [name for name, _ in expected]
    assert data.read(len(expected) - 5).min() < 0  # en/a.bin's prompt tokens stay negative


def test_seed_example_meta_matches_the_seed_text(tmp_path):
    write_internevo(tmp_path / "cn" / "output.bin", USAGE_DOCS)
    meta = np.load(tmp_path / "cn" / "output.bin.meta")
    assert meta.dtype == np.int32 and meta.tolist() == [[0, 11], [90, 15], [208, 13]]


def test_writer_output_is_byte_identical_to_internevo(tmp_path):
    docs = USAGE_DOCS + _docs(7, [4, 0, 2], masked=1)
    write_internevo(tmp_path / "ref" / "d.bin", docs)
    with BinWriter(str(tmp_path / "out" / "d.bin")) as w:
        for doc in docs:
            w.write(doc)
    for suffix in ("d.bin", "d.bin.meta"):
        assert (tmp_path / "out" / suffix).read_bytes() == (tmp_path / "ref" / suffix).read_bytes()
    assert encode_line([1, -2]) == b'{"tokens": [1, -2]}\n'


def test_writer_leaves_nothing_on_error_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "en" / "d.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with BinWriter(str(target)) as w:
            w.write([1, 2])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # not even the folder it created
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "other.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="boom"):
        with BinWriter(str(target)) as w:
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "en") == ["other.txt"]  # a folder it did not create stays
    with BinWriter(str(target)) as w:
        w.write([1, 2])
    with pytest.raises(FileExistsError, match=re.escape(str(target)) + ".*--overwrite"):
        BinWriter(str(target))
    with BinWriter(str(target), meta_dtype="int64", overwrite=True) as w:
        w.write([3])
    assert np.load(str(target) + ".meta").dtype == np.int64
    assert sorted(os.listdir(tmp_path / "en")) == ["d.bin", "d.bin.meta", "other.txt"]


def test_writer_output_has_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        with BinWriter(str(tmp_path / "en" / "d.bin")) as w:
            w.write([1, 2])
        os.umask(0o027)
        with BinWriter(str(tmp_path / "en" / "e.bin")) as w:
            w.write([1, 2])
    finally:
        os.umask(old)
    modes = {name: oct(os.stat(tmp_path / "en" / name).st_mode & 0o777) for name in os.listdir(tmp_path / "en")}
    assert modes == {"d.bin": "0o644", "d.bin.meta": "0o644", "e.bin": "0o640", "e.bin.meta": "0o640"}


def test_min_length_drops_short_documents_and_renumbers(folder):
    root, expected = folder
    data = BinMetaFolder(root, min_length=6)
    kept = [(t, d) for t, d in expected if len(d) >= 6]
    assert 0 < data.num_documents == len(kept) < len(expected)
    assert [data.read(i).tolist() for i in range(len(kept))] == [d for _, d in kept]
    assert data.lengths().tolist() == [len(d) for _, d in kept]
    assert [data.types[t] for t in data.type_ids()] == [t for t, _ in kept]
    with pytest.raises(IndexError):
        data.read(len(kept))


def test_folder_pickles_for_dataloader_workers(folder):
    root, expected = folder
    data = BinMetaFolder(root)
    data.read(0)  # opens a memory map, which must not travel with the pickle
    clone = pickle.loads(pickle.dumps(data))
    assert [clone.read(i).tolist() for i in range(len(expected))] == [d for _, d in expected]


def test_vocab_size_is_checked_on_read_including_negative_ids(tmp_path):
    write_internevo(tmp_path / "en" / "d.bin", [[1, 2, 3], [4, 100], [-99, 5]])
    data = BinMetaFolder(str(tmp_path), vocab_size=100)
    assert data.read(0).tolist() == [1, 2, 3] and data.read(2).tolist() == [-99, 5]
    with pytest.raises(DataFormatError, match=r"d\.bin line 2 .*token id 100 .*vocab_size 100.*re-tokenize"):
        data.read(1)
    problems = validate_folder(str(tmp_path), vocab_size=99, full=True)
    assert len(problems) == 2 and "line 2" in problems[0] and "line 3" in problems[1]
    with pytest.raises(DataFormatError, match=r"d\.bin line 3 .*token id -99 .*vocab_size 99"):
        BinMetaFolder(str(tmp_path), vocab_size=99)  # the last line is checked at open


# ---- broken folders: each message names the file (and line) and the fix -----------------------


def _good(tmp_path, name="en/d.bin", docs=None):
    path = tmp_path / name
    write_internevo(path, docs or _docs(1, [3, 4, 5]))
    return path


def _problem(root) -> str:
    """The message BinMetaFolder stops with, checked to be among validate_folder's findings."""
    with pytest.raises(DataFormatError) as info:
        BinMetaFolder(str(root))
    problems = validate_folder(str(root))
    assert problems and problems[0] in str(info.value)
    return str(info.value)


def test_a_symlink_loop_is_read_once_with_a_warning_naming_it(folder, caplog):
    root, expected = folder
    loop = os.path.join(root, "en", "sub", "again")
    os.symlink(os.path.join("..", ".."), loop)  # en/sub/again -> the root
    with caplog.at_level(logging.WARNING, logger="titanlm"):
        data = BinMetaFolder(root)
    assert data.num_documents == len(expected) and len(data.files) == 4  # not 41 times each
    assert [r.getMessage() for r in caplog.records] == [
        f"{loop} links back to {os.path.realpath(root)}, which holds it (a symlink loop): its files are read "
        "once, not again through the link; remove the link"
    ]


def test_two_links_to_one_folder_read_it_once_under_the_first_name(tmp_path, caplog):
    _good(tmp_path, "shared/en/d.bin")
    root = tmp_path / "data"
    root.mkdir()
    for name in ("code", "en"):
        os.symlink(tmp_path / "shared" / "en", root / name)
    with caplog.at_level(logging.WARNING, logger="titanlm"):
        data = BinMetaFolder(str(root))
    assert data.types == ["code"] and data.num_documents == 3
    shared = os.path.realpath(tmp_path / "shared" / "en")
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / 'en'} leads to {shared}, which {root / 'code'} already leads to: its files are read once, "
        f"through {root / 'code'}; remove one of the links"
    ]


def test_missing_or_empty_folder(tmp_path):
    message = _problem(tmp_path)
    assert f"no .bin files under {tmp_path}" in message and "titanlm.tools.tokenize" in message
    message = _problem(tmp_path / "nope")
    assert "does not exist" in message and "data.train_folder" in message
    with pytest.raises(DataFormatError, match=r"nope does not exist .*; check data\.valid_folder$"):
        BinMetaFolder(str(tmp_path / "nope"), setting="data.valid_folder")


def test_bin_without_meta_and_meta_without_bin(tmp_path):
    path = _good(tmp_path)
    os.remove(str(path) + ".meta")
    message = _problem(tmp_path)
    assert f"{path} has no d.bin.meta beside it" in message and "regenerate" in message
    os.rename(path, tmp_path / "en" / "d.bin.meta")  # now a stray meta without its .bin
    message = _problem(tmp_path)
    assert f"{path}.meta has no d.bin beside it" in message and "delete the stray .meta" in message


def test_bin_directly_in_root_has_no_type(tmp_path):
    path = _good(tmp_path, "d.bin")
    message = _problem(tmp_path)
    assert str(path) in message and "move it into a type sub-folder" in message


def test_meta_that_is_not_an_npy_array(tmp_path):
    path = _good(tmp_path)
    (tmp_path / "en" / "d.bin.meta").write_bytes(b"(0, 11), (90, 15)")
    message = _problem(tmp_path)
    assert f"{path}.meta is not a NumPy array written by np.save" in message and "regenerate" in message


@pytest.mark.parametrize(
    "meta", [np.zeros((3, 3), np.int32), np.zeros((3, 2), np.float64), np.zeros(6, np.int64)], ids=str
)
def test_meta_of_wrong_shape_or_dtype(tmp_path, meta):
    path = _good(tmp_path)
    np.save(str(path) + ".meta", meta)
    os.rename(str(path) + ".meta.npy", str(path) + ".meta")
    message = _problem(tmp_path)
    assert f"{path}.meta holds a {meta.dtype} array of shape {meta.shape}" in message
    assert "expected (N, 2) integers" in message and "regenerate" in message


def _edit_meta(path, edit) -> None:
    meta = np.load(str(path) + ".meta")
    edit(meta)
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, meta)


def test_offsets_not_strictly_increasing(tmp_path):
    path = _good(tmp_path)
    _edit_meta(path, lambda m: m.__setitem__((2, 0), m[1, 0]))
    message = _problem(tmp_path)
    assert f"{path}.meta row 2" in message and "not strictly increasing" in message and "regenerate" in message


def test_offset_beyond_file_size(tmp_path):
    path = _good(tmp_path)
    _edit_meta(path, lambda m: m.__setitem__((2, 0), os.path.getsize(path) + 10))
    message = _problem(tmp_path)
    assert f"{path}.meta row 2 points at byte" in message and f"past the end of {path}" in message
    assert "re-copy the .bin" in message


def test_truncated_bin(tmp_path):
    path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    message = _problem(tmp_path)
    assert f"{path} does not end with a newline" in message and "line 3" in message and "re-copy" in message


def test_count_disagreeing_with_line_is_caught_on_read_and_by_full_validation(tmp_path):
    path = _good(tmp_path)
    _edit_meta(path, lambda m: m.__setitem__((1, 1), 7))  # line 2 really holds 4 tokens
    data = BinMetaFolder(str(tmp_path))  # opening checks only what the meta and file size show
    assert data.read(0).tolist() == [1, 2, 3]
    with pytest.raises(
        DataFormatError, match=rf"{re.escape(str(path))} line 2 .*holds 4 tokens but .*says 7.*regenerate"
    ):
        data.read(1)
    assert validate_folder(str(tmp_path)) == []  # the quick check reads only the first and last line
    (problem,) = validate_folder(str(tmp_path), full=True)
    assert f"{path} line 2" in problem and "holds 4 tokens" in problem


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b'{"ids": [1, 2]}',
        b'{"tokens": "1 2"}',
        b'{"tokens": [1.5, 2]}',
        b'{"tokens": [[1], [2]]}',
        b"[1, 2]",
    ],
)
def test_line_that_is_not_a_tokens_object(tmp_path, line):
    path = tmp_path / "en" / "d.bin"
    write_internevo(path, [[1, 2], [3, 4], [5, 6]])
    lines = path.read_bytes().split(b"\n")
    lines[1] = line
    path.write_bytes(b"\n".join(lines))
    with open(str(path) + ".meta", "wb") as f:  # a consistent meta: only the content is wrong
        offsets = np.cumsum([0] + [len(x) + 1 for x in lines[:2]])
        np.save(f, np.array([[o, 2] for o in offsets], dtype=np.int32))
    data = BinMetaFolder(str(tmp_path))
    with pytest.raises(
        DataFormatError, match=rf'{re.escape(str(path))} line 2 .*not a JSON object with a "tokens" list'
    ):
        data.read(1)
    assert data.read(2).tolist() == [5, 6]
    (problem,) = validate_folder(str(tmp_path), full=True)
    assert "line 2" in problem and "regenerate" in problem


def _garble_line(path, number: int, line: bytes) -> None:
    """Replace line `number` (1-based) of a .bin and rewrite its meta to match, so only the content is wrong."""
    lines = path.read_bytes().split(b"\n")[:-1]
    lines[number - 1] = line
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    offsets = np.cumsum([0] + [len(x) + 1 for x in lines[:-1]])
    counts = np.load(str(path) + ".meta")[:, 1]
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, np.stack([offsets, counts], axis=1).astype(np.int32))


@pytest.mark.parametrize("number", [1, 3])
@pytest.mark.parametrize(
    "line, expected",
    [
        (b'{"tokens": [9, 10, 1', "not a JSON object"),  # cut mid-JSON, newline kept
        (b'{"ids": [9, 10]}', "not a JSON object"),
        (b'{"tokens": [9, 10]}', "holds 2 tokens but"),  # a stale meta
    ],
    ids=["cut", "no-tokens", "stale-meta"],
)
def test_first_and_last_line_are_checked_when_the_folder_opens(tmp_path, number, line, expected):
    path = _good(tmp_path)
    _garble_line(path, number, line)
    message = _problem(tmp_path)
    assert message.startswith(f"{path} line {number} ") and expected in message and "regenerate" in message
    assert "\n" not in message


def test_a_garbled_middle_line_is_left_to_the_read(tmp_path):
    path = _good(tmp_path)
    _garble_line(path, 2, b'{"tokens": [9, 1')
    data = BinMetaFolder(str(tmp_path))  # opening stays cheap: first and last line only
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(path))} line 2 "):
        data.read(1)


def test_validate_lists_every_problem_and_open_names_the_count(tmp_path):
    _good(tmp_path, "en/ok.bin")
    bad = _good(tmp_path, "en/bad.bin")
    bad.write_bytes(bad.read_bytes()[:-1])
    orphan = _good(tmp_path, "cn/orphan.bin")
    os.remove(str(orphan) + ".meta")
    problems = validate_folder(str(tmp_path))
    assert len(problems) == 2
    assert any(str(orphan) in p for p in problems) and any(str(bad) in p for p in problems)
    os.remove(bad)
    os.remove(str(bad) + ".meta")
    os.remove(orphan)
    assert validate_folder(str(tmp_path), full=True) == []


def test_empty_bin_with_empty_meta_is_valid_and_holds_nothing(tmp_path):
    _good(tmp_path, "en/ok.bin")
    write_internevo(tmp_path / "en" / "empty.bin", [])
    assert validate_folder(str(tmp_path), full=True) == []
    assert BinMetaFolder(str(tmp_path)).num_documents == 3


def test_reading_never_writes(folder):
    root, expected = folder
    before = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, names in os.walk(root) for p in names}
    data = BinMetaFolder(root, vocab_size=100_000)
    for i in range(len(expected)):
        data.read(i)
    validate_folder(root, full=True)
    after = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d, _, names in os.walk(root) for p in names}
    assert after == before
