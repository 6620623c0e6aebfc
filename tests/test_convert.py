"""Checkpoint conversion: HF safetensors <-> titanlm DCP, with transformers as the numerical oracle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from checkpoint_faults import full_disk_for_safetensors
from hf_models import hf_llama, perturb_norms_and_biases
from safetensors.torch import load_file, save_file

from titanlm.checkpoint import manifest
from titanlm.data.tokenizer import export_hf_tokenizer
from titanlm.models import FLAVORS, ModelArgs, Transformer
from titanlm.models.hf_adapter import (
    ConversionError,
    args_from_hf_config,
    from_hf,
    pack_wqkv,
    to_hf,
    unpack_wqkv,
)
from titanlm.tools.convert import main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

GQA = ModelArgs(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=160, vocab_size=300, rope_theta=500000.0, max_seq_len=2048
)
TINY_FLAVORS = {
    "llama3": GQA,
    "internlm": replace(GQA, n_kv_heads=8, attn_bias=True, rope_theta=10000.0, vocab_size=128),
    "internlm2": replace(GQA, rope_theta=1000000.0, vocab_size=256),
}
TOKENS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def tiny_flavors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'tiny' flavor per family, so that --model.flavor can name these test sizes."""
    for family, args in TINY_FLAVORS.items():
        monkeypatch.setitem(FLAVORS[family], "tiny", args)


def _transformers():
    return pytest.importorskip("transformers")


def _titanlm(args: ModelArgs, seed: int) -> Transformer:
    model = Transformer(args)
    model.init_weights(seed)
    perturb_norms_and_biases(model)
    return model


def _save_dcp(model: Transformer, path: Path) -> None:
    """Like a trainer checkpoint: the model under "model", beside other state the tool must skip."""
    state = {"model": model.state_dict(), "train_state": {"step": torch.tensor(7)}}
    dcp.save(state, checkpoint_id=path, no_dist=True)


def _load_dcp(args: ModelArgs, path: Path) -> Transformer:
    model = Transformer(args)
    dcp.load({"model": model.state_dict()}, checkpoint_id=path, no_dist=True)
    return model


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _convert(*argv: object) -> int:
    return main([str(arg) for arg in argv])


def _assert_same_logits(ours: Transformer, hf) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_hf_llama_to_dcp_gives_the_logits_of_transformers(tmp_path: Path, sharded: bool) -> None:
    hf = hf_llama(GQA, seed=0)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB" if sharded else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == sharded

    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "dcp") == 0
    args = args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()), "config.json")
    assert args == GQA
    _assert_same_logits(_load_dcp(args, tmp_path / "dcp"), hf)


@pytest.mark.parametrize("family", sorted(TINY_FLAVORS))
def test_dcp_to_hf_loads_in_stock_transformers_with_the_logits_of_titanlm(tmp_path: Path, family: str) -> None:
    ours = _titanlm(TINY_FLAVORS[family], seed=1)
    _save_dcp(ours, tmp_path / "step-7")

    assert (
        _convert("dcp_to_hf", tmp_path / "step-7", tmp_path / "hf", "--model.name", family, "--model.flavor", "tiny")
        == 0
    )
    hf = _transformers().AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert type(hf).__name__ == "LlamaForCausalLM"
    _assert_same_logits(ours, hf)


def test_hf_to_dcp_to_hf_round_trip_is_bitwise(tmp_path: Path) -> None:
    hf_llama(GQA, seed=2).to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="40KB")

    assert _convert("hf_to_dcp", tmp_path / "src", tmp_path / "dcp") == 0
    assert manifest.damage(str(tmp_path / "dcp"), checksums=True) is None  # checked like a training checkpoint
    assert len(manifest.read_manifest(str(tmp_path / "dcp"))["files"]) >= 3  # .metadata, shard, model record
    assert (
        _convert(
            "dcp_to_hf",
            tmp_path / "dcp",
            tmp_path / "back",
            "--model.name",
            "llama3",
            "--model.flavor",
            "tiny",
            "--max_shard_size",
            "40KB",
        )
        == 0
    )

    original, converted = _read_safetensors(tmp_path / "src"), _read_safetensors(tmp_path / "back")
    assert converted.keys() == original.keys()
    for key, tensor in original.items():
        assert converted[key].dtype == tensor.dtype and torch.equal(converted[key], tensor), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_wqkv_rows_are_grouped_per_kv_head_as_its_q_heads_then_k_then_v() -> None:
    n_heads, n_kv_heads, head_dim, dim = 8, 2, 4, 3

    def heads(first_value: int, count: int) -> torch.Tensor:
        """Rows of head h all equal first_value + h, so each row shows which head it came from."""
        rows = (first_value + torch.arange(count)).repeat_interleave(head_dim)
        return rows[:, None].expand(-1, dim).float()

    wq, wk, wv = heads(100, n_heads), heads(200, n_kv_heads), heads(300, n_kv_heads)
    wqkv = pack_wqkv(wq, wk, wv, n_kv_heads)

    blocks = wqkv.reshape(-1, head_dim, dim)
    assert torch.all(blocks == blocks[:, :1, :1])
    assert blocks[:, 0, 0].tolist() == [100, 101, 102, 103, 200, 300, 104, 105, 106, 107, 201, 301]
    for unpacked, original in zip(unpack_wqkv(wqkv, n_heads, n_kv_heads), (wq, wk, wv)):
        assert torch.equal(unpacked, original)


