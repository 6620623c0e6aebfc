"""The torchtitan peer's preparation, launch and log parsing, on CPU.

No test launches torchtitan: the real run needs CUDA and torchtitan and takes minutes (it is
`benchmarks/gpu_checks.sh titan`). The launch is checked against a stand-in for torchrun that prints
torchtitan's log lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from benchmarks import torchtitan_peer as peer

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
    lines = [
        "Traceback (most recent call last):",
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory.",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    ]
    assert peer._error_line(lines) == "[rank0]: torch.OutOfMemoryError: CUDA out of memory."


def test_job_config_is_valid_toml(tmp_path: Path):
    work = tmp_path / 'a "quoted" \\ wörk'  # paths are written as TOML strings
    config = peer.job_config(
        work=work, seq_len=8192, batch=1, total_steps=15, warmup=5, compile=True, ac="selective", float8=True
    )
    peer.write_toml(tmp_path / "job.toml", config)
    parsed = tomllib.loads((tmp_path / "job.toml").read_text())
    assert parsed["model"]["flavor"] == peer.FLAVOR
    assert parsed["job"]["dump_folder"] == str(work / "outputs")
    assert parsed["optimizer"]["lr"] == 3e-4 and parsed["optimizer"]["eps"] == 1e-8
    assert parsed["model"]["converters"] == ["quantize.linear.float8"]
    assert parsed["quantize"]["linear"]["float8"] == {"recipe_name": "tensorwise", "filter_fqns": ["output"]}
    assert parsed["training"]["steps"] == 15 and parsed["training"]["seq_len"] == 8192
    assert parsed["activation_checkpoint"]["mode"] == "selective"
    assert parsed["compile"] == {"enable": True, "components": ["model", "loss"]}
    assert parsed["metrics"]["log_freq"] == 1 and parsed["checkpoint"]["enable"] is False
    with pytest.raises(ValueError):
        peer.job_config(
            work=tmp_path, seq_len=8, batch=1, total_steps=1, warmup=0, compile=False, ac="partial", float8=False
        )


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


def _forbid_launch(*args, **kwargs):
    raise AssertionError("torchtitan was launched")


def _pretend_torchtitan_is_installed(monkeypatch, installed: bool) -> None:
    find_spec, spec = importlib.util.find_spec, object() if installed else None
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, package=None: spec if name == "torchtitan" else find_spec(name, package),
    )


def test_run_torchtitan_without_torchtitan_reports_and_launches_nothing(tmp_path: Path, monkeypatch):
    _pretend_torchtitan_is_installed(monkeypatch, False)
    monkeypatch.setattr(peer.subprocess, "Popen", _forbid_launch)
    result = peer.run_torchtitan(
        **peer.PRESETS["debug"],
        seq_len=64,
        batch=1,
        steps=2,
        warmup=1,
        compile=False,
        ac="none",
        float8=False,
        work_folder=str(tmp_path),
    )
    assert result["error"] == "torchtitan is not installed (pip install torchtitan==0.2.2)"


def test_run_torchtitan_without_cuda_reports_and_launches_nothing(tmp_path: Path, monkeypatch):
    import torch

    _pretend_torchtitan_is_installed(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(peer.subprocess, "Popen", _forbid_launch)
    result = peer.run_torchtitan(
        **peer.PRESETS["debug"],
        seq_len=64,
        batch=1,
        steps=2,
        warmup=1,
        compile=False,
        ac="none",
        float8=False,
        work_folder=str(tmp_path),
    )
    assert result["error"] == "torchtitan needs CUDA and none is available"


class FakeTorchrun:
    """Stands in for the torchrun launch: prints STEP_LINES and exits 0."""

    launched: list[tuple[list[str], dict]] = []

    def __init__(self, argv: list[str], **kwargs) -> None:
        FakeTorchrun.launched.append((argv, kwargs))
        self.stdout = iter(STEP_LINES.splitlines(keepends=True))
        self.pid, self.returncode = -1, None

    def wait(self, timeout: float | None = None) -> int:
        self.returncode = 0
        return 0


def test_run_torchtitan_launches_the_runner_and_reads_its_log(tmp_path: Path, monkeypatch):
    pytest.importorskip("tokenizers", reason="tokenizers (via transformers, dev extra) is not installed")
    import torch

    _pretend_torchtitan_is_installed(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(peer.subprocess, "Popen", FakeTorchrun)
    FakeTorchrun.launched.clear()
    result = peer.run_torchtitan(
        **peer.PRESETS["debug"],
        seq_len=64,
        batch=1,
        steps=2,
        warmup=1,
        compile=False,
        ac="none",
        float8=False,
        work_folder=str(tmp_path),
    )
    assert "error" not in result, result
    [(argv, kwargs)] = FakeTorchrun.launched
    assert argv[argv.index("-m", 2) : argv.index("-m", 2) + 3] == ["-m", "benchmarks.torchtitan_peer", "--runner"]
    assert kwargs["cwd"] == str(peer.REPO_ROOT) and (peer.REPO_ROOT / "benchmarks" / "torchtitan_peer.py").exists()
    assert str(peer.REPO_ROOT) in kwargs["env"]["PYTHONPATH"].split(os.pathsep)
    # steps 2 and 3 come after the one warm-up step
    assert result["tps_timed"] == [12546.0, 12600.0] and result["tokens_per_s"] == 12573.0
    assert result["mfu"] == pytest.approx(0.40585) and result["peak_memory_gib"] == 61.25
    assert result["n_params"] == 2_557_184 and result["steps_timed"] == 2
    assert (tmp_path / "job.toml").exists() and (tmp_path / "torchtitan.log").read_text() == STEP_LINES
