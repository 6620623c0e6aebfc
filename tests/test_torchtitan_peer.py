"""The torchtitan peer's preparation and log parsing, on CPU (the run itself needs CUDA + torchtitan)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from titanlm.tools import torchtitan_peer as peer

# torchtitan 0.2.2's per-step line, colours off (metrics.disable_color_printing = true)
STEP_LINES = """\
[titan] 2026-11-22 12:43:01,348 - root - INFO - Model llama3 titanlm_peer size: 2,557,184 total parameters
[titan] 2026-11-22 12:43:01,540 - root - INFO - Mixed precision training is handled by AMP
[titan] 2026-11-22 12:43:02,573 - root - INFO - step:  1  loss:  8.14087  grad_norm:  0.7732  memory:  1.50GiB(6.00%)  tps: 418  tflops: 0.01  mfu: 0.00%
[titan] 2026-11-22 12:43:03,510 - root - INFO - step:  2  loss:  8.16960  grad_norm:  0.7755  memory: 61.25GiB(77.40%)  tps: 12,546  tflops: 401.20  mfu: 40.57%
[titan] 2026-11-22 12:43:04,317 - root - INFO - \x1b[31mstep:  3  \x1b[32mloss:  8.17784  grad_norm:  0.7934  memory: 60.00GiB(75.00%)  tps: 12,600  tflops: 402.00  mfu: 40.60%\x1b[39m
"""


def ffn_size(dim: int, multiplier: float | None, multiple_of: int) -> int:
    # torchtitan's llama3 FeedForward sizing, restated for the check
    h = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        h = int(multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@pytest.mark.parametrize(
    "dim,ffn", [(4096, 14336), (256, 768), (2048, 8192), (4096, 11008), (8192, 28672), (1000, 100)]
)
def test_ffn_args_give_exact_ffn(dim, ffn):
    multiplier, multiple_of = peer.ffn_args(dim, ffn)
    assert ffn_size(dim, multiplier, multiple_of) == ffn
    if (dim, ffn) == (4096, 14336):
        assert (multiplier, multiple_of) == (1.3, 1024)  # torchtitan's own 8B arguments


def test_parse_log_reads_steps_params_and_precision():
    parsed = peer.parse_log(STEP_LINES)
    assert parsed["n_params"] == 2_557_184
    assert parsed["mixed_precision"].startswith("bf16 autocast")
    assert sorted(parsed["steps"]) == [1, 2, 3]
    assert parsed["steps"][2] == {"loss": 8.1696, "memory_gib": 61.25, "tps": 12546.0, "tflops": 401.2, "mfu": 0.4057}
    assert parsed["steps"][3]["tps"] == 12600.0


def test_error_line_skips_the_launcher_wrapper():
    lines = ["Traceback (most recent call last):", "[rank0]: torch.OutOfMemoryError: CUDA out of memory.",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "]
    assert peer._error_line(lines) == "[rank0]: torch.OutOfMemoryError: CUDA out of memory."


def test_job_config_is_valid_toml(tmp_path: Path):
    config = peer.job_config(work=tmp_path, seq_len=8192, batch=1, total_steps=15, warmup=5,
                             compile=True, ac="selective", float8=True)
    peer.write_toml(tmp_path / "job.toml", config)
    parsed = tomllib.loads((tmp_path / "job.toml").read_text())
    assert parsed["model"]["flavor"] == peer.FLAVOR
    assert parsed["model"]["converters"] == ["quantize.linear.float8"]
    assert parsed["quantize"]["linear"]["float8"] == {"recipe_name": "tensorwise", "filter_fqns": ["output"]}
    assert parsed["training"]["steps"] == 15 and parsed["training"]["seq_len"] == 8192
    assert parsed["activation_checkpoint"]["mode"] == "selective"
    assert parsed["compile"] == {"enable": True, "components": ["model", "loss"]}
    assert parsed["metrics"]["log_freq"] == 1 and parsed["checkpoint"]["enable"] is False
    with pytest.raises(ValueError):
        peer.job_config(work=tmp_path, seq_len=8, batch=1, total_steps=1, warmup=0, compile=False,
                        ac="partial", float8=False)


def test_dataset_and_tokenizer_stay_within_vocab(tmp_path: Path):
    pytest.importorskip("tokenizers", reason="tokenizers (via transformers, dev extra) is not installed")
    from tokenizers import Tokenizer

    corpus = peer.write_dataset(tmp_path / "data", 200)
    first = json.loads(corpus.read_text().splitlines()[0])
    assert isinstance(first["text"], str) and len(first["text"]) > 50
    size = peer.write_tokenizer(tmp_path / "tok", corpus, vocab_size=600)
    assert size <= 600
    tokenizer = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    ids = tokenizer.encode(first["text"]).ids
    assert ids and max(ids) < 600
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert tokenizer.token_to_id(config["bos_token"]) is not None
    assert tokenizer.token_to_id(config["eos_token"]) is not None


def test_run_torchtitan_reports_instead_of_raising(tmp_path: Path):
    result = peer.run_torchtitan(**peer.PRESETS["debug"], seq_len=64, batch=1, steps=2, warmup=1,
                                 compile=False, ac="none", float8=False, work_folder=str(tmp_path))
    # here: torchtitan missing or no CUDA; either way one line, no exception
    assert "error" in result and "\n" not in result["error"]
    assert "log_tail" in result