@pytest.mark.parametrize("n_kv_heads", [2, 8], ids=["gqa", "mha"])
def test_internlm2_packing_round_trip_is_exact_for_weights_and_biases(n_kv_heads: int) -> None:
    args = replace(GQA, n_kv_heads=n_kv_heads, attn_bias=True)
    state = Transformer(args).state_dict()

    packed = to_hf(state, args, "internlm2")
    qkv_rows = (args.n_heads + 2 * n_kv_heads) * args.head_dim
    assert packed["model.layers.1.attention.wqkv.weight"].shape == (qkv_rows, args.dim)
    assert packed["model.layers.1.attention.wqkv.bias"].shape == (qkv_rows,)
    assert not any(".wq." in key for key in packed)

    unpacked = from_hf(packed, args, "internlm2")
    assert unpacked.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(unpacked[key], tensor), key


@pytest.mark.parametrize(
    ("family", "architecture", "attention_key"),
    [
        ("internlm", "InternLMForCausalLM", "model.layers.0.self_attn.q_proj.bias"),
        ("internlm2", "InternLM2ForCausalLM", "model.layers.0.attention.wqkv.weight"),
    ],
)
def test_native_export_reads_back_into_the_same_weights(
    tmp_path: Path, family: str, architecture: str, attention_key: str
) -> None:
    args = TINY_FLAVORS[family]
    ours = _titanlm(args, seed=3)
    _save_dcp(ours, tmp_path / "step-7")

    assert (
        _convert(
            "dcp_to_hf",
            tmp_path / "step-7",
            tmp_path / "hf",
            "--model.name",
            family,
            "--model.flavor",
            "tiny",
            "--layout",
            "native",
        )
        == 0
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (family, [architecture])
    assert attention_key in _read_safetensors(tmp_path / "hf")

    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "dcp", "--model.flavor", "tiny") == 0
    back = _load_dcp(args, tmp_path / "dcp")
    for (key, tensor), original in zip(back.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(tensor, original), key


def test_a_flavor_that_does_not_match_the_hf_weights_is_refused_listing_the_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_llama(GQA, seed=4).save_pretrained(tmp_path / "hf")

    assert (
        _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "dcp", "--model.name", "llama3", "--model.flavor", "debug")
        == 2
    )
    error = capsys.readouterr().err
    assert "--model.flavor debug disagrees with the weights in" in error
    assert "dim: weights 64, flavor 256" in error and "n_layers: weights 2, flavor 4" in error
    assert not (tmp_path / "dcp").exists()


def test_a_norm_epsilon_unlike_the_flavors_is_reported_and_converted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """InternLM v1's HF config says rms_norm_eps 1e-6 where InternEvo (and the flavor) use 1e-5."""
    hf_llama(replace(GQA, norm_eps=1e-6), seed=8).save_pretrained(tmp_path / "hf")
    with caplog.at_level("WARNING"):
        assert (
            _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "dcp", "--model.name", "llama3", "--model.flavor", "tiny")
            == 0
        )
    assert "norm_eps is 1e-06 in its config and 1e-05 in --model.flavor tiny" in caplog.text
    assert (tmp_path / "dcp").exists()


