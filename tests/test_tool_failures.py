"""Operations that never hang and always say what happened: tools check their inputs before any worker starts,
write files with the user's permissions, and the trainer refuses bad settings in one line.

Each test makes one failure the way a user meets it and checks the exit code, that stderr is one
line naming the flag, key or file to fix (no traceback), and the files before and after: nothing
written, no temporary file left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hf_models import write_tiny_tokenizer
from trainer_runs import REPO, TINY_ARGS, worker_env

from titanlm import progress
from titanlm.config import load_config
from titanlm.data.binmeta import BinMetaFolder, BinWriter
from titanlm.errors import USER_ERROR_EXIT_CODE, DataError
from titanlm.models.hf_checkpoint import write_safetensors
from titanlm.plan import resolve
from titanlm.tools import common, convert, generate, inspect_data, plot, tokenize, tokenize_alpaca, tokenize_chat
from titanlm.train import main as train_main

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def _tool(module: str, *args: object) -> subprocess.CompletedProcess:
    """Run `python -m titanlm.tools.<module>` as a user would; a hang fails the test at the timeout."""
    command = [sys.executable, "-m", f"titanlm.tools.{module}", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=90)


def _one_line(err: str, *expected: str) -> str:
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and all(part in err for part in expected), err
    return err


def _tree(folder: Path) -> list[str]:
    """Every path under `folder`, hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    return path


# ---- the tokenizer is checked before any worker starts -------------------------------------------


@pytest.mark.slow
def test_tokenize_with_a_missing_tokenizer_and_two_workers_exits_2_at_once(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "raw.jsonl", ["one", "two"])
    missing = tmp_path / "nope.model"
    start = time.monotonic()
    result = _tool(
        "tokenize",
        "--text_input_path",
        source,
        "--bin_output_path",
        tmp_path / "out" / "en" / "d.bin",
        "--tokenizer_path",
        missing,
        "--workers",
        2,
    )
    assert result.returncode == 2 and time.monotonic() - start < 60
    err = _one_line(result.stderr, f"tokenizer {missing} does not exist", "check --tokenizer_path")
    assert "model.tokenizer_path" not in err
    assert _tree(tmp_path) == ["raw.jsonl"]  # no output folder, no hidden .tmp file


