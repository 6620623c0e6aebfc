"""Hugging Face models in and out: architecture, tokenizer and weights from a folder (`model.hf_path`),
Llama 3.1 RoPE scaling, tied embeddings, checkpoints that record their model, and exports that
transformers loads. transformers is the oracle throughout (CPU, fp32)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hf_models import hf_llama
from torch.distributed.checkpoint import FileSystemReader
from trainer_runs import REPO, TINY_ARGS, assert_records_close, read_metrics, run_in_process, run_torchrun, worker_env

from titanlm.checkpoint.hf_export import export_hf_folder
from titanlm.config import load_config
from titanlm.data.demo import ensure_demo_assets
from titanlm.data.tokenizer import build_tokenizer, export_hf_tokenizer
from titanlm.errors import MissingFileError
from titanlm.models import FLAVORS, ModelArgs, Transformer, count_params
from titanlm.models.flavors import RopeScaling
from titanlm.models.hf_adapter import args_from_hf_config, hf_config
from titanlm.models.hf_checkpoint import read_hf_model
from titanlm.models.spec import ModelSpec, read_record, resolve_model_spec
from titanlm.tools.convert import main as convert
from titanlm.train import build_trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# head_dim 8: four RoPE frequencies, whose wavelengths (6.3, 167, 4456, 118k) fall in all three bands
# of the llama3 scaling when its original length is 16, shorter than the test sequences.
ODD = ModelArgs(
    dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=136, vocab_size=520, rope_theta=500000.0, max_seq_len=2048
)
SCALED = replace(ODD, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_seq_len=16), max_seq_len=1024)
TIED = replace(SCALED, tie_embeddings=True)
KINDS = {"llama3.0-untied-odd": ODD, "llama3.1-scaled": SCALED, "llama3.2-tied-scaled": TIED}
TOKENS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
NO_FLAVOR = "--model.flavor="  # trainer_runs' TINY_ARGS name the debug flavor; an HF folder decides instead


def _transformers():
    return pytest.importorskip("transformers")


def hf_folder(path: Path, args: ModelArgs, demo_cache: Path, seed: int = 0) -> Path:
    """A random transformers Llama saved with save_pretrained, with the demo SentencePiece tokenizer."""
    path.mkdir(parents=True)
    tokenizer = export_hf_tokenizer(ensure_demo_assets(str(demo_cache)).tokenizer_path, path)
    hf_llama(args, seed, tokenizer.bos_id, tokenizer.eos_id).save_pretrained(path)
    return path


def titanlm_from_hf(path: Path) -> Transformer:
    args, state = read_hf_model(path)
    model = Transformer(args)
    model.load_state_dict(state)
    return model.eval()


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = _transformers().AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_hf_folder_gives_the_logits_of_transformers(tmp_path: Path, demo_cache: Path, kind: str) -> None:
    folder = hf_folder(tmp_path / "hf", KINDS[kind], demo_cache)
    ours = titanlm_from_hf(folder)
    assert ours.args == KINDS[kind]
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(folder, TOKENS), rtol=0, atol=1e-5)


def test_llama3_scaling_changes_the_model_below_its_original_length() -> None:
    """A model without the scaling is another model, even at positions below the original length."""
    scaled, unscaled = Transformer(SCALED), Transformer(replace(SCALED, rope_scaling=None))
    scaled.init_weights(seed=0)
    with torch.no_grad():
        for name, param in scaled.named_parameters():
            if ".wq." in name or ".wk." in name:
                param.mul_(20)  # sharp attention, so that rotations show in the logits
    unscaled.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        assert (scaled(TOKENS[:, :8]) - unscaled(TOKENS[:, :8])).abs().max() > 1e-2


def test_hub_and_transformers_5_spellings_of_rope_scaling_read_alike() -> None:
    hub = hf_config(TIED, "llama", torch.bfloat16)
    assert "rope_scaling" in hub and "rope_theta" in hub
    scaling = hub.pop("rope_scaling")
    v5 = {**hub, "rope_parameters": {**scaling, "rope_theta": hub.pop("rope_theta")}}
    assert args_from_hf_config(hf_config(TIED, "llama", torch.bfloat16), "hub") == TIED
    assert args_from_hf_config(v5, "v5") == TIED


def test_internlm2_native_layout_with_dynamic_scaling_matches_its_llama_export(
    tmp_path: Path, demo_cache: Path
) -> None:
    """InternLM2 has no transformers class: its native folder must give the logits that its
    Llama-layout export gives in transformers."""
    args = replace(ODD, rope_theta=1000000.0, rope_scaling=RopeScaling("dynamic", 2.0), max_seq_len=32768)
    model = Transformer(args)
    model.init_weights(seed=3)
    tokenizer = ensure_demo_assets(str(demo_cache)).tokenizer_path
    spec = ModelSpec("internlm2", args, tokenizer_path=tokenizer)
    for layout in ("native", "llama"):
        (tmp_path / layout).mkdir()
        export_hf_folder(model.state_dict(), spec, tmp_path / layout, torch.float32, layout)
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    assert native["model_type"] == "internlm2" and native["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    from_native = titanlm_from_hf(tmp_path / "native")
    assert from_native.args == args
    with torch.no_grad():
        torch.testing.assert_close(from_native(TOKENS), hf_logits(tmp_path / "llama", TOKENS), rtol=0, atol=1e-5)


def test_new_flavors_have_the_published_parameter_counts() -> None:
    published = {
        ("llama3", "3.1-8B"): 8.03e9,
        ("llama3", "3.1-70B"): 70.55e9,
        ("llama3", "3.1-405B"): 405.85e9,
        ("llama3", "3.2-1B"): 1.236e9,
        ("llama3", "3.2-3B"): 3.213e9,
        ("internlm2", "1.8B"): 1.89e9,
    }
    for (family, flavor), count in published.items():
        with torch.device("meta"):
            model = Transformer(FLAVORS[family][flavor])
        assert abs(count_params(model) - count) / count < 0.002, (family, flavor, count_params(model))
    assert FLAVORS["llama3"]["8B"].rope_scaling is None  # the existing name keeps its meaning


# ---------------------------------------------------------------------------------------------
# Training from a folder, and exporting back


def _train(tmp_path: Path, folder: Path, *extra: str) -> list[dict]:
    return run_in_process(tmp_path / "run", [NO_FLAVOR, "--model.hf_path", str(folder), *extra])


def test_finetune_from_hf_folder_then_export_with_no_flags_loads_in_transformers(
    tmp_path: Path, demo_cache: Path
) -> None:
    folder = hf_folder(tmp_path / "hf", TIED, demo_cache)
    records = _train(tmp_path, folder, "--training.steps", "3", "--checkpoint.enable", "--checkpoint.last_save_in_hf")
    assert len(records) == 3
    step = tmp_path / "run" / "checkpoint" / "step-3"
    assert read_record(step).args == TIED
    assert convert(["dcp_to_hf", str(step), str(tmp_path / "export")]) == 0

    trained = Transformer(TIED)
    trained.load_state_dict(read_hf_model(tmp_path / "export")[1])
    with torch.no_grad():
        assert (trained(TOKENS) - titanlm_from_hf(folder)(TOKENS)).abs().max() > 1e-4  # it did train
        for export in (tmp_path / "export", tmp_path / "run" / "checkpoint" / "step-3-hf"):
            torch.testing.assert_close(hf_logits(export, TOKENS), trained.eval()(TOKENS), rtol=0, atol=1e-5)

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    ours = build_tokenizer(str(folder / "tokenizer.model"))
    assert config["tie_word_embeddings"] and config["rope_scaling"]["rope_type"] == "llama3"
    assert (config["bos_token_id"], config["eos_token_id"], config["max_position_embeddings"]) == (
        ours.bos_id,
        ours.eos_id,
        TIED.max_seq_len,
    )
    hf_tokenizer = _transformers().AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf_tokenizer("12 + 30 = 42").input_ids == ours.encode("12 + 30 = 42", bos=True, eos=False)


def test_tied_embeddings_are_one_parameter_with_one_gradient_saved_once(tmp_path: Path, demo_cache: Path) -> None:
    folder = hf_folder(tmp_path / "hf", TIED, demo_cache)
    cfg = load_config(
        [
            *TINY_ARGS,
            NO_FLAVOR,
            "--model.hf_path",
            str(folder),
            "--job.dump_folder",
            str(tmp_path / "run"),
            "--checkpoint.enable",
            "--training.steps",
            "2",
        ]
    )
    trainer = build_trainer(cfg)
    try:
        model = trainer.model
        assert model.output.weight is model.tok_embeddings.weight
        trainer.train()
        assert model.output.weight is model.tok_embeddings.weight
        assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False))) - 1
    finally:
        trainer.close()
    saved = FileSystemReader(tmp_path / "run" / "checkpoint" / "step-2").read_metadata().state_dict_metadata
    assert "model.tok_embeddings.weight" in saved and "model.output.weight" not in saved
    assert not any(key.startswith("optimizer.state.output.") for key in saved)


def test_tied_checkpoint_resumes_bitwise(tmp_path: Path, demo_cache: Path) -> None:
    folder = hf_folder(tmp_path / "hf", TIED, demo_cache)
    straight = run_in_process(tmp_path / "straight", [NO_FLAVOR, "--model.hf_path", str(folder)])
    common = [NO_FLAVOR, "--model.hf_path", str(folder), "--checkpoint.enable", "--checkpoint.interval", "2"]
    (tmp_path / "stop").write_text("3")  # save at step 3 and stop
    run_in_process(tmp_path / "resumed", [*common, "--checkpoint.stop_file", str(tmp_path / "stop")])
    resumed = run_in_process(tmp_path / "resumed", [*common, "--checkpoint.stop_file", str(tmp_path / "none")])
    assert [r["step"] for r in resumed] == [4, 5]
    for got, want in zip(resumed, straight[3:]):
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"])


@pytest.mark.multiprocess
def test_tied_embeddings_under_fsdp2_and_tp2_match_one_process(tmp_path: Path, demo_cache: Path) -> None:
    folder = hf_folder(tmp_path / "hf", replace(TIED, vocab_size=2048), demo_cache)
    model = [NO_FLAVOR, "--model.hf_path", str(folder)]
    oracle = run_in_process(tmp_path / "one", model)
    runs = run_torchrun(
        2,
        {
            "fsdp2": [*model, "--training.local_batch_size", "2"],
            "fsdp2_full_ac": [*model, "--training.local_batch_size", "2", "--activation_checkpoint.mode", "full"],
            "tp2_loss_parallel": [*model, "--parallelism.tensor_parallel_degree", "2"],
            "cp2": [*model, "--parallelism.context_parallel_degree", "2"],
        },
        tmp_path,
    )
    for records in runs.values():
        assert_records_close(records, oracle)


@pytest.mark.slow
def test_tied_embeddings_compile_and_float8(tmp_path: Path, demo_cache: Path) -> None:
    """Compiled blocks match eager; float8 (every Linear but the tied output) tracks full precision."""
    pytest.importorskip("torchao.float8")
    folder = hf_folder(tmp_path / "hf", replace(TIED, dim=64, n_heads=4, ffn_dim=192), demo_cache)
    model = [NO_FLAVOR, "--model.hf_path", str(folder), "--training.steps", "2"]
    eager = run_in_process(tmp_path / "eager", model)
    assert_records_close(run_in_process(tmp_path / "compiled", [*model, "--compile.enable"]), eager, rtol=1e-5)
    float8 = run_in_process(tmp_path / "float8", [*model, "--float8.enable"])
    assert_records_close(float8, eager, rtol=2e-2)
    assert float8[0]["loss"] != eager[0]["loss"]


# ---------------------------------------------------------------------------------------------
# Wrong starts and bad inputs


def _train_main(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "titanlm.train", *TINY_ARGS, "--job.dump_folder", str(tmp_path / "run"), *argv]
    return subprocess.run(command, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, flags, message",
    [
        (lambda f: _edit_config(f, hidden_act="gelu"), [], "hidden_act='gelu' is not supported"),
        (
            lambda f: _edit_config(f, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}),
            [],
            "rope_parameters type 'yarn' is not supported",
        ),
        (lambda f: (f / "model.safetensors").unlink(), [], "has neither model.safetensors nor"),
        (
            lambda f: [(f / name).unlink() for name in ("tokenizer.json", "tokenizer.model")],
            [],
            "has no tokenizer (tokenizer.json or tokenizer.model)",
        ),
        (lambda f: None, ["--model.flavor", "debug"], "model.flavor = 'debug' disagrees with model.hf_path"),
        (lambda f: None, ["--model.name", "internlm2"], "model.name = 'internlm2' disagrees with model.hf_path"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), [], "cannot be read"),
    ],
    ids=["gelu", "yarn", "no-safetensors", "no-tokenizer", "other-flavor", "other-family", "corrupt-safetensors"],
)
def test_bad_hf_folders_stop_with_one_line_and_write_nothing(
    tmp_path: Path, demo_cache: Path, damage, flags: list[str], message: str
) -> None:
    folder = hf_folder(tmp_path / "hf", ODD, demo_cache)
    damage(folder)
    result = _train_main(tmp_path, NO_FLAVOR, "--model.hf_path", str(folder), *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def test_initial_load_path_loads_without_checkpointing(tmp_path: Path, demo_cache: Path) -> None:
    """A fine-tune must start from the named weights whether or not checkpoints are saved."""
    folder = hf_folder(tmp_path / "hf", replace(ODD, vocab_size=2048, max_seq_len=8192), demo_cache)
    assert convert(["hf_to_dcp", str(folder), str(tmp_path / "dcp")]) == 0
    cfg = load_config(
        [
            *TINY_ARGS,
            "--model.flavor=",
            "--model.hf_path",
            str(folder),
            "--job.dump_folder",
            str(tmp_path / "run"),
            "--checkpoint.initial_load_path",
            str(tmp_path / "dcp"),
            "--checkpoint.load_content",
            "model",
        ]
    )
    random_start = run_in_process(tmp_path / "scratch", ["--model.n_layers", "3"])[0]["loss"]
    trainer = build_trainer(cfg)
    try:
        expected = titanlm_from_hf(folder).state_dict()
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(value, expected[key]), key
        first = trainer.train()[0]["loss"]
    finally:
        trainer.close()
    assert abs(first - random_start) > 1e-3


@pytest.mark.slow
def test_a_data_folder_the_dataset_would_ignore_is_refused(tmp_path: Path) -> None:
    result = _train_main(tmp_path, "--data.dataset", "demo", "--data.train_folder", str(tmp_path))
    assert result.returncode == 2
    assert "data.train_folder" in result.stderr and "data.dataset = 'demo' would not read it" in result.stderr


@pytest.mark.slow
def test_first_log_lines_say_where_weights_tokenizer_and_data_come_from(tmp_path: Path, demo_cache: Path) -> None:
    folder = hf_folder(tmp_path / "hf", ODD, demo_cache)
    result = _train_main(
        tmp_path, NO_FLAVOR, "--model.hf_path", str(folder), "--training.steps", "1", "--checkpoint.enable"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"weights: model from Hugging Face folder {folder}" in result.stdout
    assert f"tokenizer: {folder / 'tokenizer.json'}" in result.stdout  # the export's, beside its tokenizer.model
    assert "data: random tokens" in result.stdout
    assert f"checkpoints to {tmp_path / 'run' / 'checkpoint'}" in result.stdout
    assert read_metrics(tmp_path / "run")[0]["step"] == 1


def test_tokenizer_path_may_name_a_folder_holding_the_tokenizer(tmp_path: Path, demo_cache: Path) -> None:
    folder = hf_folder(tmp_path / "hf", ODD, demo_cache)
    spec = resolve_model_spec(load_config(["--model.tokenizer_path", str(folder)]).model)
    assert spec.tokenizer_path == str(folder / "tokenizer.json")  # the export's, preferred to its tokenizer.model
    with pytest.raises(MissingFileError, match="is a folder without tokenizer.json or tokenizer.model; check model"):
        resolve_model_spec(load_config(["--model.tokenizer_path", str(tmp_path)]).model)


EXPORT_TEXTS = (
    "Hello world",
    "12 + 30 = 42",
    "  two  spaces, a tab\tand\r\nCRLF  ",
    "naïve ünicode ✓, ＦＵＬＬwidth ① and 日本語",
    "emoji 🦙 don't",
    "",
)


def _unigram_model(folder: Path, demo_cache: Path) -> str:
    """A small SentencePiece Unigram model of the demo corpus, byte fallback on."""
    import sentencepiece as spm

    lines = Path(ensure_demo_assets(str(demo_cache)).corpus_path).read_text().splitlines()
    folder.mkdir()
    with open(folder / "unigram.model", "wb") as model:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines[:2000]),
            model_writer=model,
            model_type="unigram",
            vocab_size=400,
            byte_fallback=True,
            minloglevel=2,
        )
    return str(folder / "unigram.model")


@pytest.mark.parametrize(
    "kind",
    [
        "sentencepiece-bpe-demo",
        pytest.param("sentencepiece-bpe-llama2", marks=pytest.mark.slow),  # 32k pieces: ~2 s
        "sentencepiece-unigram",
        pytest.param("tiktoken-llama3", marks=pytest.mark.slow),  # building its 128k merges takes seconds
        "tokenizer.json",
    ],
)
def test_every_exported_tokenizer_loads_in_transformers_and_encodes_as_titanlm(
    tmp_path: Path, demo_cache: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    """A bare SentencePiece or tiktoken file is exported with a tokenizer.json built from it: transformers
    loads that, and it and titanlm, reading the export back, give the ids of the original file."""
    transformers = _transformers()
    if kind == "sentencepiece-bpe-demo":
        source = ensure_demo_assets(str(demo_cache)).tokenizer_path
    elif kind == "sentencepiece-bpe-llama2":
        source = str(request.getfixturevalue("mistral_path"))
    elif kind == "sentencepiece-unigram":
        source = _unigram_model(tmp_path / "unigram", demo_cache)
    elif kind == "tiktoken-llama3":
        source = str(request.getfixturevalue("llama3_path"))
    else:  # a bare tokenizer.json, without the tokenizer_config.json of an HF folder
        from hf_models import write_tiny_tokenizer

        source = str(tmp_path / "tokenizer.json")
        shutil.copy(write_tiny_tokenizer(tmp_path / "tiny"), source)
    (tmp_path / "export").mkdir()
    ours = export_hf_tokenizer(source, tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").is_file()

    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    read_back = build_tokenizer(str(tmp_path / "export" / "tokenizer.json"))
    for text in EXPORT_TEXTS:
        expected = ours.encode(text, bos=True, eos=False)
        assert theirs(text).input_ids == expected, text
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text, bos=False, eos=False), text
        assert read_back.encode(text, bos=True, eos=False) == expected, text
        assert theirs.decode(expected, skip_special_tokens=True) == ours.decode(expected[1:]), text
    assert (read_back.vocab_size, read_back.bos_id, read_back.eos_id) == (ours.vocab_size, ours.bos_id, ours.eos_id)


@pytest.mark.slow
def test_last_save_in_hf_without_checkpoints_is_refused(tmp_path: Path) -> None:
    result = _train_main(tmp_path, "--checkpoint.last_save_in_hf")
    assert result.returncode == 2
    assert "checkpoint.last_save_in_hf exports the final checkpoint, but checkpoint.enable is off" in result.stderr


def test_training_past_dynamic_scaling_length_says_so(tmp_path: Path, demo_cache: Path, caplog) -> None:
    args = replace(ODD, rope_scaling=RopeScaling("dynamic", 2.0), max_seq_len=16)
    folder = hf_folder(tmp_path / "hf", args, demo_cache)
    with caplog.at_level("WARNING"):
        _train(tmp_path, folder, "--training.steps", "1")
    assert "beyond the model's max_position_embeddings 16" in caplog.text