def test_a_flavor_that_does_not_match_the_dcp_weights_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _save_dcp(_titanlm(GQA, seed=5), tmp_path / "step-7")

    assert (
        _convert("dcp_to_hf", tmp_path / "step-7", tmp_path / "hf", "--model.name", "llama3", "--model.flavor", "debug")
        == 2
    )
    error = capsys.readouterr().err
    assert "the model llama3/debug disagrees with the weights in" in error
    assert "dim: weights 64, flavor 256" in error and "n_layers: weights 2, flavor 4" in error
    assert "n_kv_heads * head_dim: weights 16, flavor 128" in error
    assert not (tmp_path / "hf").exists()


def test_missing_and_unexpected_keys_are_listed_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf_llama(GQA, seed=6).save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["lm_head.bias"] = torch.zeros(GQA.vocab_size)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})

    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "dcp") == 2
    error = capsys.readouterr().err
    assert "1 missing keys: model.layers.1.mlp.up_proj.weight" in error
    assert "1 unexpected keys: lm_head.bias" in error


def test_a_non_empty_output_folder_is_refused_unless_overwrite_and_inputs_stay_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_llama(GQA, seed=7).save_pretrained(tmp_path / "hf")
    inputs = {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("not ours")

    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "out") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert not (tmp_path / "out" / ".metadata").exists()
    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "hf", "--overwrite") == 2
    assert "is the input folder" in capsys.readouterr().err

    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "out", "--overwrite") == 2  # not an earlier conversion
    assert "holds files that are not a DCP checkpoint; --overwrite replaces only" in capsys.readouterr().err

    (tmp_path / "out" / "keep.txt").unlink()
    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "out") == 0
    (tmp_path / "out" / "keep.txt").write_text("not ours")
    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "out", "--overwrite") == 0
    assert (tmp_path / "out" / ".metadata").exists() and (tmp_path / "out" / "keep.txt").exists()
    assert {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()} == inputs


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _checkpoint_with_tokenizer(folder: Path, demo_tokenizer: str, seed: int) -> Path:
    """A converted checkpoint as the trainer reads it: the model, its record with the tokenizer, a manifest."""
    hf_llama(GQA, seed=seed).save_pretrained(folder.parent / f"hf-{seed}")
    export_hf_tokenizer(demo_tokenizer, folder.parent / f"hf-{seed}")
    assert _convert("hf_to_dcp", folder.parent / f"hf-{seed}", folder) == 0
    assert (folder / "tokenizer").is_dir() and manifest.damage(str(folder), checksums=True) is None
    return folder


def _run_folder(folder: Path, demo_tokenizer: str) -> Path:
    _checkpoint_with_tokenizer(folder / "step-9", demo_tokenizer, seed=10)
    return folder