def test_an_unreadable_tokenizer_names_each_tools_own_argument(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text("{ not json")
    source = _jsonl(tmp_path / "raw.jsonl", ["one", "two"])
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    runs = [
        (
            "set --tokenizer_path to",
            lambda: tokenize.main(
                [
                    "--text_input_path",
                    str(source),
                    "--bin_output_path",
                    str(tmp_path / "a" / "en" / "d.bin"),
                    "--tokenizer_path",
                    str(junk),
                    "--workers",
                    "2",
                ]
            ),
        ),
        (
            "set the TOKENIZER argument to",
            lambda: tokenize_chat.main(
                [str(chats), str(tmp_path / "b"), str(junk), "--template", "internlm2", "--workers", "2"]
            ),
        ),
        ("set the TOKENIZER argument to", lambda: tokenize_alpaca.main([str(alpaca), str(tmp_path / "c"), str(junk)])),
    ]
    before = _tree(tmp_path)
    for fix, run in runs:
        assert run() == 2
        err = _one_line(capsys.readouterr().err, f"cannot load '{junk}' as a huggingface tokenizer", fix)
        assert "model.tokenizer_path" not in err
    assert _tree(tmp_path) == before


@pytest.mark.timeout(60)
def test_a_pool_worker_that_dies_ends_the_run_with_one_error() -> None:
    with pytest.raises(common.WorkerDiedError, match=r"a worker process stopped unexpectedly .*--workers 1"):
        list(common.ordered_map(_die_on_7, range(40), 2, _nothing))
    assert list(common.ordered_map(abs, range(-5, 0), 2, _nothing)) == [5, 4, 3, 2, 1]  # in input order


@pytest.mark.timeout(60)
def test_a_worker_initializer_that_fails_breaks_the_pool_instead_of_respawning_it() -> None:
    with pytest.raises(common.WorkerDiedError):
        list(common.ordered_map(abs, range(10), 2, _fail))


def _nothing() -> None:
    pass


def _fail() -> None:
    raise ValueError("initializer failed")


def _die_on_7(item: int) -> int:
    if item == 7:
        os._exit(1)
    return item


@pytest.mark.slow
def test_a_text_a_worker_cannot_tokenize_mid_run_is_one_line_naming_its_line(
    tmp_path: Path, demo_tokenizer, capsys
) -> None:
    texts = [f"document number {i}" for i in range(3000)]
    source = _jsonl(tmp_path / "raw.jsonl", texts)
    lines = source.read_text().splitlines(keepends=True)
    lines[2499] = '{"content": "broken \\ud800 escape"}\n'  # valid JSON, not valid Unicode
    source.write_text("".join(lines))
    args = [
        "--text_input_path",
        source,
        "--bin_output_path",
        tmp_path / "out" / "en" / "d.bin",
        "--tokenizer_path",
        demo_tokenizer,
    ]
    expected = (f"{source} line 2500: cannot tokenize the text", "lone UTF-16 surrogate", "fix or remove it")
    result = _tool("tokenize", *args, "--workers", 2)  # in the third of three chunks, all in flight
    assert result.returncode == 2
    _one_line(result.stderr, *expected)  # nor any worker's traceback
    assert _tree(tmp_path) == ["raw.jsonl"]
    assert tokenize.main([*map(str, args), "--workers", "1"]) == 2  # the same line without a pool
    _one_line(capsys.readouterr().err, *expected)
    assert _tree(tmp_path) == ["raw.jsonl"]


def test_workers_below_1_are_refused_before_anything_is_read(tmp_path: Path, demo_tokenizer, capsys) -> None:
    source = _jsonl(tmp_path / "raw.jsonl", ["one"])
    assert (
        tokenize.main(
            [
                "--text_input_path",
                str(source),
                "--bin_output_path",
                str(tmp_path / "o" / "en" / "d.bin"),
                "--tokenizer_path",
                demo_tokenizer,
                "--workers",
                "0",
            ]
        )
        == 2
    )
    _one_line(capsys.readouterr().err, "--workers 0 must be at least 1")
    assert _tree(tmp_path) == ["raw.jsonl"]


# ---- every tool's main goes through one wrapper: a user's error is one line and status 2 ---------


def test_run_cli_prints_a_users_error_as_one_line_and_lets_a_bug_keep_its_traceback(capsys) -> None:
    def main_raising(error: Exception) -> Callable[..., int]:
        def main(argv: list[str] | None = None) -> int:
            raise error

        return common.run_cli(main)

    assert main_raising(DataError("data.x is wrong;\nset it to y"))([]) == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err == "error: data.x is wrong; set it to y\n"
    assert main_raising(PermissionError(13, "Permission denied", "out.bin"))([]) == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied: 'out.bin'\n"
    with pytest.raises(KeyError, match="a bug"):
        main_raising(KeyError("a bug"))([])
    assert common.run_cli(lambda argv: 1)([]) == 1  # the tool's own exit code passes through


def _tool_mains(tmp_path: Path) -> dict[str, tuple[Callable[[list[str]], int], list[str], str]]:
    """Per tool: its main, arguments naming a file that does not exist, and what its one line says."""
    absent = str(tmp_path / "absent")
    return {
        "tokenize": (
            tokenize.main,
            ["--text_input_path", absent, "--bin_output_path", str(tmp_path / "d.bin"), "--tokenizer_path", absent],
            f"input {absent} does not exist; check --text_input_path",
        ),
        "tokenize_alpaca": (tokenize_alpaca.main, [absent, str(tmp_path / "o"), absent], f"input {absent} does not"),
        "tokenize_chat": (
            tokenize_chat.main,
            [absent, str(tmp_path / "o"), absent, "--template", "internlm2"],
            f"tokenizer {absent} does not exist; check the TOKENIZER argument",
        ),
        "inspect_data": (inspect_data.main, [str(tmp_path), "--min_length", "-1"], "--min_length -1 is negative"),
        "convert": (convert.main, ["hf_to_dcp", absent, str(tmp_path / "o")], f"'{absent}' is not an existing folder"),
        "generate": (generate.main, ["--checkpoint", absent, "--prompt", "hi"], f"{absent} is not an existing folder"),
        "plot": (plot.main, [absent, "-o", str(tmp_path / "c.png")], f"{absent}: no such metrics.jsonl file"),
    }


TOOLS = ("tokenize", "tokenize_alpaca", "tokenize_chat", "inspect_data", "convert", "generate", "plot")


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_says_a_users_error_in_one_line_with_status_2_and_keeps_a_bugs_traceback(
    tmp_path: Path, capsys, monkeypatch, tool: str
) -> None:
    main, argv, line = _tool_mains(tmp_path)[tool]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, line)
    assert _tree(tmp_path) == []

    def fail_with(error: Exception) -> None:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", lambda *args, **kwargs: _raise(error))

    fail_with(PermissionError(13, "Permission denied", "somewhere"))  # the file system's errors too
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, "Permission denied: 'somewhere'")
    fail_with(KeyError("a bug"))
    with pytest.raises(KeyError, match="a bug"):
        main(argv)


