"""Tests of the tokenizers and the data tools: tokenize, tokenize_alpaca and inspect_data.

Real tokenizer files come from PyPI packages in the dev extra (llama-models: Llama 3's tiktoken
ranks; mistral-common: a Llama-2-layout SentencePiece); tests needing one are skipped, with the
reason, when its package is missing. The rest use the generated demo SentencePiece model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_models import write_tiny_tokenizer

from titanlm import progress
from titanlm.data import ensure_demo_assets
from titanlm.data.binmeta import BinMetaFolder
from titanlm.data.chat_templates import encode_alpaca
from titanlm.data.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    build_tokenizer,
    detect_tokenizer_type,
)
from titanlm.tools import inspect_data, tokenize, tokenize_alpaca

REPO = Path(__file__).resolve().parents[1]


# ---- tokenizers ----------------------------------------------------------------------------


def test_llama3_tiktoken_file_matches_meta_reference(llama3_path):
    tok = build_tokenizer(str(llama3_path))
    assert isinstance(tok, TiktokenTokenizer) and detect_tokenizer_type(str(llama3_path)) == "tiktoken"
    assert tok.encode("Hello world", bos=False, eos=False) == [9906, 1917]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
    assert [tok.token_id(n) for n in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")] == [
        128006,
        128007,
        128009,
    ]
    assert tok.token_id("<|reserved_special_token_245|>") == 128255
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(llama3_path)
    assert tok.special_tokens == meta.special_tokens
    for text in ("naïve ünicode ✓ 12345\n\n  x", "don't <|eot_id|> stop", "a" * 30_000 + " " * 30_000 + "b"):
        assert tok.encode(text) == meta.encode(text, bos=True, eos=True)
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert 128009 not in tok.encode("<|eot_id|>")  # text never turns into a special token


def test_llama2_layout_sentencepiece(mistral_path):
    tok = build_tokenizer(str(mistral_path))
    assert isinstance(tok, SentencePieceTokenizer) and detect_tokenizer_type(str(mistral_path)) == "sentencepiece"
    assert (tok.vocab_size, tok.token_id("<unk>"), tok.bos_id, tok.eos_id) == (32000, 0, 1, 2)
    ids = tok.encode("Hello world\nnaïve ✓")
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "Hello world\nnaïve ✓"
    assert tok.encode_batch(["a b", "c"], bos=False, eos=True) == [
        tok.encode("a b", False, True),
        tok.encode("c", False),
    ]


def test_huggingface_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"])
    hf.train_from_iterator(["hello world, hello tokens"] * 20, trainer)
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    tok = build_tokenizer(path)
    assert isinstance(tok, HuggingFaceTokenizer) and detect_tokenizer_type(path) == "huggingface"
    assert tok.encode("hello world") == [1, *hf.encode("hello world").ids, 2]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    assert build_tokenizer(path).eos_id == 0  # the config beside the file wins over the usual names


def test_bad_tokenizer_files_name_the_file_and_line(tmp_path, demo_tokenizer):
    ranks = tmp_path / "ranks.model"
    ranks.write_bytes(b"IQ== 0\nIg== one\n")
    with pytest.raises(ValueError, match=r"ranks\.model line 2 is not `base64token rank`.*tokenizer_path"):
        build_tokenizer(str(ranks))
    ranks.write_bytes(b"IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match=r"ranks\.model: the 2 ranks are not 0\.\.1"):
        build_tokenizer(str(ranks))
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"{ not json")
    with pytest.raises(ValueError, match=r"junk\.json' as a huggingface tokenizer.*tokenizer_path"):
        build_tokenizer(str(junk))
    with pytest.raises(ValueError, match=r"tokenizer\.model line \d+ is not `base64token rank`.*tokenizer_path"):
        build_tokenizer(demo_tokenizer, kind="tiktoken")  # a SentencePiece file named as tiktoken
    with pytest.raises(ValueError, match="use one of auto, sentencepiece"):
        build_tokenizer(demo_tokenizer, kind="bpe")


# ---- tokenize ------------------------------------------------------------------------------

DOCS = ["the red cat sees a dog.", "1 plus 2 is 3.", "naïve ünicode ✓", "a " * 300 + "end."]


def _write_inputs(folder: Path) -> dict[str, Path]:
    txt = folder / "raw.txt"
    txt.write_text("".join(f"  {d}\n\n" for d in DOCS), encoding="utf-8")  # blank lines are skipped
    jsonl = folder / "raw.jsonl"
    jsonl.write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCS)) + "\n")
    array = folder / "raw.json"
    array.write_text(json.dumps([{"content": d} for d in DOCS], indent=1), encoding="utf-8")
    return {"txt": txt, "jsonl": jsonl, "json": array}


def _run_tokenize(inp: Path, out: Path, tokenizer: str, *extra: str) -> int:
    return tokenize.main(
        ["--text_input_path", str(inp), "--bin_output_path", str(out), "--tokenizer_path", tokenizer, *extra]
    )


@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl"])
def test_tokenize_formats_write_readable_documents_with_bos_eos(tmp_path, demo_tokenizer, fmt, monkeypatch):
    monkeypatch.setattr(tokenize, "_READ_CHARS", 7)  # many refills: records straddle read boundaries
    inp = _write_inputs(tmp_path)[fmt]
    assert _run_tokenize(inp, tmp_path / "data" / "en" / "part.bin", demo_tokenizer, "--workers", "1") == 0
    tok = build_tokenizer(demo_tokenizer)
    data = BinMetaFolder(str(tmp_path / "data"))
    assert [data.read(i).tolist() for i in range(data.num_documents)] == [tok.encode(d) for d in DOCS]
    assert data.read(0)[0] == tok.bos_id and data.read(0)[-1] == tok.eos_id
    assert np.load(tmp_path / "data" / "en" / "part.bin.meta").dtype == np.int32


def test_tokenize_json_file_holding_one_record(tmp_path, demo_tokenizer):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"content": "just one", "meta": [1, 2]}))
    assert _run_tokenize(one, tmp_path / "en" / "d.bin", demo_tokenizer) == 0
    data = BinMetaFolder(str(tmp_path))
    assert data.num_documents == 1 and data.read(0).tolist() == build_tokenizer(demo_tokenizer).encode("just one")


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "tokenizer.json"])
@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl"])
def test_tokenize_reads_a_byte_order_mark_as_no_text(tmp_path, demo_tokenizer, fmt, tokenizer):
    """Windows editors start UTF-8 files with one; a byte-level tokenizer.json would make it 3 token ids."""
    path = demo_tokenizer if tokenizer == "sentencepiece" else str(write_tiny_tokenizer(tmp_path / "tiny"))
    plain = _write_inputs(tmp_path)[fmt]
    with_bom = tmp_path / f"bom.{fmt}"
    with_bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    for source in (plain, with_bom):
        assert _run_tokenize(source, tmp_path / source.stem / "en" / "d.bin", path, "--workers", "1") == 0
    data = BinMetaFolder(str(tmp_path / "bom"))
    assert data.read(0).tolist() == build_tokenizer(path).encode(DOCS[0])
    for suffix in ("", ".meta"):
        assert (tmp_path / "bom" / "en" / f"d.bin{suffix}").read_bytes() == (
            tmp_path / "raw" / "en" / f"d.bin{suffix}"
        ).read_bytes()


def test_tokenize_logs_documents_done_rate_and_tokens_as_plain_lines_off_a_terminal(
    tmp_path, demo_tokenizer, capsys, monkeypatch
):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0)  # a line at every update
    inp = _write_inputs(tmp_path)["jsonl"]
    assert _run_tokenize(inp, tmp_path / "en" / "d.bin", demo_tokenizer, "--workers", "1") == 0
    err = capsys.readouterr().err
    tokens = int(np.load(tmp_path / "en" / "d.bin.meta")[:, 1].sum())
    assert "\r" not in err and re.fullmatch(
        rf"tokenize: {len(DOCS)} doc, [\d.]+doc/s, 00:00 elapsed, {tokens:,} tokens", err.splitlines()[-1]
    )


@pytest.mark.slow
def test_tokenize_matches_internevo_loop_byte_for_byte_with_any_worker_count(tmp_path, demo_cache, monkeypatch):
    assets = ensure_demo_assets(str(demo_cache))
    monkeypatch.setattr(tokenize, "_CHUNK_DOCS", 64)  # many chunks, so the order of results matters
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "en" / "d.bin"
        stats = tokenize.tokenize_file(assets.corpus_path, str(out), assets.tokenizer_path, workers=workers)
        assert stats.documents == 20_000 and stats.tokens > 20_000 * 3
        outputs[workers] = (out.read_bytes(), Path(f"{out}.meta").read_bytes())
        assert sorted(os.listdir(out.parent)) == ["d.bin", "d.bin.meta"]  # no temporary files left
    assert outputs[1] == outputs[2]
    base = tmp_path / "baseline.bin"
    tokenize.tokenize_one_at_a_time(assets.corpus_path, str(base), assets.tokenizer_path)
    assert outputs[1] == (base.read_bytes(), Path(f"{base}.meta").read_bytes())


def test_tokenize_refuses_to_overwrite_and_leaves_nothing_on_bad_input(tmp_path, demo_tokenizer, capsys):
    inputs = _write_inputs(tmp_path)
    out = tmp_path / "en" / "d.bin"
    assert _run_tokenize(inputs["txt"], out, demo_tokenizer) == 0
    before = out.read_bytes()
    assert _run_tokenize(inputs["jsonl"], out, demo_tokenizer) == 2
    assert f"{out} already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert _run_tokenize(inputs["jsonl"], out, demo_tokenizer, "--overwrite") == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "fine"}) + "\n" + json.dumps({"body": "wrong key"}) + "\n")
    fresh = tmp_path / "other" / "d.bin"
    assert _run_tokenize(bad, fresh, demo_tokenizer, "--workers", "2") == 2
    err = capsys.readouterr().err
    assert f"{bad} line 2" in err and 'no key "content" or "text"' in err and "--text_key" in err
    assert not fresh.parent.exists()
    broken = tmp_path / "broken.json"
    broken.write_text('[{"content": "a"}, {"content": ')
    assert _run_tokenize(broken, fresh, demo_tokenizer) == 2
    assert f"{broken}: record 1 is not valid JSON" in capsys.readouterr().err


def test_tokenize_reads_content_else_text_and_names_the_keys_it_looked_for(tmp_path, demo_tokenizer, capsys):
    source = tmp_path / "raw.jsonl"
    records = [{"text": "from text"}, {"content": "from content", "text": "not this"}, {"body": "only with the flag"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records[:2]) + "\n")
    assert _run_tokenize(source, tmp_path / "a" / "en" / "d.bin", demo_tokenizer) == 0
    tok = build_tokenizer(demo_tokenizer)
    data = BinMetaFolder(str(tmp_path / "a"))
    assert [data.read(i).tolist() for i in range(2)] == [tok.encode("from text"), tok.encode("from content")]

    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _run_tokenize(source, tmp_path / "b" / "en" / "d.bin", demo_tokenizer) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f'{source} line 3: no key "content" or "text" (found [\'body\']); name the text field with --text_key' in err
    assert not (tmp_path / "b").exists()
    assert _run_tokenize(source, tmp_path / "b" / "en" / "d.bin", demo_tokenizer, "--text_key", "body") == 2
    assert f'{source} line 1: no key "body"' in capsys.readouterr().err

    with pytest.raises(SystemExit):
        tokenize.main(["--help"])
    assert '"content", else "text", in that order' in " ".join(capsys.readouterr().out.split())


def test_tools_have_help(capsys):
    for tool in (tokenize, tokenize_alpaca, inspect_data):
        with pytest.raises(SystemExit) as info:
            tool.main(["--help"])
        assert info.value.code == 0 and "usage: python -m titanlm.tools." in capsys.readouterr().out


# ---- tokenize_alpaca -----------------------------------------------------------------------


def _alpaca(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Give {i} tips.",
            "input": "" if i % 3 else f"for runner {i}",
            "output": f"Sleep {i} hours.",
        }
        for i in range(n)
    ]


def _run_alpaca(tmp_path: Path, records: list, tokenizer: str, *extra: str, out: str = "sft") -> int:
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(records))
    return tokenize_alpaca.main([str(src), str(tmp_path / out), tokenizer, *extra])


def _split(tmp_path: Path, split: str, out: str = "sft") -> list[list[int]]:
    data = BinMetaFolder(str(tmp_path / out / split))
    assert data.types == ["en"] and data.files[0].path.endswith(f"{split}/en/dataset.bin")
    return [data.read(i).tolist() for i in range(data.num_documents)]


def test_alpaca_masks_prompt_and_splits_exactly_and_disjointly(tmp_path, demo_tokenizer):
    records = _alpaca(25)
    assert _run_alpaca(tmp_path, records, demo_tokenizer, "--split_ratio", "0.3") == 0
    train, valid = _split(tmp_path, "train"), _split(tmp_path, "valid")
    assert (len(train), len(valid)) == (17, 8)  # round(7.5) = 8
    assert np.load(tmp_path / "sft" / "valid" / "en" / "dataset.bin.meta").dtype == np.int64
    tok = build_tokenizer(demo_tokenizer)
    everything = [encode_alpaca(tok, r, i) for i, r in enumerate(records)]
    assert sorted(map(tuple, train + valid)) == sorted(map(tuple, everything))  # disjoint, complete
    for ids, record in zip(everything, records):
        prompt = [t for t in ids if t < 0]
        assert ids[: len(prompt)] == prompt and prompt[0] == -tok.bos_id  # one masked prefix, BOS first
        user = f"{record['instruction']}\n{record['input']}" if record["input"] else record["instruction"]
        assert [-t for t in prompt] == tok.encode(f"<|User|>:{user}<eoh>\n<|Bot|>:", eos=False)
        assert ids[-1] == tok.eos_id and min(ids[len(prompt) :]) > 0
        assert ids[len(prompt) :] == tok.encode(f"{record['output']}<eoa>\n", bos=False)

    assert _run_alpaca(tmp_path, records, demo_tokenizer, "--split_ratio", "0.3", out="again") == 0
    assert _split(tmp_path, "valid", "again") == valid  # same seed, same split
    assert _run_alpaca(tmp_path, records, demo_tokenizer, "--split_ratio", "0.3", "--seed", "1", out="s1") == 0
    assert sorted(_split(tmp_path, "valid", "s1")) != sorted(valid)
    assert _run_alpaca(tmp_path, records, demo_tokenizer, "--max_length", "9", out="short") == 0
    assert {len(d) for d in _split(tmp_path, "train", "short")} == {9}


def test_alpaca_errors_name_the_record(tmp_path, demo_tokenizer, capsys):
    records = _alpaca(4)
    del records[2]["output"]
    assert _run_alpaca(tmp_path, records, demo_tokenizer) == 2
    assert 'record 2: key "output" is missing' in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()
    assert _run_alpaca(tmp_path, [*records[:2], {"instruction": 5, "output": "x"}], demo_tokenizer) == 2
    assert 'record 2: key "instruction" is a int' in capsys.readouterr().err


@pytest.mark.parametrize("max_length", ["0", "-5"])
def test_alpaca_refuses_a_max_length_below_1(tmp_path, demo_tokenizer, capsys, max_length):
    assert _run_alpaca(tmp_path, _alpaca(4), demo_tokenizer, "--max_length", max_length) == 2
    assert capsys.readouterr().err == f"error: --max_length {max_length} must be at least 1\n"
    assert not (tmp_path / "sft").exists()


def test_alpaca_reads_a_null_input_as_an_empty_one(tmp_path, demo_tokenizer):
    records = _alpaca(4)
    assert _run_alpaca(tmp_path, records, demo_tokenizer, "--split_ratio", "0", out="empty") == 0
    nulls = [{**r, "input": r["input"] or None} for r in records]
    assert _run_alpaca(tmp_path, nulls, demo_tokenizer, "--split_ratio", "0", out="null") == 0
    assert _split(tmp_path, "train", "null") == _split(tmp_path, "train", "empty")


def test_alpaca_warns_with_counts_about_empty_outputs_and_samples_cut_inside_their_prompt(
    tmp_path, demo_tokenizer, capsys
):
    records = _alpaca(6)
    records[1]["output"] = records[4]["output"] = ""
    records[2]["instruction"] = records[3]["input"] = records[5]["input"] = "the red cat sees a dog. " * 10
    assert _run_alpaca(tmp_path, records, demo_tokenizer, "--split_ratio", "0", "--max_length", "80") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == [
        'warning: 2 records have an empty "output": only the template\'s end of the answer is trained',
        "warning: 3 samples are cut inside their prompt by --max_length 80, so no response token is left and they "
        "train nothing; raise --max_length",
    ]
    samples = _split(tmp_path, "train")
    assert [i for i, sample in enumerate(samples) if max(sample) < 0] == [2, 3, 5]
    assert _run_alpaca(tmp_path, _alpaca(6), demo_tokenizer, "--split_ratio", "0", out="plain") == 0
    assert "warning" not in capsys.readouterr().out


def test_internlm_template_decodes_to_the_template_text(tmp_path, mistral_path):
    tok = build_tokenizer(str(mistral_path))  # keeps newlines, unlike the demo model's normalizer
    record = {"instruction": "Name a colour.", "input": "Not red.", "output": "Blue."}
    ids = encode_alpaca(tok, record, 0)
    prompt = [-t for t in ids if t < 0]
    assert prompt[0] == tok.bos_id
    assert tok.decode(prompt) == "<|User|>:Name a colour.\nNot red.<eoh>\n<|Bot|>:"
    assert tok.decode(ids[len(prompt) :]) == "Blue.<eoa>\n" and ids[-1] == tok.eos_id
    no_input = [-t for t in encode_alpaca(tok, {**record, "input": ""}, 0) if t < 0]
    assert tok.decode(no_input) == "<|User|>:Name a colour.<eoh>\n<|Bot|>:"


def test_llama3_template_matches_meta_chat_format(tmp_path, llama3_path):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    chat = ChatFormat(MetaTokenizer(llama3_path))
    record = {"instruction": "Name a colour.", "input": "Not red.", "output": "Blue."}
    assert _run_alpaca(tmp_path, [record], str(llama3_path), "--template", "llama3", "--split_ratio", "0") == 0
    (ids,) = _split(tmp_path, "train")
    prompt = chat.encode_dialog_prompt([RawMessage(role="user", content="Name a colour.\n\nNot red.")]).tokens
    reply, _ = chat.encode_message(RawMessage(role="assistant", content="Blue.", stop_reason="end_of_turn"), None)
    assert reply[:4] == prompt[-4:]  # the assistant header ends the prompt; the reply follows it
    assert ids == [-t for t in prompt] + reply[4:]
    assert ids[:2] == [-128000, -128006] and ids[-1] == 128009


def test_llama3_template_needs_llama3_special_tokens(demo_tokenizer):
    record = {"instruction": "Name a colour.", "output": "Blue."}
    with pytest.raises(ValueError, match=re.escape("needs the special token <|begin_of_text|>")):
        encode_alpaca(build_tokenizer(demo_tokenizer), record, 0, "llama3")


# ---- inspect_data --------------------------------------------------------------------------


def test_inspect_data_reports_types_masks_and_samples(tmp_path, demo_tokenizer, capsys):
    assert _run_alpaca(tmp_path, _alpaca(10), demo_tokenizer, "--split_ratio", "0") == 0
    capsys.readouterr()
    args = [str(tmp_path / "sft" / "train"), "--tokenizer", demo_tokenizer, "--samples", "2"]
    assert inspect_data.main([*args, "--validate", "--full"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "en " in out and "masked (negative) tokens:" in out
    assert out.count("--- document") == 2 and "⟦<|User|>:Give 0 tips." in out and "<|Bot|>:⟧" in out


def test_inspect_data_takes_a_tokenizer_folder_as_the_trainer_does(tmp_path, demo_tokenizer, capsys):
    """An HF model or tokenizer folder names its tokenizer, as model.tokenizer_path and tokenize_chat allow."""
    assert _run_alpaca(tmp_path, _alpaca(4), demo_tokenizer, "--split_ratio", "0") == 0
    capsys.readouterr()
    root = str(tmp_path / "sft" / "train")
    assert inspect_data.main([root, "--tokenizer", demo_tokenizer, "--samples", "1"]) == 0
    from_file = capsys.readouterr().out
    assert inspect_data.main([root, "--tokenizer", str(Path(demo_tokenizer).parent), "--samples", "1"]) == 0
    assert capsys.readouterr().out == from_file
    assert inspect_data.main([root, "--tokenizer", str(tmp_path)]) == 2
    assert "is a folder without tokenizer.json or tokenizer.model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["absent"], "data folder {tmp}/absent does not exist or is not a folder; check the ROOT argument"),
        (
            ["absent", "--validate"],
            "data folder {tmp}/absent does not exist or is not a folder; check the ROOT argument",
        ),
        (["sft/train", "--samples", "-1"], "--samples -1 is negative; pass 0 (print no document) or more"),
    ],
    ids=["missing-folder", "missing-folder-validate", "negative-samples"],
)
def test_inspect_data_bad_arguments_are_one_line_and_status_2(tmp_path, demo_tokenizer, capsys, argv, message):
    assert _run_alpaca(tmp_path, _alpaca(4), demo_tokenizer, "--split_ratio", "0") == 0
    capsys.readouterr()
    assert inspect_data.main([str(tmp_path / argv[0]), *argv[1:]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {message.format(tmp=tmp_path)}\n"


@pytest.mark.slow
def test_inspect_data_validate_exits_1_listing_problems(tmp_path, demo_tokenizer):
    assert _run_alpaca(tmp_path, _alpaca(5), demo_tokenizer, "--split_ratio", "0") == 0
    bin_path = tmp_path / "sft" / "train" / "en" / "dataset.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-3])
    result = subprocess.run(
        [sys.executable, "-m", "titanlm.tools.inspect_data", str(tmp_path / "sft" / "train"), "--validate"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    assert "1 problem(s)" in result.stdout and f"{bin_path} does not end with a newline" in result.stdout
