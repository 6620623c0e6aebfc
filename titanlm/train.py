"""The trainer: resolve the plan, build what it names, run the loop.

`titanlm.plan.resolve` makes every decision from the config, the world size and the device, and is
the only reader of the whole configuration. The Trainer gets the plan and builds the mesh, the model
parts (`build_model_parts`), the step (`LocalStep` or `PipelineStep`), the optimizer update, the data
and the checkpointer from it, then loops: data -> step -> update -> metrics -> checkpoint.

Run with `torchrun --nproc_per_node N -m titanlm.train --job.config_file X.toml`, through
`scripts/run_train.sh`, or as a plain `python -m titanlm.train` single process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator

import torch

from titanlm.checkpoint import CheckpointManager, TrainState
from titanlm.checkpoint.rank0 import on_rank0
from titanlm.config import JobConfig, load_config_or_exit
from titanlm.data import build_dataloader, build_valid_dataloader, load_run_tokenizer
from titanlm.data.datasets import Batch
from titanlm.distributed import (
    DistInfo,
    env_rank,
    exit_with_launcher,
    init_distributed,
    launched_by_torchrun,
    report_error,
    set_determinism,
    shutdown,
    traceback_requested,
)
from titanlm.errors import INTERRUPTED_EXIT_CODE, USER_ERROR_EXIT_CODE, TitanlmError, TrainingDiverged
from titanlm.loss_scaler import build_loss_scaler
from titanlm.metrics import LOG_FORMAT, MetricsLogger, Throughput, epoch_tokens, plan_line
from titanlm.models.transformer import param_count
from titanlm.optim import build_lr_scheduler, build_optimizer, continue_schedule
from titanlm.parallel.parallelize import build_model_parts
from titanlm.plan import RunPlan, resolve
from titanlm.step import build_model_step
from titanlm.stop import StopRequests, check_stop_file
from titanlm.update import OptimizerUpdate
from titanlm.validation import validation_metrics

logger = logging.getLogger("titanlm")


class Trainer:
    def __init__(self, plan: RunPlan, dist: DistInfo) -> None:
        """Build everything `plan` names on this process of the job `dist` describes."""
        self.plan = plan
        self.dist = dist
        self.device = dist.device
        set_determinism(plan.debug.seed, plan.debug.deterministic)
        meshes = plan.dims.build_meshes(self.device.type)
        self.model_parts = build_model_parts(plan, meshes, self.device, plan.debug.seed)
        self.model = self.model_parts[0]
        self.model_step = build_model_step(plan, self.model_parts, meshes, self.device)
        params = [p for part in self.model_parts for p in part.parameters()]
        self.optimizer = build_optimizer(params, plan.optimizer, plan.optimizer_implementation)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, plan.lr_scheduler, plan.loop.steps)
        self.loss_scaler = build_loss_scaler(plan.grad_scaler, enabled=plan.precision.loss_scaling)
        self.update = OptimizerUpdate(
            plan,
            plan.training,
            self.model_parts,
            self.optimizer,
            self.lr_scheduler,
            self.loss_scaler,
            self.model_step.pp_group,
            self.dist.is_main,
        )
        dp_rank = meshes.dp.get_local_rank()
        self.tokenizer = load_run_tokenizer(plan.tokenizer, plan.data)
        self.dataloader = build_dataloader(plan.data, self.tokenizer, dp_rank, plan.dims.dp)
        self.valid_loader = build_valid_dataloader(plan.data, dp_rank, plan.dims.dp)
        # Before the checkpointer, which locks (and may create) the folders: a refused start writes nothing.
        on_rank0(lambda: check_stop_file(plan.checkpoint.stop_file))  # before any folder is locked or created
        self.stop_requests = StopRequests(plan.checkpoint.stop_file, self.dist.is_main, self.device)
        self.checkpointer = CheckpointManager(
            plan.checkpoint,
            plan.model,
            self.model_parts,
            self.optimizer,
            self.lr_scheduler,
            self.dataloader,
            dp_rank,
            self.device,
        )
        self.metrics = MetricsLogger(plan.output, plan.loop.steps, self.dist.is_main)
        self.throughput = Throughput(plan, self.device)
        self.step = 0
        self.num_consumed_tokens = 0
        try:
            self._announce()
            self.restore(self.checkpointer.load())
            self.stop_requests.listen()  # not before: a Ctrl-C while loading has nothing to save
            self.metrics.start(resumed_from_step=self.step)
        except BaseException:
            self.close()  # a start that fails here (e.g. a damaged checkpoint) gives the folder lock back
            raise
        batch = plan.batch
        logger.info(
            plan_line(
                self.step,
                plan.loop.steps,
                batch.global_batch_size,
                batch.seq_len,
                epoch_tokens(self.dataloader.dataset),
            )
        )

    def _announce(self) -> None:
        """The first log lines: what runs, where the weights, tokenizer and data come from, what is written."""
        plan, data, output = self.plan, self.plan.data, self.plan.output
        if output.print_config:
            logger.info("resolved configuration:\n" + output.config_toml)
        if output.description:
            logger.info(output.description)
        if self.dist.is_main:
            for note in plan.notes:
                logger.warning(note)
        logger.info(
            f"model {plan.model.describe()}: {param_count(plan.model_args):,} float32 parameters computing in "
            f"{str(plan.precision.param_dtype).removeprefix('torch.')}; mesh {plan.dims.sizes()}; device "
            f"{self.device}; global batch "
            f"{plan.batch.global_batch_size} x {plan.batch.seq_len} tokens, {plan.batch.accumulation_steps} "
            "micro-batch(es)/step"
        )
        source = {
            "demo": f"the demo corpus in {data.cache_folder}",
            "random": "random tokens (set data.train_folder to train on real data)",
            "bin": f"the tokenized folder {data.train_folder}",
        }[data.kind]
        valid = f"; validation on {data.valid_folder} every {plan.loop.valid_every} steps" if data.valid_folder else ""
        dump = output.dump_folder
        logger.info(f"weights: {self.checkpointer.start.describe(plan.debug.seed)}")
        tokenizer = f"{plan.tokenizer.path} (from {plan.tokenizer.origin})" if plan.tokenizer else "none"
        logger.info(f"tokenizer: {tokenizer}")
        logger.info(f"data: {source}{valid}")
        logger.info(
            f"writes: metrics to {os.path.join(dump, 'metrics.jsonl')}; {self.checkpointer.save_description()}; "
            f"log and configuration to {os.path.join(dump, 'train.log')}, {os.path.join(dump, 'config.toml')}"
        )

    def train_step(self, micro_batches: list[Batch], timed: bool = True) -> dict[str, float | int | torch.Tensor]:
        """One optimizer step. Loss and grad norm stay on the device (read at log time); `timed` steps
        (the logged ones) wait for the device to measure their time and throughput, the others do not."""
        start = self.throughput.now(timed)
        lr = self.lr_scheduler.get_last_lr()[0]
        loss = self.model_step.forward_backward(micro_batches, self.loss_scaler.scale)
        fwd_bwd_time = self.throughput.now(timed) - start
        grad_norm = self.update(self.step + 1)
        step_time = self.throughput.now(timed) - start
        self.step += 1
        self.num_consumed_tokens += self.plan.batch.tokens_per_step
        speed = self.throughput.of(micro_batches, step_time) if timed else {}
        return {
            "step": self.step,
            "loss": loss,
            **{key: speed[key] for key in ("tgs", "tflops", "mfu") if timed},
            "lr": lr,
            "loss_scale": self.loss_scaler.scale,
            "grad_norm": grad_norm,
            **({"memory_gib": speed["memory_gib"]} if timed else {}),
            "num_consumed_tokens": self.num_consumed_tokens,
            "inf_nan_skip_batches": self.update.skipped,
            **({"fwd_bwd_time": fwd_bwd_time} if timed else {}),
            "step_time": step_time,
        }

    def next_micro_batches(self, batches: Iterator[Batch]) -> list[Batch]:
        return [next(batches) for _ in range(self.plan.batch.accumulation_steps)]

    def train_state(self) -> TrainState:
        return TrainState(
            step=self.step,
            num_consumed_tokens=self.num_consumed_tokens,
            inf_nan_skip_batches=self.update.skipped,
            loss_scaler=self.loss_scaler.state_dict(),
            consecutive_skips=self.update.consecutive_skips,
            schedule=self.plan.schedule,
        )

    def restore(self, state: TrainState | None) -> None:
        """Continue from a checkpoint's counters; None (nothing loaded, or weights only) starts at step 0."""
        if state is None:
            return
        self.step, self.num_consumed_tokens = state.step, state.num_consumed_tokens
        self.update.skipped, self.update.consecutive_skips = state.inf_nan_skip_batches, state.consecutive_skips
        self.loss_scaler.load_state_dict(state.loss_scaler)
        self._warn_schedule_changes(state.schedule or {})
        continue_schedule(self.lr_scheduler, self.plan.optimizer.lr, self.step)

    def _warn_schedule_changes(self, saved: dict[str, float | int | str]) -> None:
        """Say which settings that shape the run differ from the checkpoint's: the schedule follows this
        run's from the first resumed step, and a changed global batch changes what a step means."""
        if not self.dist.is_main:
            return
        for key, now in self.plan.schedule.items():
            before = saved.get(key, now)
            if before == now:
                continue
            if key == "training.global_batch_size":
                logger.warning(
                    f"training.global_batch_size is {now} at world size {self.plan.world_size}, but the checkpoint "
                    f"trained with {before} samples per step; set training.global_batch_size = {before} to keep it"
                )
            else:
                logger.warning(
                    f"{key} is {now} in this run but {before} in the checkpoint: the learning-rate schedule follows "
                    f"{key} = {now} from step {self.step + 1} on"
                )

    def train(self) -> list[dict[str, float | int | None]]:
        """Run to `training.steps`, or until a stop file or signal asks to stop after a save; returns
        the records of the logged steps. Raises TrainingDiverged after too many skipped steps in a row."""
        batches = iter(self.dataloader)
        records = []
        loop, global_batch = self.plan.loop, self.plan.batch.global_batch_size
        logged_samples = self.step * global_batch
        while self.step < loop.steps:
            wait_start = time.perf_counter()
            micro_batches = self.next_micro_batches(batches)
            data_time = time.perf_counter() - wait_start
            logged = loop.logs(self.step + 1)
            record = {**self.train_step(micro_batches, timed=logged), "data_time": data_time}
            if logged:
                record |= self._type_shares(logged_samples, self.step * global_batch)
                logged_samples = self.step * global_batch
                records.append(self.metrics.log_step(record))
            else:
                self.metrics.keep_step(record)
            if self.update.diverged():  # before step_end, so the diverged step is never saved
                self.metrics.flush()
                raise TrainingDiverged(
                    self.step, self.update.consecutive_skips, self.plan.training.max_consecutive_skips
                )
            if loop.validates(self.step):
                self.metrics.log({"step": self.step, **self.validate()})
            if self.checkpointer.step_end(self.train_state(), self.stop_requests.poll(self.step)):
                break
        self.metrics.flush()
        return records

    def validate(self) -> dict[str, float]:
        """Loss and perplexity over the whole validation set, overall and per data type."""
        for part in self.model_parts:
            part.eval()
        try:
            step = self.model_step
            return validation_metrics(
                step.logits,
                self.valid_loader,
                step.prepare,
                step.context,
                self.valid_loader.dataset.types,
                step.eval_groups(),
                self.device,
            )
        finally:
            for part in self.model_parts:
                part.train()

    def _type_shares(self, start: int, stop: int) -> dict[str, float]:
        """Token share per data type in the global samples [start, stop), to check data.dataset_weights."""
        shares = getattr(self.dataloader.dataset, "type_token_shares", None)
        if shares is None or not self.dist.is_main or stop <= start:
            return {}
        return {f"token_share/{name}": share for name, share in shares(start, stop).items()}

    def close(self) -> None:
        try:
            self.checkpointer.close()
        finally:
            self.stop_requests.close()
        self.metrics.close()


def build_trainer(cfg: JobConfig) -> Trainer:
    """The process group of this job, the plan for it, and the trainer of that plan."""
    dist = init_distributed()
    return Trainer(resolve(cfg, dist.world_size, dist.device.type), dist)


def configure_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=LOG_FORMAT,
        stream=sys.stdout,
        force=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Train; exit 0, 2 after a user error (one line for the whole job), 3 when training diverged, 130
    after Ctrl-C (see StopRequests)."""
    exit_with_launcher()
    cfg = load_config_or_exit(argv, report=report_error)
    configure_logging(is_main=env_rank() == 0)
    trainer = None
    try:
        trainer = build_trainer(cfg)
        trainer.train()
    except TitanlmError as error:
        if traceback_requested():
            raise
        hint = " (set TITANLM_TRACEBACK=1 for the traceback)" if error.exit_code == USER_ERROR_EXIT_CODE else ""
        report_error(f"error: {error}{hint}")
        sys.exit(error.exit_code)
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
    sys.exit(trainer.stop_requests.exit_code)


if __name__ == "__main__":
    main()