def _raise(error: Exception) -> None:
    raise error


# ---- file modes follow the umask -----------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> int:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): oct(p.stat().st_mode & 0o777) for p in sorted(folder.rglob("*"))}


def test_tool_outputs_get_the_mode_of_a_plain_open(tmp_path: Path, demo_tokenizer, umask: int) -> None:
    file, folder = oct(0o666 & ~umask), oct(0o777 & ~umask)
    source = _jsonl(tmp_path / "raw.jsonl", ["one", "two"])
    assert (
        tokenize.main(
            [
                "--text_input_path",
                str(source),
                "--bin_output_path",
                str(tmp_path / "pre" / "en" / "d.bin"),
                "--tokenizer_path",
                demo_tokenizer,
                "--workers",
                "2",
            ]
        )
        == 0
    )
    assert _modes(tmp_path / "pre") == {"en": folder, "en/d.bin": file, "en/d.bin.meta": file}

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]))
    assert tokenize_alpaca.main([str(alpaca), str(tmp_path / "sft"), demo_tokenizer]) == 0
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
            + "\n"
            for i in range(10)
        )
    )
    tiny = write_tiny_tokenizer(tmp_path / "tiny")
    assert (
        tokenize_chat.main([str(chats), str(tmp_path / "chat"), str(tiny), "--template", "internlm2", "--workers", "2"])
        == 0
    )
    for out in ("sft", "chat"):
        modes = _modes(tmp_path / out)
        assert modes == {name: folder if "." not in name else file for name in modes}, (out, modes)
        assert len(modes) == 8  # {train,valid}, {train,valid}/en, two .bin and two .bin.meta


def test_hf_safetensors_get_the_mode_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    state = {f"layer{i}.weight": torch.ones(64, 64) for i in range(3)}
    for name, shard_bytes in (("single", 1 << 30), ("sharded", 64 * 64 * 4)):
        (tmp_path / name).mkdir()
        files = write_safetensors(state, tmp_path / name, shard_bytes)
        assert len(files) == (1 if name == "single" else 4)
        assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~umask)}


# ---- tokenize_alpaca never writes an empty split -------------------------------------------------


def _alpaca(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(n)]))
    return path


@pytest.mark.parametrize(
    "records, ratio, expected",
    [
        (
            4,
            "0.1",
            [
                "--split_ratio 0.1 puts round(4 x 0.1) = 0 of the 4 records into valid, so the validation "
                "split would be empty",
                "pass --split_ratio 0.25 or more",
                "or --split_ratio 0 to write no",
            ],
        ),
        (
            3,
            "0.9",
            [
                "--split_ratio 0.9 puts all 3 records into valid, so the train split would be empty",
                "lower --split_ratio",
            ],
        ),
    ],
    ids=["empty-valid", "empty-train"],
)
def test_alpaca_refuses_a_ratio_that_leaves_a_split_empty(
    tmp_path: Path, demo_tokenizer, capsys, records: int, ratio: str, expected: list[str]
) -> None:
    source = _alpaca(tmp_path, records)
    assert tokenize_alpaca.main([str(source), str(tmp_path / "sft"), demo_tokenizer, "--split_ratio", ratio]) == 2
    _one_line(capsys.readouterr().err, *expected)
    assert _tree(tmp_path) == ["alpaca.json"]