def _notes_folder(folder: Path, demo_tokenizer: str) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda folder, tok: _checkpoint_with_tokenizer(folder, tok, seed=10), "is a DCP checkpoint"),
        (_run_folder, "is a run's checkpoint folder"),
        (_notes_folder, "holds files that are not a Hugging Face model folder"),
    ],
    ids=["dcp-step", "run-folder", "other-files"],
)
def test_overwrite_refuses_an_output_folder_that_is_not_an_earlier_export(
    tmp_path: Path, demo_tokenizer: str, capsys: pytest.CaptureFixture[str], make, what: str
) -> None:
    source = _checkpoint_with_tokenizer(tmp_path / "step-7", demo_tokenizer, seed=9)
    out = make(tmp_path / "out", demo_tokenizer)
    before = _contents(out)
    capsys.readouterr()
    assert _convert("dcp_to_hf", source, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: OUT_DIR '{out}' {what}")
    assert "--overwrite replaces only an earlier Hugging Face export or an empty folder" in err
    assert _contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def test_overwrite_replaces_an_earlier_export_and_keeps_files_it_did_not_write(
    tmp_path: Path, demo_tokenizer: str
) -> None:
    source = _checkpoint_with_tokenizer(tmp_path / "step-7", demo_tokenizer, seed=9)
    assert _convert("dcp_to_hf", source, tmp_path / "out", "--max_shard_size", "40KB") == 0
    (tmp_path / "out" / "README.md").write_text("model card")
    assert _convert("dcp_to_hf", source, tmp_path / "out", "--overwrite") == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors" in names and not [n for n in names if n.startswith("model-")]  # no stale shard
    assert "README.md" in names and "tokenizer.model" in names


def _small_disk(tmp_path: Path, options: str) -> Path:
    """A tmpfs mounted with `options`, where this machine lets a test mount one (root on Linux)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
    return mount


def _first_export(tmp_path: Path, demo_tokenizer: str, out: Path) -> tuple[Path, dict[str, bytes]]:
    source = _checkpoint_with_tokenizer(tmp_path / "step-7", demo_tokenizer, seed=9)
    assert _convert("dcp_to_hf", source, out, "--dtype", "bfloat16") == 0
    return source, _contents(out)


def _size(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def test_a_full_disk_is_one_line_and_keeps_the_earlier_export(
    tmp_path: Path, demo_tokenizer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A disk that holds a bfloat16 export, and the tokenizer and half the weights of a float32 one beside it."""
    source, before = _first_export(tmp_path, demo_tokenizer, tmp_path / "first")
    weights = _size(tmp_path / "first", "*.safetensors")
    room = _size(tmp_path / "first") + (_size(tmp_path / "first") - weights) + weights  # float32: twice the weights
    disk = _small_disk(tmp_path, f"size={room // 1024 + 8}k")
    try:
        shutil.copytree(tmp_path / "first", disk / "hf")
        capsys.readouterr()
        assert _convert("dcp_to_hf", source, disk / "hf", "--overwrite", "--dtype", "float32") == 2
        err = capsys.readouterr().err
        after, left = _contents(disk / "hf"), sorted(p.name for p in disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: OUT_DIR '{disk / 'hf'}' cannot be written (No space left on device;")
    assert "the partial output was removed and the earlier files there are untouched" in err
    assert after == before and left == ["hf"]


def test_safetensors_running_out_of_space_is_one_line_naming_the_folder(
    tmp_path: Path, demo_tokenizer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The injected form of the test above, for machines that cannot mount a tmpfs: safetensors reports
    a full disk as a SafetensorError whose message alone carries the OS error."""
    source, before = _first_export(tmp_path, demo_tokenizer, tmp_path / "hf")
    capsys.readouterr()
    with full_disk_for_safetensors():
        assert _convert("dcp_to_hf", source, tmp_path / "hf", "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: OUT_DIR '{tmp_path / 'hf'}' cannot be written (No space left on device;")
    assert _contents(tmp_path / "hf") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("direction", ["dcp_to_hf", "hf_to_dcp"])
def test_a_read_only_file_system_is_one_line_naming_the_folder(
    tmp_path: Path, demo_tokenizer: str, capsys: pytest.CaptureFixture[str], direction: str
) -> None:
    source = _checkpoint_with_tokenizer(tmp_path / "step-7", demo_tokenizer, seed=9)
    source = source if direction == "dcp_to_hf" else tmp_path / "hf-9"
    mount = _small_disk(tmp_path, "ro,size=64k")
    try:
        capsys.readouterr()
        assert _convert(direction, source, mount / "out") == 2
        err = capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert err.count("\n") == 1
    assert (
        err == f"error: OUT_DIR '{mount / 'out'}' cannot be written (Read-only file system: {mount}); nothing was "
        "written; choose another OUT_DIR\n"
    )


def _without_safetensors(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _without_a_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


@pytest.mark.parametrize(
    ("shard_size", "damage", "message"),
    [
        ("1GB", _without_safetensors, "has neither model.safetensors nor model.safetensors.index.json"),
        ("40KB", _without_a_shard, "lists shards missing from"),
    ],
    ids=["no-weights", "missing-shard"],
)
def test_missing_hf_files_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shard_size: str, damage, message: str
) -> None:
    hf_llama(GQA, seed=8).save_pretrained(tmp_path / "hf", max_shard_size=shard_size)
    damage(tmp_path / "hf")
    assert _convert("hf_to_dcp", tmp_path / "hf", tmp_path / "dcp") == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_dcp_metadata_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "step-7").mkdir()
    assert (
        _convert("dcp_to_hf", tmp_path / "step-7", tmp_path / "hf", "--model.name", "llama3", "--model.flavor", "tiny")
        == 2
    )
    assert "has no .metadata file, so it is not a DCP checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "unsupported",
    [
        {"hidden_act": "gelu"},
        {"mlp_bias": True},
        {"rope_scaling": {"rope_type": "yarn", "factor": 8.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
        {"sliding_window": 4096},
        {"head_dim": 16},
    ],
    ids=["gelu", "mlp-bias", "yarn-rope-scaling", "linear-rope-parameters", "sliding-window", "head-dim"],
)
def test_configs_with_features_titanlm_lacks_are_refused(unsupported: dict) -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "intermediate_size": 160,
        "vocab_size": 300,
    } | unsupported
    with pytest.raises(ConversionError, match=next(iter(unsupported))):
        args_from_hf_config(config, "config.json")
