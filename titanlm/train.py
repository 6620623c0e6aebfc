"""The trainer: config -> mesh -> model -> parallelize -> data -> loop -> metrics.

Run with `torchrun --nproc_per_node N -m titanlm.train --job.config_file X.toml`, through
`scripts/run_train.sh`, or as a plain `python -m titanlm.train` single process.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.tensor.parallel import loss_parallel

from titanlm.checkpoint import CheckpointManager, TrainState
from titanlm.config import ConfigError, JobConfig, config_to_toml, load_config_or_exit
from titanlm.data import build_dataloader, build_valid_dataloader
from titanlm.data.loader import dataset_kind
from titanlm.data.datasets import IGNORE_INDEX, Batch
from titanlm.distributed import (
    INTERRUPTED_EXIT_CODE, USER_ERROR_EXIT_CODE, exit_with_launcher, init_distributed, launched_by_torchrun,
    report_error, set_determinism, shutdown,
)
from titanlm.loss_scaler import DynamicLossScaler
from titanlm.metrics import (
    LOG_FORMAT, MetricsLogger, check_metrics_settings, device_peak_flops, epoch_tokens, peak_memory_gib, plan_line,
)
from titanlm.models import Transformer, count_params
from titanlm.models.spec import resolve_model_spec, warn_beyond_trained_length
from titanlm.models.attention import build_attention_backend
from titanlm.models.transformer import cross_entropy_sum
from titanlm.models.flops import document_lengths, internevo_tflops, training_flops
from titanlm.optim import build_lr_scheduler, build_optimizer
from titanlm.parallel import ParallelDims, ParallelismError, parallelize
from titanlm.parallel.parallelize import autocast_dtype, fsdp_applies, materialize_parallelized
from titanlm.parallel.context_parallel import shard_batch_for_cp
from titanlm.parallel.float8 import check_float8_device, float8_settings, precompute_scales
from titanlm.parallel.grad_norm import clip_grads_, global_grad_norm, scale_grads_
from titanlm.parallel.pipeline import build_schedule, check_pipeline_supported, pipeline_forward, pipeline_parts
from titanlm.validation import validation_metrics

logger = logging.getLogger("titanlm")



def resolve_param_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls on CPUs without AMX run ~45x slower than fp32: CPU defaults to fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


DIVERGED_EXIT_CODE = 3


class TrainingDiverged(RuntimeError):
    """training.max_consecutive_skips steps in a row had an inf/NaN grad norm. Raised on every rank
    alike (the norm is global) at the end of the step, before that step could be saved."""

    def __init__(self, step: int, skips: int, limit: int) -> None:
        super().__init__(
            f"training diverged: the grad norm was inf/NaN on {skips} steps in a row (steps {step - skips + 1}-"
            f"{step}), whose updates were skipped; stopped at step {step} without saving it "
            f"(training.max_consecutive_skips = {limit}). Resume from an earlier checkpoint with a lower "
            "optimizer.lr, or set training.max_consecutive_skips = 0 to never stop"
        )
        self.step, self.skips = step, skips


def check_loop_settings(cfg: JobConfig) -> None:
    """The settings the training loop reads itself, each error naming its key."""
    tr = cfg.training
    if tr.global_batch_size != -1 and tr.global_batch_size < 1:
        raise ConfigError(
            f"training.global_batch_size must be >= 1, or -1 for local_batch_size x data-parallel degree; "
            f"got {tr.global_batch_size}"
        )
    if not math.isfinite(tr.max_norm):
        raise ConfigError(f"training.max_norm must be a finite number (<= 0 = no clipping), got {tr.max_norm!r}")
    if tr.max_consecutive_skips < 0:
        raise ConfigError(
            f"training.max_consecutive_skips must be >= 0 (0 = never stop), got {tr.max_consecutive_skips}"
        )
    if cfg.data.valid_every < 0:
        raise ConfigError(f"data.valid_every must be >= 0 (0 = never), got {cfg.data.valid_every}")


class Trainer:
    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        set_determinism(cfg.debug.seed, cfg.debug.deterministic)

        self.parallel_dims = ParallelDims.from_config(cfg.parallelism, self.dist.world_size)
        self.meshes = self.parallel_dims.build_meshes(self.device.type)
        # Every rank holding different tokens (dp x cp) adds to the step's token count and loss.
        self.loss_group = self.meshes.loss.get_group()
        self.cp_rank = self.meshes.world["cp"].get_local_rank()

        tr = cfg.training
        check_loop_settings(cfg)
        if tr.loss_chunk_tokens and (self.parallel_dims.tp > 1 or self.parallel_dims.pp > 1):
            raise ParallelismError(
                "training.loss_chunk_tokens works without tensor and pipeline parallelism (with TP, loss "
                "parallelism already splits the logits over the vocabulary); set it to 0"
            )
        per_step = tr.local_batch_size * self.parallel_dims.dp
        global_batch = tr.global_batch_size if tr.global_batch_size > 0 else per_step
        if global_batch % per_step:
            raise ValueError(
                f"training.global_batch_size {global_batch} is not a multiple of training.local_batch_size "
                f"{tr.local_batch_size} x data-parallel degree {self.parallel_dims.dp} = {per_step}"
            )
        self.accumulation_steps = global_batch // per_step
        self.global_batch = global_batch

        self.model_spec = resolve_model_spec(cfg.model)
        self.model_args = self.model_spec.args
        warn_beyond_trained_length(self.model_args, tr.seq_len)
        self.dataset_kind = dataset_kind(cfg)  # refuses a data path the run would ignore, before the model is built
        self.param_dtype = resolve_param_dtype(tr.mixed_precision_param, self.device)
        self.loss_scaler = DynamicLossScaler(cfg.grad_scaler) if self.param_dtype == torch.float16 else None
        vocab_sharded = self.parallel_dims.tp > 1 and not cfg.parallelism.disable_loss_parallel
        self.loss_context: Callable[[], AbstractContextManager] = loss_parallel if vocab_sharded else nullcontext
        fsdp = fsdp_applies(self.dist.world_size, cfg.parallelism.fsdp_cpu_offload)
        compute_dtype = autocast_dtype(fsdp, self.param_dtype)
        self.compute_context: Callable[[], AbstractContextManager] = (
            partial(torch.autocast, self.device.type, dtype=compute_dtype) if compute_dtype else nullcontext
        )
        check_float8_device(cfg.float8, self.device)
        check_metrics_settings(cfg)
        self.float8 = float8_settings(cfg.float8, fsdp=fsdp)
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            torch.compile(cross_entropy_sum) if cfg.compile.enable else cross_entropy_sum
        )
        self._pp_loss_factor = 1.0  # loss scale / global label tokens, set before each pipeline step
        self.pp_group = self.meshes.world["pp"].get_group() if self.parallel_dims.pp > 1 else None
        self.model_parts, self.pp_schedule = self._build_model()
        self.model = self.model_parts[0]

        self.optimizer = build_optimizer([p for part in self.model_parts for p in part.parameters()], cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, tr.steps)

        dp_rank = self.meshes.dp.get_local_rank()
        self.dataloader, self.tokenizer = build_dataloader(
            cfg, dp_rank, self.parallel_dims.dp, self.model_args.vocab_size, self.model_spec.tokenizer_path
        )
        self.valid_loader = build_valid_dataloader(cfg, dp_rank, self.parallel_dims.dp, self.model_args.vocab_size)
        # Checkpoints record the tokenizer the run really uses (the demo corpus brings its own).
        self.model_spec = replace(self.model_spec, tokenizer_path=self.tokenizer.path if self.tokenizer else "")
        self.checkpointer = CheckpointManager(
            cfg, self.model_spec, self.model_parts, self.optimizer, self.lr_scheduler, self.dataloader, dp_rank,
            self.device,
        )
        self.peak_flops = device_peak_flops(self.device, self.param_dtype, cfg.metrics.peak_tflops)
        self.metrics = MetricsLogger(cfg, self.dist.is_main)

        self.step = 0
        self.num_consumed_tokens = 0
        self.inf_nan_skip_batches = 0
        self.consecutive_skips = 0  # inf/NaN steps skipped in a row, for training.max_consecutive_skips
        self.warned_zero_grads = False
        if cfg.job.print_config:
            logger.info("resolved configuration:\n" + config_to_toml(cfg))
        if cfg.job.description:
            logger.info(cfg.job.description)
        logger.info(
            f"model {self.model_spec.describe()}: {self.num_params:,} parameters, {self.param_dtype}; "
            f"mesh {dict(zip(self.meshes.world.mesh_dim_names, self.meshes.world.shape))}; device {self.device}; "
            f"global batch {global_batch} x {tr.seq_len} tokens, {self.accumulation_steps} micro-batch(es)/step"
        )
        for line in self._provenance():
            logger.info(line)
        try:
            self.restore(self.checkpointer.load())
        except BaseException:
            self.close()  # a start that fails here (e.g. a damaged checkpoint) gives the folder lock back
            raise
        self.metrics.start(resumed_from_step=self.step)
        logger.info(plan_line(self.step, tr.steps, global_batch, tr.seq_len, epoch_tokens(self.dataloader.dataset)))

    def _provenance(self) -> list[str]:
        """Where the weights, tokenizer and data come from, and what the run writes where."""
        cfg = self.cfg
        data = {
            "demo": f"the demo corpus in {cfg.data.cache_folder}",
            "random": "random tokens (set data.train_folder to train on real data)",
            "bin": f"the tokenized folder {cfg.data.train_folder}",
        }[self.dataset_kind]
        valid = f"; validation on {cfg.data.valid_folder}" if cfg.data.valid_folder else ""
        tokenizer = self.tokenizer.path if self.tokenizer else "none"
        dump = cfg.job.dump_folder
        writes = f"metrics to {os.path.join(dump, 'metrics.jsonl')}"
        logs = f"log and configuration to {os.path.join(dump, 'train.log')}, {os.path.join(dump, 'config.toml')}"
        return [
            f"weights: {self.checkpointer.start_description(cfg.debug.seed)}",
            f"tokenizer: {tokenizer}",
            f"data: {data}{valid}",
            f"writes: {writes}; {self.checkpointer.save_description()}; {logs}",
        ]

    def _build_model(self) -> tuple[list[Transformer], _PipelineSchedule | None]:
        """Meta-device model -> pipeline stages (if any) -> parallelized, materialized parts."""
        cfg = self.cfg
        attention = build_attention_backend(cfg.model.attention_backend, self.device.type)
        with torch.device("meta"):
            model = Transformer(self.model_args, attention)
        self.num_params = count_params(model)
        pp = cfg.parallelism
        if self.parallel_dims.pp > 1:
            check_pipeline_supported(cfg)
            parts, stage_ids, self.pp_stage_owners = pipeline_parts(
                model, self.meshes.world["pp"], pp.pipeline_parallel_schedule,
                pp.pipeline_parallel_virtual_stages, pp.pipeline_parallel_stage_layers,
            )
        else:
            parts = [model]
        for part in parts:
            parallelize(part, self.meshes, cfg, self.param_dtype, self.float8)
            materialize_parallelized(part, self.device, cfg.parallelism.fsdp_cpu_offload)
            part.init_weights(cfg.debug.seed)
            part.train()
        if self.parallel_dims.pp == 1:
            return parts, None
        if self.accumulation_steps < self.parallel_dims.pp:
            raise ParallelismError(
                f"pipeline parallelism runs the step's micro-batches through {self.parallel_dims.pp} stages but "
                f"the step has {self.accumulation_steps}; raise training.global_batch_size to at least "
                f"training.local_batch_size x data-parallel degree x pipeline_parallel_degree = "
                f"{self.cfg.training.local_batch_size * self.parallel_dims.dp * self.parallel_dims.pp}"
            )
        num_stages = len(self.pp_stage_owners)
        self.pp_stage_ids = stage_ids
        self.pp_has_first, self.pp_has_last = 0 in stage_ids, num_stages - 1 in stage_ids
        schedule = build_schedule(
            parts, stage_ids, num_stages, self.meshes.world["pp"], self.device, pp.pipeline_parallel_schedule,
            n_microbatches=self.accumulation_steps,
            loss_fn=lambda output, labels: self.loss_fn(output, labels) * self._pp_loss_factor,
        )
        return parts, schedule

    def _sum_over_loss_group(self, value: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(value, group=self.loss_group)
        return value

    def _prepare(self, batch: Batch) -> Batch:
        """This rank's context-parallel share of a batch, on the device."""
        batch = shard_batch_for_cp(batch, self.cp_rank, self.parallel_dims.cp)
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def forward_backward(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, float]:
        """Accumulate gradients of the global mean token loss; return (that loss, seconds spent).

        Each rank keeps its context-parallel share of every micro-batch. Each share's summed loss is
        divided by the label count of the whole step on all DP x CP ranks, and FSDP (over dp_shard x
        cp) sums gradients, so neither accumulation nor DP or CP size changes the result.
        """
        micro_batches = [self._prepare(mb) for mb in micro_batches]
        label_tokens = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches)
        # A Python number: it divides both plain and vocab-sharded (DTensor) losses.
        global_tokens = max(self._sum_over_loss_group(label_tokens.to(torch.float32)).item(), 1.0)
        scale = self.loss_scaler.scale if self.loss_scaler else 1.0
        loss_total = torch.zeros((), device=self.device)
        start = time.perf_counter()
        if self.pp_schedule is not None:
            loss_total = self._pipeline_forward_backward(micro_batches, global_tokens, scale)
            self._synchronize()
            return self._sum_over_loss_group(loss_total), time.perf_counter() - start
        for mb in micro_batches:
            with self.loss_context():
                with self.compute_context():
                    loss = self._summed_loss(mb) / global_tokens
                (loss * scale).backward()
            loss_total += loss.full_tensor().detach() if isinstance(loss, DTensor) else loss.detach()
        self._synchronize()
        return self._sum_over_loss_group(loss_total), time.perf_counter() - start

    def _summed_loss(self, mb: Batch) -> torch.Tensor:
        inputs = (mb["input_ids"], mb.get("position_ids"), mb.get("document_ids"))
        if self.cfg.training.loss_chunk_tokens:
            # The model computes it, chunk by chunk.
            return self.model(*inputs, labels=mb["labels"], loss_chunk_tokens=self.cfg.training.loss_chunk_tokens)
        return self.loss_fn(self.model(*inputs), mb["labels"])

    def _pipeline_forward_backward(
        self, micro_batches: list[Batch], global_tokens: float, scale: float
    ) -> torch.Tensor:
        """One schedule step over all micro-batches; the loss exists only on the last stage,
        so it is summed over the pp group (other stages contribute zero)."""
        inputs = torch.cat([mb["input_ids"] for mb in micro_batches])
        labels = torch.cat([mb["labels"] for mb in micro_batches])
        # Keyword tensors reach every stage of this rank (split per micro-batch), so later stages
        # get the rope positions and document boundaries that activations do not carry.
        per_stage = {key: torch.cat([mb[key] for mb in micro_batches])
                     for key in ("position_ids", "document_ids") if key in micro_batches[0]}
        self._pp_loss_factor = scale / global_tokens
        losses: list[torch.Tensor] = []
        with self.loss_context():
            self.pp_schedule.step(
                *((inputs,) if self.pp_has_first else ()),
                target=labels if self.pp_has_last else None,
                losses=losses,
                **per_stage,
            )
        loss = torch.zeros((), device=self.device)
        for value in losses:
            loss += (value.full_tensor() if isinstance(value, DTensor) else value).detach() / scale
        dist.all_reduce(loss, group=self.pp_group)
        return loss

    def clip_and_step(self) -> torch.Tensor:
        """Unscale, clip and step; an inf/NaN grad norm skips the update, is counted and warned about."""
        grads = [p.grad for part in self.model_parts for p in part.parameters() if p.grad is not None]
        if self.loss_scaler:
            scale_grads_(grads, 1.0 / self.loss_scaler.scale)
        grad_norm = global_grad_norm(grads, pp_group=self.pp_group)
        norm = grad_norm.item()  # global: every rank takes the same branches below
        finite = math.isfinite(norm)
        # Above its floor, a float16 overflow is the loss scaler finding its level, not divergence.
        calibrating = self.loss_scaler is not None and self.loss_scaler.scale > self.loss_scaler.cfg.min_scale
        if self.loss_scaler:
            self.loss_scaler.update(overflow=not finite)
        if finite or not self.cfg.training.skip_nan_inf_steps:
            if self.cfg.training.max_norm > 0:
                clip_grads_(grads, self.cfg.training.max_norm, grad_norm)
            self.optimizer.step()
            precompute_scales(self.model_parts, self.float8)
            self.consecutive_skips = 0
        else:
            self.inf_nan_skip_batches += 1
            if not calibrating:
                self.consecutive_skips += 1
            self._warn_skipped(norm, calibrating)
        if norm == 0.0:
            self._warn_zero_grads()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return grad_norm

    def _warn_skipped(self, norm: float, calibrating: bool) -> None:
        """One line per skipped step (self.step is still the previous step's number)."""
        if not self.dist.is_main:
            return
        if calibrating:
            logger.warning(
                f"step {self.step + 1}: grad norm is {norm}, update skipped; the float16 loss scale backs off "
                f"(now {self.loss_scaler.scale:g}), not counted toward training.max_consecutive_skips"
            )
            return
        limit = self.cfg.training.max_consecutive_skips
        stop = f"the run stops at {limit}" if limit else "0: the run never stops"
        logger.warning(
            f"step {self.step + 1}: grad norm is {norm}, update skipped ({self.consecutive_skips} in a row; "
            f"training.max_consecutive_skips = {limit}: {stop})"
        )

    def _warn_zero_grads(self) -> None:
        """Once per run: with every gradient exactly zero the step learns nothing."""
        if self.warned_zero_grads or not self.dist.is_main:
            return
        self.warned_zero_grads = True
        cause = (
            f"the float16 gradients underflowed at loss scale {self.loss_scaler.scale:g} (raise "
            "grad_scaler.initial_scale and grad_scaler.min_scale)"
            if self.loss_scaler else "the loss does not depend on the weights"
        )
        logger.warning(
            f"step {self.step + 1}: every gradient is zero (grad norm 0), so the step learns nothing: {cause}, "
            "or none of the step's labels counts toward the loss; check the loss (warned once per run)"
        )

    def check_divergence(self) -> None:
        """Stop once training.max_consecutive_skips steps in a row were skipped, flushing their records."""
        limit = self.cfg.training.max_consecutive_skips
        if limit and self.consecutive_skips >= limit:
            self.metrics.flush()
            raise TrainingDiverged(self.step, self.consecutive_skips, limit)

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float | int | torch.Tensor | None]:
        """One optimizer step; its record keeps loss and grad_norm on the device (read at log time)."""
        start = time.perf_counter()
        lr = self.lr_scheduler.get_last_lr()[0]
        loss, fwd_bwd_time = self.forward_backward(micro_batches)
        grad_norm = self.clip_and_step()
        self._synchronize()
        step_time = time.perf_counter() - start

        self.step += 1
        seq_len = self.cfg.training.seq_len
        step_tokens = self.global_batch * seq_len
        self.num_consumed_tokens += step_tokens
        world = self.dist.world_size
        # This rank's rows stand for 1/dp of the global batch; attention counts real documents.
        local_lengths = [n for mb in micro_batches for n in document_lengths(mb)]
        useful_flops = training_flops(self.model_args, local_lengths) * self.parallel_dims.dp
        return {
            "step": self.step,
            "loss": loss,
            "tgs": step_tokens / world / step_time,
            "tflops": internevo_tflops(
                self.model_args, self.global_batch, seq_len, step_time, world,
                recompute=self.cfg.activation_checkpoint.mode != "none",
            ),
            "mfu": useful_flops / (step_time * world * self.peak_flops) if self.peak_flops else None,
            "lr": lr,
            "loss_scale": self.loss_scaler.scale if self.loss_scaler else 1.0,
            "grad_norm": grad_norm,
            "memory_gib": peak_memory_gib(self.device),
            "num_consumed_tokens": self.num_consumed_tokens,
            "inf_nan_skip_batches": self.inf_nan_skip_batches,
            "fwd_bwd_time": fwd_bwd_time,
            "step_time": step_time,
        }

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def next_micro_batches(self, batches: Iterator[Batch]) -> list[Batch]:
        return [next(batches) for _ in range(self.accumulation_steps)]

    def train_state(self) -> TrainState:
        return TrainState(
            step=self.step,
            num_consumed_tokens=self.num_consumed_tokens,
            inf_nan_skip_batches=self.inf_nan_skip_batches,
            loss_scaler=self.loss_scaler.state_dict() if self.loss_scaler else None,
            consecutive_skips=self.consecutive_skips,
        )

    def restore(self, state: TrainState | None) -> None:
        """Continue from a checkpoint's counters; None (nothing loaded, or weights only) starts at step 0."""
        if state is None:
            return
        self.step, self.num_consumed_tokens = state.step, state.num_consumed_tokens
        self.inf_nan_skip_batches = state.inf_nan_skip_batches
        self.consecutive_skips = state.consecutive_skips
        if self.loss_scaler and state.loss_scaler:
            self.loss_scaler.load_state_dict(state.loss_scaler)

    def train(self) -> list[dict[str, float | int | None]]:
        """Run to `training.steps`, or until a stop file or signal asks to stop after a save; returns
        the records of the logged steps. Raises TrainingDiverged after too many skipped steps in a row."""
        batches = iter(self.dataloader)
        records = []
        log_freq, valid_every = self.cfg.metrics.log_freq, self.cfg.data.valid_every
        logged_samples = self.step * self.global_batch
        while self.step < self.cfg.training.steps:
            wait_start = time.perf_counter()
            micro_batches = self.next_micro_batches(batches)
            data_time = time.perf_counter() - wait_start
            record = {**self.train_step(micro_batches), "data_time": data_time}
            if self.step % log_freq == 0 or self.step == 1 or self.step == self.cfg.training.steps:
                record |= self._type_shares(logged_samples, self.step * self.global_batch)
                logged_samples = self.step * self.global_batch
                records.append(self.metrics.log_step(record))
            else:
                self.metrics.keep_step(record)
            self.check_divergence()  # before step_end, so the diverged step is never saved
            if self.valid_loader is not None and valid_every > 0 and self.step % valid_every == 0:
                self.metrics.log({"step": self.step, **self.validate()})
            if self.checkpointer.step_end(self.train_state()):
                break
        self.metrics.flush()
        return records

    @contextmanager
    def _forward_context(self) -> Iterator[None]:
        with self.loss_context(), self.compute_context():
            yield

    def validate(self) -> dict[str, float]:
        """Loss and perplexity over the whole validation set, overall and per data type."""
        for part in self.model_parts:
            part.eval()
        try:
            return validation_metrics(
                self._validation_logits, self.valid_loader, self._prepare, self._forward_context,
                self.valid_loader.dataset.types, [self.loss_group, self.pp_group], self.device,
            )
        finally:
            for part in self.model_parts:
                part.train()

    def _validation_logits(self, batch: Batch) -> torch.Tensor | None:
        """Logits of a prepared batch; under pipeline parallelism only the last stage's rank has them."""
        extra = {"position_ids": batch.get("position_ids"), "document_ids": batch.get("document_ids")}
        if self.pp_schedule is None:
            return self.model(batch["input_ids"], **extra)
        return pipeline_forward(
            self.model_parts, self.pp_stage_ids, self.pp_stage_owners, self.pp_group, batch["input_ids"], **extra
        )

    def _type_shares(self, start: int, stop: int) -> dict[str, float]:
        """Token share per data type in the global samples [start, stop), to check data.dataset_weights."""
        shares = getattr(self.dataloader.dataset, "type_token_shares", None)
        if shares is None or not self.dist.is_main or stop <= start:
            return {}
        return {f"token_share/{name}": share for name, share in shares(start, stop).items()}

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()