def test_alpaca_split_ratio_0_writes_train_only_and_says_so(tmp_path: Path, demo_tokenizer, capsys) -> None:
    source = _alpaca(tmp_path, 4)
    assert tokenize_alpaca.main([str(source), str(tmp_path / "sft"), demo_tokenizer, "--split_ratio", "0"]) == 0
    out = capsys.readouterr().out
    assert "train: 4 samples" in out and "valid: not written (--split_ratio 0)" in out
    assert sorted(os.listdir(tmp_path / "sft")) == ["train"]
    assert BinMetaFolder(str(tmp_path / "sft" / "train")).num_documents == 4


def test_chat_refuses_a_ratio_that_leaves_valid_empty(tmp_path: Path, capsys) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    tiny = write_tiny_tokenizer(tmp_path / "tiny")
    before = _tree(tmp_path)
    assert tokenize_chat.main([str(chats), str(tmp_path / "out"), str(tiny), "--template", "internlm2"]) == 2
    _one_line(
        capsys.readouterr().err,
        "--split_ratio 0.1 puts round(1 x 0.1) = 0 of the 1 records into valid",
        "--split_ratio 0 to write no validation split",
    )
    assert _tree(tmp_path) == before


# ---- the SFT tools: an output folder never pairs the splits of two runs ------------------------


def _sft_tool(tmp_path: Path, tool: str, demo_tokenizer: str, n: int = 10) -> Callable[..., int]:
    """`main` of tokenize_alpaca or tokenize_chat on `n` records into tmp_path/out, taking extra flags."""
    if tool == "alpaca":
        source = _alpaca(tmp_path, n)
        return lambda *extra: tokenize_alpaca.main([str(source), str(tmp_path / "out"), demo_tokenizer, *extra])
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
            + "\n"
            for i in range(n)
        )
    )
    tiny = write_tiny_tokenizer(tmp_path / "tiny")
    return lambda *extra: tokenize_chat.main(
        [str(chats), str(tmp_path / "out"), str(tiny), "--template", "internlm2", "--workers", "1", *extra]
    )


@pytest.mark.parametrize("tool", ["alpaca", "chat"])
def test_the_sft_tools_log_records_done_rate_and_eta_as_plain_lines_off_a_terminal(
    tmp_path: Path, demo_tokenizer, capsys, monkeypatch, tool: str
) -> None:
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0)  # a line at every update
    assert _sft_tool(tmp_path, tool, demo_tokenizer, n=10)() == 0
    err = capsys.readouterr().err
    name = {"alpaca": "tokenize_alpaca", "chat": "tokenize_chat"}[tool]
    assert "\r" not in err and err.splitlines()[-1].startswith(f"{name}: 10/10 record (100%), ")
    assert "record/s" in err and "ETA" in err


# An empty input is a mistake upstream (an export that failed, the wrong file): exit 2, so that a
# pipeline stops here rather than train on nothing, and write no output and no empty split.
@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.txt", "\n  \n", "holds no line with text"),
        ("empty.jsonl", "\n", "holds no record"),
        ("empty.json", "[]", "holds no record"),
    ],
)
def test_tokenize_an_empty_input_writes_nothing_and_says_so(
    tmp_path: Path, demo_tokenizer, capsys, name: str, content: str, expected: str
) -> None:
    source = tmp_path / name
    source.write_text(content)
    for workers in ("1", "2"):
        argv = ["--text_input_path", str(source), "--bin_output_path", str(tmp_path / "out" / "en" / "d.bin")]
        assert tokenize.main([*argv, "--tokenizer_path", demo_tokenizer, "--workers", workers]) == 2
        assert capsys.readouterr().err == f"error: {source} {expected}; nothing written\n"
    assert _tree(tmp_path) == [name]


@pytest.mark.parametrize("tool", ["alpaca", "chat"])
def test_the_sft_tools_refuse_an_empty_input_and_write_nothing(tmp_path: Path, demo_tokenizer, capsys, tool: str):
    run = _sft_tool(tmp_path, tool, demo_tokenizer, n=0)
    before = _tree(tmp_path)
    assert run() == 2
    _one_line(capsys.readouterr().err, "holds no records")
    assert _tree(tmp_path) == before


