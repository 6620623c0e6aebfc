"""What a checkpoint holds, how each part is read back, and the check that it fits this run.

A checkpoint is one DCP state dict with five top-level parts:

    model         parameters by fully-qualified name; FSDP shards are DTensors, so DCP reshards them
                  to any data-parallel layout on load
    optimizer     AdamW moments, step counts and hyper-parameters, one entry per parameter name
    lr_scheduler  LambdaLR's counters
    dataloader    {"dp_rank_<r>": pickled StatefulDataLoader state} per data-parallel rank
    train_state   step, consumed tokens, skipped batches, loss scale, RNG (see train_state.py)

The data state is per DP rank because each rank reads its own share of the stream; DCP keeps one
copy of a key that several ranks save, which is right for the TP/CP/PP peers of one DP rank.
Parameter names are those of the unsplit model, so one checkpoint fits every parallel layout.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchdata.stateful_dataloader import StatefulDataLoader

from titanlm.checkpoint.single_process import unreadable_reason
from titanlm.checkpoint.train_state import TrainState
from titanlm.errors import CheckpointError
from titanlm.models.flavors import ModelArgs
from titanlm.models.hf_adapter import check_model_matches
from titanlm.models.hf_checkpoint import Mismatch, mismatch_line, natural_key, read_hf_model, tensor_mismatch
from titanlm.plan import CHECKPOINT_PARTS

logger = logging.getLogger("titanlm")

PARTS = CHECKPOINT_PARTS
_DATA_KEY = "dp_rank_"
# Optimizer entries keyed per parameter ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), not per param
# group: a group's list of parameters differs between pipeline stages but would be saved under one key.
_OPTIMIZER = StateDictOptions(flatten_optimizer_state_dict=True)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Values under nested dicts, named the way DCP flattens them ("optimizer.state.<param>.exp_avg").
    DCP would also descend into lists holding tensors or dicts; no part of a titanlm checkpoint has one."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def union(parts: list[nn.Module]) -> nn.Module:
    """This rank's model parts as one module that keeps the parts' parameter names.

    Pipeline stages are copies of the whole model without the other stages' layers, so their
    names are disjoint and equal to the unsplit model's: a checkpoint then fits any pipeline
    layout. DCP's state-dict functions want one module owning all of the optimizer's parameters.
    """
    if len(parts) == 1:
        return parts[0]
    view = nn.Module()
    for part in parts:
        for name, child in part.named_children():
            if isinstance(child, nn.ModuleDict):  # the layers, split between stages
                if name not in view._modules:
                    view.add_module(name, nn.ModuleDict())
                view.get_submodule(name).update(child)
            else:
                view.add_module(name, child)
    return view


class TrainingContent:
    """The live objects a checkpoint is taken from and restored into."""

    def __init__(
        self,
        model_parts: list[nn.Module],
        optimizer: Optimizer,
        lr_scheduler: LRScheduler,
        dataloader: StatefulDataLoader,
        dp_rank: int,
    ) -> None:
        self.model = union(model_parts)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.dataloader = dataloader
        self.dp_rank = dp_rank

    def state_dict(self, train_state: TrainState) -> dict[str, Any]:
        """Everything, for a checkpoint that resumes exactly. Model tensors are the live parameters:
        DCP must have copied or written them before the next optimizer step."""
        model, optimizer = get_state_dict(self.model, self.optimizer, options=_OPTIMIZER)
        return {
            "model": model,
            "optimizer": optimizer,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "dataloader": {f"{_DATA_KEY}{self.dp_rank}": pickle.dumps(self.dataloader.state_dict())},
            "train_state": train_state.state_dict(),
        }

    def model_state_dict(self, dtype: torch.dtype) -> dict[str, Any]:
        """The weights alone, cast to `dtype`: an export for fine-tuning, evaluation or conversion to HF."""
        return {"model": {name: value.to(dtype) for name, value in get_model_state_dict(self.model).items()}}

    def load(self, path: str, parts: tuple[str, ...], fix: str) -> TrainState | None:
        """Restore `parts` from the DCP checkpoint at `path`; the TrainState when it is among them.

        Everything is checked against the checkpoint's metadata first, so a checkpoint that does not
        fit fails, naming its offending keys, before any tensor is read. `fix` completes the error
        raised when whole parts are absent.
        """
        saved = FileSystemReader(path).read_metadata().state_dict_metadata
        present = sorted({key.split(".", 1)[0] for key in saved})
        absent = [part for part in parts if part not in present]
        if absent:
            raise CheckpointError(f"{path} holds no {', '.join(absent)} (it holds {', '.join(present)}); {fix}")
        target = self._targets(parts, saved)
        _check_fits(path, saved, target)
        try:
            dcp.load(target, checkpoint_id=path)
        except CheckpointException as error:
            raise CheckpointError(
                f"{path} could not be read ({unreadable_reason(error)}); it is damaged or incomplete: move it aside "
                "and resume from an earlier checkpoint, or save it again"
            ) from None
        return self._apply(target)

    def load_hf(self, path: str, parts: tuple[str, ...], args: ModelArgs) -> None:
        """Load the weights of a Hugging Face model folder (safetensors + config.json) into a model of `args`.

        Every rank reads the full tensors and keeps its own shard, so loading needs one full copy
        of the weights in each rank's CPU memory. For very large models convert once to DCP
        (`python -m titanlm.tools.convert hf_to_dcp`): training then reads only each rank's shards.
        """
        if parts != ("model",):
            raise CheckpointError(
                f"checkpoint.initial_load_path {path} is a Hugging Face model, which holds weights only; "
                "set checkpoint.load_content = model"
            )
        hf_args, state = read_hf_model(path)
        fix = "start from weights of the same architecture, or set model.hf_path to that folder"
        check_model_matches("this run's model", args, f"the Hugging Face model in {path}", hf_args, fix)
        mine = set(get_model_state_dict(self.model))  # a pipeline stage holds only its own layers
        state = {key: value for key, value in state.items() if key in mine}
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def _targets(self, parts: tuple[str, ...], saved: Mapping[str, Any]) -> dict[str, Any]:
        """State dicts shaped like the saved parts, for DCP to fill in place."""
        target: dict[str, Any] = {}
        if "model" in parts:
            target["model"] = get_model_state_dict(self.model)
        if "optimizer" in parts:
            # On a fresh optimizer this runs one zero-lr step to create its state; the load overwrites it.
            target["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIMIZER)
        if "lr_scheduler" in parts:
            target["lr_scheduler"] = self.lr_scheduler.state_dict()
        if "dataloader" in parts:
            target["dataloader"] = {self._data_key(saved): b""}
        if "train_state" in parts:
            target["train_state"] = TrainState().state_dict()
        return target

    def _data_key(self, saved: Mapping[str, Any]) -> str:
        """This DP rank's data state, or rank 0's when the checkpoint had fewer DP ranks.

        The dataset's state names a global sample position, so the dataset maps rank 0's state to
        this rank's share; at the same DP degree each rank simply gets its own.
        """
        own = f"{_DATA_KEY}{self.dp_rank}"
        if f"dataloader.{own}" in saved:
            return own
        saved_ranks = sum(key.startswith(f"dataloader.{_DATA_KEY}") for key in saved)
        logger.warning(
            f"the checkpoint holds data state for {saved_ranks} DP rank(s), none for DP rank {self.dp_rank}: "
            "resuming this rank from DP rank 0's position"
        )
        return f"{_DATA_KEY}0"

    def _apply(self, target: dict[str, Any]) -> TrainState | None:
        if "model" in target:
            set_model_state_dict(self.model, target["model"])
        if "optimizer" in target:
            set_optimizer_state_dict(self.model, self.optimizer, target["optimizer"], options=_OPTIMIZER)
        if "lr_scheduler" in target:
            self.lr_scheduler.load_state_dict(target["lr_scheduler"])
        if "dataloader" in target:
            (blob,) = target["dataloader"].values()
            self.dataloader.load_state_dict(pickle.loads(blob))
        if "train_state" not in target:
            return None
        state = TrainState()
        state.load_state_dict(target["train_state"])  # last: it also restores the RNG
        return state


def _shape(value: Any) -> tuple[int, ...]:
    """The shape of a tensor, or of its stored metadata; () for anything else (bytes, counters)."""
    if isinstance(value, TensorStorageMetadata):
        return tuple(value.size)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _check_fits(path: str, saved: Mapping[str, Any], target: dict[str, Any]) -> None:
    """Raise one CheckpointError listing every entry the checkpoint lacks, every tensor it holds in
    another shape, and every model tensor it holds that the model (all ranks' parts) does not have.

    A collective: under pipeline parallelism each rank holds only some layers, and every rank must
    take the same decision, or the ones that go on would wait for the others in dcp.load.
    """
    wanted = {key: _shape(value) for key, value in _leaves(target)}
    # Saved entries this load does not take (parts not asked for, other DP ranks' data) are no mismatch.
    models = "model" in target
    stored = {key: _shape(meta) for key, meta in saved.items() if key in wanted or models and key.startswith("model.")}
    reports: list[Mismatch] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(reports, tensor_mismatch(stored, wanted))
    # Missing or misshapen on any rank is so for the run; unexpected only when no rank's part has it.
    found = {
        "missing keys": sorted({key for r in reports for key in r["missing keys"]}, key=natural_key),
        "unexpected keys": sorted(set.intersection(*(set(r["unexpected keys"]) for r in reports)), key=natural_key),
        "wrong shapes": sorted({key for r in reports for key in r["wrong shapes"]}, key=natural_key),
    }
    line = mismatch_line(
        f"the entries of {path}",
        found,
        "Was it saved with another model.name or model.flavor? Use the saving run's model settings, or convert "
        "the checkpoint",
    )
    if line:
        raise CheckpointError(line)