def configure_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=LOG_FORMAT,
        stream=sys.stdout,
        force=True,
    )


# Errors that mean "the input is wrong", raised with a message naming the key or file to fix.
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)


def main(argv: list[str] | None = None) -> None:
    """Train; exit 0, 2 after a user error (one line for the whole job), 3 when training diverged, 130
    after Ctrl-C (see StopRequests)."""
    exit_with_launcher()
    cfg = load_config_or_exit(argv, report=report_error)
    configure_logging(is_main=int(os.environ.get("RANK", "0")) == 0)
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.train()
    except USER_ERRORS as error:
        if os.environ.get("TITANLM_TRACEBACK"):
            raise
        report_error(f"error: {error} (set TITANLM_TRACEBACK=1 for the traceback)")
        sys.exit(USER_ERROR_EXIT_CODE)
    except TrainingDiverged as error:
        report_error(f"error: {error}")
        sys.exit(DIVERGED_EXIT_CODE)
    except KeyboardInterrupt:
        # Ctrl-C while no stop handler listens (start-up): nothing to save. Another one during the
        # clean-up below ends the process at once, without a traceback.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if not launched_by_torchrun():  # under torchrun the launcher has said it
            report_error("interrupted (Ctrl-C); nothing was saved")
        sys.exit(INTERRUPTED_EXIT_CODE)
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()
    stop = trainer.checkpointer.stop
    sys.exit(stop.exit_code if stop is not None else 0)


if __name__ == "__main__":
    main()