def test_a_file_where_an_output_folder_must_go_is_one_line_naming_it(tmp_path: Path, demo_tokenizer, capsys) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    source = _jsonl(tmp_path / "raw.jsonl", ["a b c"])
    argv = ["--text_input_path", str(source), "--bin_output_path", str(blocker / "en" / "d.bin")]
    assert tokenize.main([*argv, "--tokenizer_path", demo_tokenizer, "--workers", "1"]) == 2
    _one_line(capsys.readouterr().err, f"{blocker} is a file, where an output folder must go", "--bin_output_path")
    for tool in ("alpaca", "chat"):
        run = _sft_tool(tmp_path, tool, demo_tokenizer)
        for in_the_way in (blocker, blocker / "train" / "en"):  # OUTPUT_DIR, or a split's folder in it
            if blocker.is_dir():
                shutil.rmtree(blocker)
            blocker.unlink(missing_ok=True)
            in_the_way.parent.mkdir(parents=True, exist_ok=True)
            in_the_way.write_text("not a folder")
            before = _tree(tmp_path)
            for overwrite in ((), ("--overwrite",)):
                assert run("--split_ratio", "0.5", *overwrite) == 2
                _one_line(
                    capsys.readouterr().err, f"{in_the_way} is a file, where an output folder must go", "OUTPUT_DIR"
                )
                assert _tree(tmp_path) == before


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden temporary files included, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("tool", ["alpaca", "chat"])
@pytest.mark.parametrize("ratio, kept", [("0", "train"), ("1", "valid")])
def test_overwrite_with_one_split_removes_the_other_split_of_the_earlier_run(
    tmp_path: Path, demo_tokenizer, tool: str, ratio: str, kept: str
) -> None:
    run = _sft_tool(tmp_path, tool, demo_tokenizer)
    assert run() == 0  # both splits
    assert run("--split_ratio", ratio, "--overwrite") == 0
    assert os.listdir(tmp_path / "out") == [kept]
    assert BinMetaFolder(str(tmp_path / "out" / kept)).num_documents == 10


@pytest.mark.parametrize("tool", ["alpaca", "chat"])
def test_one_split_beside_another_runs_other_split_is_refused_without_overwrite(
    tmp_path: Path, demo_tokenizer, capsys, tool: str
) -> None:
    run = _sft_tool(tmp_path, tool, demo_tokenizer)
    assert run("--split_ratio", "0") == 0  # train only
    capsys.readouterr()
    before = _contents(tmp_path / "out")
    assert run("--split_ratio", "1") == 2  # valid only
    _one_line(
        capsys.readouterr().err,
        f"{tmp_path / 'out' / 'train' / 'en' / 'dataset.bin'} is left from an earlier "
        "run, and this run writes no train split; pass --overwrite to remove it",
    )
    assert _contents(tmp_path / "out") == before


def test_alpaca_that_fails_finishing_a_split_leaves_the_earlier_splits_as_they_were(
    tmp_path: Path, demo_tokenizer, capsys, monkeypatch
) -> None:
    """Both splits are staged and moved into place together: never a new valid beside an old train."""
    assert _sft_tool(tmp_path, "alpaca", demo_tokenizer, 10)() == 0
    before = _contents(tmp_path / "out")
    finish = BinWriter._finish

    def disk_full_on_train(writer: BinWriter) -> None:
        if f"{os.sep}train{os.sep}" in writer.bin_path:
            raise OSError(28, "No space left on device")
        finish(writer)

    monkeypatch.setattr(BinWriter, "_finish", disk_full_on_train)
    assert _sft_tool(tmp_path, "alpaca", demo_tokenizer, 20)("--overwrite") == 2
    _one_line(capsys.readouterr().err, "No space left on device")
    assert _contents(tmp_path / "out") == before
    assert sorted(os.listdir(tmp_path)) == ["alpaca.json", "out"]  # no staging folder left


# ---- the trainer's refusals: data.valid_folder, data.min_length, float8 --------------------------


