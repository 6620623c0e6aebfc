"""A model named by settings or flags that is not the model some weights, config.json or record hold is
refused in one wording: what was named, what holds the other model, every difference, and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from titanlm.models.flavors import get_model_args
from titanlm.models.hf_adapter import ModelMismatchError, check_model_matches, model_mismatch
from titanlm.models.spec import ModelSpec, checkpoint_spec, read_record, write_record


def test_the_mismatch_error_lists_every_difference_and_the_fix() -> None:
    error = model_mismatch("--model.flavor 8B", "the weights in x", ["dim: weights 256, flavor 4096", "b"], "drop it")
    assert str(error) == "--model.flavor 8B disagrees with the weights in x (dim: weights 256, flavor 4096; b); drop it"
    debug = get_model_args("llama3", "debug")
    check_model_matches("same", debug, "itself", debug, "nothing")  # the same architecture passes
    with pytest.raises(ModelMismatchError, match=r"^named disagrees with src \(dim: weights 256, flavor 4096; "):
        check_model_matches("named", get_model_args("llama3", "8B"), "src", debug, "fix")


def test_flags_that_disagree_with_a_checkpoint_record_are_refused(tmp_path: Path) -> None:
    write_record(tmp_path, ModelSpec("llama3", get_model_args("llama3", "debug"), "debug"))
    record = f"{tmp_path}/titanlm_model.json"
    with pytest.raises(ModelMismatchError) as name:
        checkpoint_spec(tmp_path, "internlm2", None)
    assert str(name.value) == f"--model.name internlm2 disagrees with {record} (it records a llama3 model); drop it"
    with pytest.raises(
        ModelMismatchError, match=r"^--model.flavor 8B disagrees with .*\(dim: weights 256, flavor 4096;"
    ):
        checkpoint_spec(tmp_path, None, "8B")
    assert checkpoint_spec(tmp_path, "llama3", "debug") == read_record(tmp_path)
