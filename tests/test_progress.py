"""Progress of long tools: a live bar on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from titanlm.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_plain_lines_with_count_rate_and_eta():
    log = io.StringIO()
    with progress(total=4, desc="tokenize", unit="doc", file=log, interval=0) as bar:
        for _ in range(4):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("tokenize: 4/4 doc (100%), ") and "doc/s" in lines[-1] and "ETA" in lines[-1]
    assert all(line == line.rstrip() and line.startswith("tokenize: ") for line in lines)
    assert [line.split(" doc")[0] for line in lines] == [f"tokenize: {n}/4" for n in range(5)]  # each count once


def test_off_a_terminal_an_unknown_total_gives_count_and_rate_without_eta():
    log = io.StringIO()
    for _ in progress(iter(range(3)), desc="tokenize", unit="doc", file=log, interval=0):
        pass
    last = log.getvalue().splitlines()[-1]
    assert last.startswith("tokenize: 3 doc, ") and "doc/s" in last and "ETA" not in last


def test_off_a_terminal_a_run_shorter_than_the_interval_writes_nothing():
    log = io.StringIO()
    with progress(total=3, desc="tokenize", file=log, interval=60) as bar:
        bar.update(3)
    assert log.getvalue() == ""


def test_on_a_terminal_progress_is_a_redrawn_bar():
    terminal = _Terminal()
    with progress(total=2, desc="tokenize", unit="doc", file=terminal) as bar:
        bar.update(2)
    assert "\r" in terminal.getvalue() and "2/2" in terminal.getvalue()


def test_converting_weights_shows_the_bytes_written_and_read(tmp_path, monkeypatch, capsys):
    import torch

    from titanlm import progress as progress_module
    from titanlm.models.hf_checkpoint import _load_safetensors, write_safetensors

    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)
    state = {f"w{i}": torch.zeros(256) for i in range(4)}  # 1 KiB each: 4 shards of 1 KiB
    files = write_safetensors(state, tmp_path, shard_bytes=1024)
    assert len(files) == 5  # and the index
    assert "write: 4.10k/4.10k B (100%)" in capsys.readouterr().err
    assert torch.equal(_load_safetensors(files[0])["w0"], state["w0"])