def _bin_data(root: Path) -> list[str]:
    """The flags of a run on a small bin folder at `root`."""
    with BinWriter(str(root / "en" / "d.bin")) as writer:
        for i in range(20):
            writer.write(list(range(1 + i, 40 + i)))
    return ["--data.dataset", "bin", "--data.train_folder", str(root)]


def _refused(tmp_path: Path, capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        train_main([*TINY_ARGS, "--job.dump_folder", str(tmp_path / "run"), *argv])
    assert info.value.code == 2
    return _one_line(capsys.readouterr().err)


def test_a_missing_valid_folder_names_data_valid_folder(tmp_path: Path, capsys) -> None:
    nope = str(tmp_path / "nope")
    err = _refused(
        tmp_path, capsys, *_bin_data(tmp_path / "train"), "--data.valid_folder", nope, "--data.valid_every", "2"
    )
    assert f"data folder {tmp_path / 'nope'} does not exist" in err and "check data.valid_folder" in err
    assert "data.train_folder" not in err


@pytest.mark.slow  # dataloader worker processes
def test_bad_data_met_in_a_dataloader_worker_is_the_same_one_line_as_without_workers(tmp_path: Path, capsys) -> None:
    flags = _bin_data(tmp_path / "train")
    path = tmp_path / "train" / "en" / "d.bin"
    offset = int(BinMetaFolder(str(tmp_path / "train")).files[0].meta[10, 0])
    with open(path, "r+b") as f:  # line 11 of 20: read only when training reaches it
        f.seek(offset)
        f.write(b"XX")
    lines = [
        _refused(tmp_path / f"workers{n}", capsys, *flags, "--training.steps", "20", "--data.num_workers", str(n))
        for n in (0, 1)
    ]
    assert lines[1] == lines[0] and f"{path} line 11 (byte {offset}) is not a JSON object" in lines[0]


def test_a_negative_min_length_names_data_min_length(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        train_main(
            [
                *TINY_ARGS,
                "--job.dump_folder",
                str(tmp_path / "run"),
                *_bin_data(tmp_path / "train"),
                "--data.min_length",
                "-1",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "config error: data.min_length must be >= 0 (0 = keep every document), got -1 (from CLI)\n"


def test_float8_rowwise_with_float8_all_gather_is_refused_whatever_the_world_size(tmp_path: Path, capsys) -> None:
    cfg = load_config([*TINY_ARGS, *_ROWWISE_ALL_GATHER_FLAGS])
    messages = set()
    for world, device in ((1, "cpu"), (2, "cpu"), (2, "cuda")):
        with pytest.raises(ValueError) as info:
            resolve(cfg, world, device)
        messages.add(str(info.value))
    assert messages == {_ROWWISE_ALL_GATHER}  # one rule, one message
    assert "float8.enable_fsdp_float8_all_gather" in _ROWWISE_ALL_GATHER
    assert "float8.recipe_name = 'tensorwise'" in _ROWWISE_ALL_GATHER
    assert _ROWWISE_ALL_GATHER in _refused(tmp_path, capsys, *_ROWWISE_ALL_GATHER_FLAGS)  # one rank, through main


@pytest.mark.multiprocess
def test_float8_rowwise_with_float8_all_gather_is_refused_on_two_ranks_with_the_same_message(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "titanlm.train",
        *TINY_ARGS,
        "--job.dump_folder",
        str(tmp_path / "run"),
        *_ROWWISE_ALL_GATHER_FLAGS,
    ]
    result = subprocess.run(command, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and _ROWWISE_ALL_GATHER in result.stderr, result.stderr[-3000:]


_ROWWISE_ALL_GATHER_FLAGS = [
    "--float8.enable",
    "--float8.recipe_name",
    "rowwise",
    "--float8.enable_fsdp_float8_all_gather",
]
_ROWWISE_ALL_GATHER = (
    "float8.enable_fsdp_float8_all_gather = true needs float8.recipe_name = 'tensorwise', not 'rowwise' (torchao "
    "all-gathers only tensorwise-scaled weights in float8); set float8.recipe_name = 'tensorwise' or "
    "float8.enable_fsdp_float8_all_gather = false"
)
