"""The data loaders as the trainer builds them from its plan, for configurations without a whole model."""

from __future__ import annotations

from torchdata.stateful_dataloader import StatefulDataLoader

from titanlm.config import JobConfig
from titanlm.data import Tokenizer, build_dataloader, build_valid_dataloader, load_run_tokenizer
from titanlm.models.spec import resolve_model_spec
from titanlm.plan import DataPlan, resolve_data, resolve_tokenizer


def data_plan(cfg: JobConfig, vocab_size: int) -> DataPlan:
    """The plan's data section for `cfg` and a model of `vocab_size`, validating when a folder is set."""
    return resolve_data(cfg, vocab_size, validates=bool(cfg.data.valid_folder))


def loader_for(
    cfg: JobConfig, dp_rank: int, dp_world_size: int, vocab_size: int
) -> tuple[StatefulDataLoader, Tokenizer | None]:
    """This rank's training loader and the run's tokenizer."""
    data = data_plan(cfg, vocab_size)
    tokenizer = load_run_tokenizer(resolve_tokenizer(cfg, resolve_model_spec(cfg.model), data), data)
    return build_dataloader(data, tokenizer, dp_rank, dp_world_size), tokenizer


def valid_loader_for(cfg: JobConfig, dp_rank: int, dp_world_size: int, vocab_size: int) -> StatefulDataLoader | None:
    return build_valid_dataloader(data_plan(cfg, vocab_size), dp_rank, dp_world_size)
