"""Tests for titanlm.config: precedence, CLI parsing, errors, --help, sanity checks and TOML dumps."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

import pytest

from titanlm.config import ConfigError, JobConfig, config_to_dict, config_to_toml, load_config, manager
from titanlm.config.job_config import opt
from titanlm.config.manager import load_config_or_exit


def write_toml(tmp_path, text: str, name: str = "job.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def all_keys(cfg: JobConfig) -> list[tuple[str, dataclasses.Field]]:
    return [(s.name, f) for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def config_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- precedence -----------------------------------------------------------------------------


def test_no_args_gives_dataclass_defaults():
    assert load_config([]) == JobConfig()


def test_argv_defaults_to_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--training.steps", "7"])
    assert load_config().training.steps == 7


def test_toml_overrides_defaults(tmp_path):
    path = write_toml(tmp_path, '[training]\nsteps = 30\n[model]\nname = "internlm2"\n')
    cfg = load_config(["--job.config_file", path])
    assert cfg.training.steps == 30
    assert cfg.model.name == "internlm2"
    assert cfg.training.seq_len == JobConfig().training.seq_len
    assert cfg.job.config_file == path


@pytest.mark.parametrize("style", ["space", "equals"])
def test_cli_overrides_toml(tmp_path, style):
    path = write_toml(tmp_path, "[training]\nsteps = 30\nseq_len = 64\n")
    if style == "space":
        argv = ["--job.config_file", path, "--training.steps", "5"]
    else:
        argv = [f"--job.config_file={path}", "--training.steps=5"]
    cfg = load_config(argv)
    assert cfg.training.steps == 5
    assert cfg.training.seq_len == 64


def test_last_cli_flag_wins():
    assert load_config(["--training.steps", "3", "--training.steps=4"]).training.steps == 4


# --- value conversion -----------------------------------------------------------------------


def test_bool_flag_alone_means_true():
    cfg = load_config(["--job.print_config", "--training.steps", "3"])
    assert cfg.job.print_config is True
    assert cfg.training.steps == 3
    assert load_config(["--checkpoint.enable"]).checkpoint.enable is True


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--training.skip_nan_inf_steps", "false"], False),
        (["--training.skip_nan_inf_steps=false"], False),
        (["--training.skip_nan_inf_steps", "0"], False),
        (["--training.skip_nan_inf_steps=No"], False),
        (["--training.skip_nan_inf_steps", "yes"], True),
        (["--training.skip_nan_inf_steps=TRUE"], True),
    ],
)
def test_bool_explicit_values(argv, expected):
    assert load_config(argv).training.skip_nan_inf_steps is expected


def test_int_and_float_conversion(tmp_path):
    cfg = load_config(["--training.steps", "12", "--optimizer.lr", "2", "--metrics.peak_tflops", "-2.5"])
    assert cfg.training.steps == 12 and type(cfg.training.steps) is int
    assert cfg.optimizer.lr == 2.0 and type(cfg.optimizer.lr) is float
    assert cfg.metrics.peak_tflops == -2.5
    path = write_toml(tmp_path, "[optimizer]\nlr = 1\neps = 1e-8\n")
    cfg = load_config(["--job.config_file", path])
    assert cfg.optimizer.lr == 1.0 and type(cfg.optimizer.lr) is float
    assert cfg.optimizer.eps == 1e-8


def test_negative_number_is_a_value_not_a_flag(tmp_path):
    path = write_toml(tmp_path, "[parallelism]\ndata_parallel_shard_degree = 2\n")
    cfg = load_config(["--job.config_file", path, "--parallelism.data_parallel_shard_degree", "-1"])
    assert cfg.parallelism.data_parallel_shard_degree == -1


@dataclass
class Lists:
    ids: list[int] = opt([1, 2], "some ints")
    names: list[str] = opt([], "some strings")


@dataclass
class ListConfig(JobConfig):
    lists: Lists = field(default_factory=Lists)


@pytest.fixture
def list_config(monkeypatch):
    """JobConfig plus a section of list fields (none exist today; the loader supports them)."""
    monkeypatch.setattr(manager, "JobConfig", ListConfig)
    manager._schema.cache_clear()
    yield
    manager._schema.cache_clear()


def test_list_fields_from_cli_and_toml(list_config, tmp_path):
    assert load_config([]).lists == Lists()
    cfg = load_config(["--lists.ids", "3, 4", "--lists.names=a,b"])
    assert cfg.lists.ids == [3, 4] and cfg.lists.names == ["a", "b"]
    assert load_config(["--lists.ids="]).lists.ids == []
    path = write_toml(tmp_path, '[lists]\nids = [5, 6]\nnames = ["x"]\n')
    assert load_config(["--job.config_file", path]).lists == Lists(ids=[5, 6], names=["x"])
    assert "lists.ids must be an integer, got 'x' (from CLI)" in config_error(["--lists.ids", "1,x"])
    bad = write_toml(tmp_path, "[lists]\nids = 5\n", "bad.toml")
    assert "lists.ids must be a list of int" in config_error(["--job.config_file", bad])
    bad = write_toml(tmp_path, '[lists]\nids = [1, "a"]\n', "bad2.toml")
    assert "lists.ids must be an integer, got 'a'" in config_error(["--job.config_file", bad])
    cfg = load_config(["--lists.ids", "7,8", "--lists.names", 'q"uote,back\\slash'])
    dumped = write_toml(tmp_path, config_to_toml(cfg), "dump.toml")
    cfg.job.config_file = dumped
    assert load_config(["--job.config_file", dumped]) == cfg


@pytest.mark.parametrize(
    "key,toml_list,text,expected",
    [
        ("data.dataset_weights", '["en:0.7", "code:0.3"]', "en:0.7, code:0.3", ["en:0.7", "code:0.3"]),
        ("checkpoint.load_content", '["model", "optimizer"]', "model,optimizer", ["model", "optimizer"]),
        ("parallelism.pipeline_parallel_stage_layers", "[3, 5, 5, 3]", "3,5, 5,3", [3, 5, 5, 3]),
    ],
)
def test_list_settings_take_a_toml_list_or_a_comma_string_alike(tmp_path, key, toml_list, text, expected):
    section, name = key.split(".")

    def value(argv: list[str]) -> object:
        return getattr(getattr(load_config(argv), section), name)

    listed = write_toml(tmp_path, f"[{section}]\n{name} = {toml_list}\n", "list.toml")
    comma = write_toml(tmp_path, f'[{section}]\n{name} = "{text}"\n', "comma.toml")
    assert value(["--job.config_file", listed]) == expected
    assert value(["--job.config_file", comma]) == expected
    assert value([f"--{key}", text]) == expected
    cfg = load_config(["--job.config_file", comma])
    dumped = write_toml(tmp_path, config_to_toml(cfg), "dump.toml")  # a run's config.toml, read again on resume
    cfg.job.config_file = dumped
    assert load_config(["--job.config_file", dumped]) == cfg


def test_list_settings_default_to_empty_or_all():
    cfg = load_config([])
    assert cfg.data.dataset_weights == [] and cfg.parallelism.pipeline_parallel_stage_layers == []
    assert cfg.checkpoint.load_content == ["all"]


def test_a_malformed_list_element_names_the_key(tmp_path):
    key = "parallelism.pipeline_parallel_stage_layers"
    assert config_error([f"--{key}", "3,x"]) == f"{key} must be an integer, got 'x' (from CLI)"
    comma = write_toml(tmp_path, '[parallelism]\npipeline_parallel_stage_layers = "3, x"\n', "comma.toml")
    assert config_error(["--job.config_file", comma]) == f"{key} must be an integer, got 'x' (from {comma})"
    listed = write_toml(tmp_path, '[data]\ndataset_weights = ["en:0.7", 0.3]\n', "list.toml")
    expected = f"data.dataset_weights must be a string, got 0.3 (from {listed})"
    assert config_error(["--job.config_file", listed]) == expected


# --- errors ---------------------------------------------------------------------------------


def test_unknown_section_cli_suggests_closest():
    message = config_error(["--trainig.steps", "3"])
    assert "'trainig'" in message and "did you mean 'training'?" in message and "CLI" in message


def test_unknown_section_toml_names_file_and_suggests(tmp_path):
    path = write_toml(tmp_path, "[trainig]\nsteps = 3\n")
    message = config_error(["--job.config_file", path])
    assert "'trainig'" in message and path in message and "did you mean 'training'?" in message


def test_unknown_section_without_close_match_lists_sections():
    message = config_error(["--zzzzzz.steps", "3"])
    assert "valid sections:" in message and "lr_scheduler" in message


def test_unknown_key_suggests_closest_in_section(tmp_path):
    message = config_error(["--training.stpes", "3"])
    assert "unknown key 'training.stpes' (from CLI); did you mean 'training.steps'?" == message
    path = write_toml(tmp_path, "[optimizer]\nbeta = 0.9\n")
    message = config_error(["--job.config_file", path])
    assert "'optimizer.beta'" in message and path in message and "did you mean 'optimizer.beta" in message


def test_unknown_key_without_close_match_lists_section_keys():
    message = config_error(["--training.zzzz", "1"])
    assert "'training.zzzz'" in message
    assert all(f.name in message for f in dataclasses.fields(JobConfig().training))


def test_option_without_section_suggests_the_full_name():
    message = config_error(["--steps", "3"])
    assert "--training.steps" in message


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--training.steps", "abc"], "training.steps must be an integer, got 'abc' (from CLI)"),
        (["--training.steps=2.5"], "training.steps must be an integer, got '2.5'"),
        (["--optimizer.lr", "fast"], "optimizer.lr must be a number, got 'fast'"),
        (["--job.print_config", "maybe"], "job.print_config must be a boolean"),
        (["--job.print_config=maybe"], "job.print_config must be a boolean"),
    ],
)
def test_wrong_type_from_cli(argv, needle):
    assert needle in config_error(argv)


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[training]\nsteps = 2.5\n", "training.steps must be an integer, got 2.5"),
        ("[training]\nsteps = true\n", "training.steps must be an integer, got True"),
        ('[optimizer]\nlr = "big"\n', "optimizer.lr must be a number"),
        ("[job]\nprint_config = 1\n", "job.print_config must be a boolean"),
        ("[model]\nflavor = 8\n", "model.flavor must be a string"),
    ],
)
def test_wrong_type_from_toml_names_file(tmp_path, toml, needle):
    path = write_toml(tmp_path, toml)
    message = config_error(["--job.config_file", path])
    assert needle in message and path in message


def test_value_not_in_choices(tmp_path):
    message = config_error(["--model.name", "gpt"])
    assert message.startswith("model.name must be one of \"\", llama3, internlm, internlm2; got 'gpt'")
    path = write_toml(tmp_path, '[optimizer]\nimplementation = "cuda"\n')
    message = config_error(["--job.config_file", path])
    assert "optimizer.implementation must be one of auto, fused, foreach, for-loop" in message
    assert path in message
    assert load_config(["--activation_checkpoint.mode", "full"]).activation_checkpoint.mode == "full"


def test_choices_cover_their_defaults_and_only_string_fields():
    with_choices = [(s, f) for s, f in all_keys(JobConfig()) if f.metadata["choices"]]
    assert {"model.name", "training.mixed_precision_param", "activation_checkpoint.mode"} <= {
        f"{s}.{f.name}" for s, f in with_choices
    }
    for section, f in with_choices:
        assert f.type == "str", f"{section}.{f.name}"
        assert f.default in f.metadata["choices"], f"{section}.{f.name}"


@pytest.mark.parametrize("argv", [["--training.steps"], ["--training.steps", "--model.name", "llama3"]])
def test_missing_value(argv):
    assert "missing value after --training.steps" in config_error(argv)


def test_positional_argument_is_an_error():
    assert "unexpected argument 'train.toml'" in config_error(["train.toml"])


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    message = config_error(["--job.config_file", path])
    assert path in message and "does not exist" in message


def test_invalid_toml_names_file_and_parser_message(tmp_path):
    path = write_toml(tmp_path, "[training]\nsteps = = 3\n")
    message = config_error(["--job.config_file", path])
    assert path in message and "invalid TOML" in message and "line 2" in message


def test_a_toml_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[training]\nsteps = 7\n")
    assert load_config(["--job.config_file", str(path)]).training.steps == 7


def test_a_toml_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[job]\ndescription = "caf\xe9"\n'.encode("latin-1"))
    message = config_error(["--job.config_file", str(path)])
    assert str(path) in message and "invalid TOML" in message


def test_toml_section_must_be_a_table(tmp_path):
    path = write_toml(tmp_path, "training = 3\n")
    message = config_error(["--job.config_file", path])
    assert "'training'" in message and "must be a table" in message and path in message


def test_load_config_or_exit_prints_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        load_config_or_exit(["--training.stpes", "3"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("config error: unknown key 'training.stpes'")
    assert load_config_or_exit(["--training.steps", "3"]).training.steps == 3


# --- sanity checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, bad",
    [
        ("training.steps", "0"),
        ("training.seq_len", "0"),
        ("training.local_batch_size", "0"),
        ("metrics.log_freq", "0"),
        ("checkpoint.interval", "0"),
        ("checkpoint.keep_latest_k", "-1"),
        ("parallelism.data_parallel_replicate_degree", "0"),
        ("parallelism.data_parallel_replicate_degree", "-1"),
        ("parallelism.data_parallel_shard_degree", "0"),
        ("parallelism.data_parallel_shard_degree", "-2"),
        ("parallelism.tensor_parallel_degree", "-1"),
        ("parallelism.pipeline_parallel_degree", "0"),
        ("parallelism.context_parallel_degree", "-1"),
        ("lr_scheduler.warmup_steps", "-1"),
        ("lr_scheduler.warmup_ratio", "1.0"),
        ("lr_scheduler.warmup_ratio", "-0.1"),
        ("lr_scheduler.min_lr_factor", "1.5"),
        ("lr_scheduler.min_lr_factor", "-0.5"),
    ],
)
def test_out_of_range_values(key, bad):
    message = config_error([f"--{key}", bad])
    assert message.startswith(f"{key} must be ") and "(from CLI)" in message


def test_a_range_error_names_the_file_that_set_the_value(tmp_path):
    path = write_toml(tmp_path, "[optimizer]\nbeta2 = 1.0\n")
    assert config_error(["--job.config_file", path]) == f"optimizer.beta2 must be in [0, 1), got 1.0 (from {path})"


def test_boundary_values_are_accepted():
    cfg = load_config(
        [
            "--training.steps=1",
            "--checkpoint.keep_latest_k=0",
            "--parallelism.data_parallel_shard_degree=-1",
            "--lr_scheduler.warmup_ratio=0.99",
            "--lr_scheduler.min_lr_factor=1",
        ]
    )
    assert cfg.lr_scheduler.min_lr_factor == 1.0


def test_warmup_steps_and_ratio_are_exclusive(tmp_path):
    path = write_toml(tmp_path, "[lr_scheduler]\nwarmup_ratio = 0.1\n")
    message = config_error(["--job.config_file", path, "--lr_scheduler.warmup_steps", "10"])
    assert "set one of lr_scheduler.warmup_steps or lr_scheduler.warmup_ratio" in message
    assert path in message
    assert load_config(["--job.config_file", path]).lr_scheduler.warmup_ratio == 0.1


# --- --help and dumps -----------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_field_and_exits_0(capsys, flag):
    with pytest.raises(SystemExit) as info:
        load_config(["--training.steps", "3", flag])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m titanlm.train [-h] [--job.config_file FILE.toml]")
    for section, f in all_keys(JobConfig()):
        assert f"--{section}.{f.name} " in out
        assert f"[{section}]" in out
    assert "(int, default: 100)  number of optimizer steps [must be >= 1]" in out
    assert '[choices: "", llama3, internlm, internlm2]' in out


def test_config_to_dict_holds_every_value_as_plain_json_data():
    cfg = load_config(
        ["--training.steps", "7", "--model.name", "internlm", "--data.dataset_weights", "en:0.7,code:0.3"]
    )
    data = config_to_dict(cfg)
    assert {(section, key) for section, keys in data.items() for key in keys} == {
        (section, f.name) for section, f in all_keys(cfg)
    }
    for section, f in all_keys(cfg):
        assert data[section][f.name] == getattr(getattr(cfg, section), f.name), f"{section}.{f.name}"
    assert data["training"]["steps"] == 7 and data["model"]["name"] == "internlm"
    assert data["data"]["dataset_weights"] == ["en:0.7", "code:0.3"]
    assert json.loads(json.dumps(data)) == data  # logs and JSON dumps carry it unchanged
    data["data"]["dataset_weights"].append("cn:1")
    assert cfg.data.dataset_weights == ["en:0.7", "code:0.3"]  # a copy, not the live config


def test_config_to_toml_round_trips(tmp_path):
    cfg = load_config(
        [
            "--job.description",
            'tab\there "quoted" back\\slash\nnewline \x7f ünï 🚀',
            "--model.name=internlm",
            "--optimizer.eps=1e-8",
            "--optimizer.lr=3.0000000000000004e-4",
            "--grad_scaler.max_scale=1e300",
            "--metrics.peak_tflops=inf",
            "--checkpoint.enable",
            "--training.skip_nan_inf_steps=false",
            "--parallelism.data_parallel_shard_degree=4",
        ]
    )
    path = write_toml(tmp_path, config_to_toml(cfg))
    cfg.job.config_file = path
    assert load_config(["--job.config_file", path]) == cfg
