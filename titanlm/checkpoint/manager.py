"""The checkpoint manager: the protocol that saves and loads a run's checkpoints, visible only when complete.

Every rank builds one and calls it at the same points, because DCP saves and loads are collectives.
Decisions that depend on the file system (what the run starts from, start.py; whether the folder is
writable) are taken on rank 0 and broadcast, so that ranks on different nodes never disagree, and
a bad input raises the same error on every rank instead of leaving the others waiting.

Every checkpoint gets the run's model record (titanlm/models/spec.py) and a manifest of its files'
sizes and checksums (manifest.py) before it is published; a load checks them first. Rank 0 holds
a lock on the run's folders (folder_lock.py) from start to end: one job per folder.

A save that fails on a file-system error (disk full, quota, permissions) removes its own .tmp folder
and stops the run with one line naming checkpoint.folder and its free space (diagnosis.py); in async
mode at the step boundary after the failure shows. Earlier checkpoints are never touched.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchdata.stateful_dataloader import StatefulDataLoader

from titanlm.checkpoint import layout, manifest
from titanlm.checkpoint.content import TrainingContent
from titanlm.checkpoint.diagnosis import damage_fix, failure_line, file_system_failure
from titanlm.checkpoint.folder_lock import FolderLock, lock_run_folders
from titanlm.checkpoint.hf_export import export_final
from titanlm.checkpoint.rank0 import on_rank0
from titanlm.checkpoint.start import Start, check_folder, check_source, choose_start
from titanlm.checkpoint.train_state import TrainState
from titanlm.distributed import PROCESS_GROUP_TIMEOUT_S
from titanlm.errors import CheckpointError
from titanlm.models.spec import ModelSpec, write_record
from titanlm.plan import CheckpointPlan
from titanlm.stop import Action

logger = logging.getLogger("titanlm")


@dataclass
class _Save:
    """A background save. Its future resolves once every rank wrote and checksummed its files and rank 0
    wrote the manifest: to None, or to the line that explains a file-system failure. Rank 0 publishes
    (renames) it at the first step boundary where every rank's future is done."""

    tmp: str
    final: str
    step: int
    started: float
    future: Future


class CheckpointManager:
    """Locks the run's folders, loads at start, and saves after steps when due or asked; with
    checkpoint.enable off it only loads the starting weights, if any."""

    def __init__(
        self,
        plan: CheckpointPlan,
        spec: ModelSpec,
        model_parts: list[nn.Module],
        optimizer: Optimizer,
        lr_scheduler: LRScheduler,
        dataloader: StatefulDataLoader,
        dp_rank: int,
        device: torch.device,
    ) -> None:
        """Lock the folders and choose what to start from (`start`); nothing is loaded yet.

        `spec` is the run's model, with the tokenizer it actually uses: recorded in every save."""
        self.plan = plan
        self.spec = spec
        self.device = device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.content = TrainingContent(model_parts, optimizer, lr_scheduler, dataloader, dp_rank)
        self._locks: list[FolderLock] = []
        self._in_flight: _Save | None = None
        try:
            on_rank0(self._lock_folders)
            self.start, self._attempt = on_rank0(self._choose_start)
        except BaseException:
            self.release_locks()
            raise
        # Made once the start is settled, so that a refused start leaves no thread or shared memory behind.
        # Saves exchange checksums and failures over their own gloo group: a background save's collectives
        # must not interleave with the training thread's on one group.
        enabled, mode = plan.enabled, plan.async_mode
        self._group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S)) if enabled else None
        )
        self._sealer = ThreadPoolExecutor(1, "titanlm-save") if enabled and mode != "disabled" else None
        self._stager = (
            DefaultStager(
                StagingOptions(
                    use_pinned_memory=True, use_shared_memory=True, use_async_staging=False, use_non_blocking_copy=True
                )
            )
            if enabled and mode == "async_with_pinned_mem"
            else None
        )

    def _lock_folders(self) -> None:
        """Rank 0: the run's folders are this job's until `release_locks`."""
        self._locks = lock_run_folders(self.plan.dump_folder, self.plan.folder if self.plan.enabled else None)

    def _choose_start(self) -> tuple[Start, str]:
        """Rank 0: check the checkpoint folder, choose the start, and name this attempt's .tmp folders."""
        plan, steps = self.plan, []
        if plan.enabled:
            check_folder(plan)
            steps = layout.complete_steps(plan.folder)
        start = check_source(choose_start(plan, self.spec.hf_path, steps))
        if start.origin == "resume" and plan.initial_load_path:
            logger.info(
                f"resuming from {start.source}; checkpoint.initial_load_path only seeds runs without checkpoints"
            )
        # Time and pid name the attempt for people; the random part keeps two attempts of one process
        # in one second (a quick crash and resume) from sharing, and so publishing, a leftover folder.
        return start, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"

    def save_description(self) -> str:
        """What the run saves where, for the first log lines."""
        plan = self.plan
        hf = f", and a Hugging Face folder step-{plan.final_step}-hf at the end" if plan.last_save_in_hf else ""
        if not plan.enabled:
            return f"no checkpoints (checkpoint.enable is off){hf.replace(', and', '; but')}"
        last = "weights only at the end" if plan.last_save_model_only else "a full checkpoint at the end"
        return f"checkpoints to {plan.folder} every {plan.interval} steps and {last}{hf}"

    @torch.no_grad()
    def load(self) -> TrainState | None:
        """Check and restore what the start names.

        Returns the TrainState to continue from, or None when the run starts at step 0 (nothing to
        load, or only parts without it, e.g. load_content = model).
        """
        start, state = self.start, None
        if start.source is None:
            return None
        began = time.perf_counter()
        if start.hf_folder:
            self.content.load_hf(start.source, start.parts, self.spec.args)
        else:
            self._verify(start.source)
            state = self.content.load(start.source, start.parts, start.fix)
        where = f"; continuing after step {state.step}" if state else "; starting at step 0"
        logger.info(f"loaded {', '.join(start.parts)} from {start.source} in {time.perf_counter() - began:.1f}s{where}")
        return state

    def _verify(self, source: str) -> None:
        """Check `source` against its manifest before anything is read: every file's size, and unless
        checkpoint.verify is off its checksum, each rank taking a share of the files."""
        found = on_rank0(lambda: manifest.read_manifest(source))
        if found is None:
            if self.is_main:
                logger.warning(
                    f"{source} has no {manifest.MANIFEST} (saved by an older titanlm?): loading it unchecked"
                )
            return
        started = time.perf_counter()
        problem = on_rank0(lambda: manifest.size_problem(source, found))  # one rank stats the files
        if problem is None and self.plan.verify:
            try:
                problem = manifest.checksum_problem(source, found, self.rank, self.world_size)
            except Exception as error:  # a file that vanished or cannot be read: damage all the same
                problem = f"a file could not be read ({error})"
        problems: list[Any] = [None] * self.world_size
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
        if problem:
            fix = damage_fix(source, self.start.origin, self.plan.folder, self.plan.load_step)
            raise CheckpointError(f"{source} is damaged: {problem}; {fix}")
        what = "sizes and checksums" if self.plan.verify else "sizes (checkpoint.verify is off)"
        seconds = time.perf_counter() - started
        logger.info(f"checked {source}: {len(found['files'])} files, {what} match, in {seconds:.1f}s")

    def step_end(self, state: TrainState, action: Action) -> bool:
        """Save if due after this step (interval, last step) or asked by `action`, the stop requests the
        ranks agreed on; True when the run must stop.

        A collective: every rank calls it after every step. A background save that failed stops the run here.
        """
        plan, stop = self.plan, action == Action.SAVE_AND_STOP
        if not plan.enabled:
            return stop
        self._settle_in_flight()
        last = state.step >= plan.final_step
        if last or stop:
            self._save(state, blocking=True, model_only=last and plan.last_save_model_only)
            if last and plan.last_save_in_hf and self.is_main:
                saved = layout.step_dir(plan.folder, state.step, plan.last_save_model_only)
                export_final(saved, plan.folder, state.step, self._attempt, self.spec, plan.export_dtype)
        elif action == Action.SAVE or state.step % plan.interval == 0:
            self._save(state, blocking=False)
        return stop

    @torch.no_grad()
    def _save(self, state: TrainState, blocking: bool, model_only: bool = False) -> None:
        """Write step-N (or step-N-model) through a .tmp folder; in async mode only start writing.

        At most one save is in flight: the previous one is finished (and published) first.
        """
        self._wait()
        final = layout.step_dir(self.plan.folder, state.step, model_only)
        tmp = layout.tmp_dir(final, self._attempt)
        content = self.content
        state_dict = content.model_state_dict(self.plan.export_dtype) if model_only else content.state_dict(state)
        facts = {"step": state.step, "consecutive_skips": state.consecutive_skips}
        started = time.perf_counter()
        if blocking or self.plan.async_mode == "disabled":
            error = None
            try:
                dcp.save(state_dict, checkpoint_id=tmp)
            except (Exception, CheckpointException) as raised:
                error = raised
            failure = self._seal(tmp, facts, error)
            if failure:
                self._discard(tmp, failure)
            if self.is_main:
                self._publish(tmp, final, started)
            return
        extra: dict[str, Any] = {}
        if self._stager is not None:
            extra = {"async_checkpointer_type": AsyncCheckpointerType.PROCESS, "async_stager": self._stager}
        # Returns once the state is copied out, so the next optimizer step cannot race the writes.
        written = dcp.async_save(state_dict, checkpoint_id=tmp, process_group=self._group, **extra)
        future = self._sealer.submit(self._seal_when_written, written, tmp, facts)
        logger.info(f"saving {final} in the background (training paused {time.perf_counter() - started:.2f}s)")
        self._in_flight = _Save(tmp, final, state.step, started, future)

    def _seal_when_written(self, written: Future, tmp: str, facts: dict[str, int]) -> str | None:
        """The background half of an async save: wait for DCP's writes, then seal."""
        error = None
        try:
            written.result()
        except (Exception, CheckpointException) as raised:
            error = raised
        return self._seal(tmp, facts, error)

    def _seal(self, tmp: str, facts: dict[str, int], error: BaseException | None) -> str | None:
        """After this rank's DCP write (or its failure): checksum the rank's files, and on rank 0 write the
        model record and the manifest. A collective over the save group.

        Returns None when the checkpoint is complete, else the line explaining the file-system failure,
        the same on every rank. Any other error is a bug: its rank re-raises it with the traceback.
        """
        piece, failure = None, None
        if error is None:
            try:
                piece = manifest.rank_entries(tmp, self.rank)
            except Exception as raised:
                error = raised
        if error is not None:
            failure = file_system_failure(error, self.plan.folder)
        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, (piece, failure, error is not None and failure is None), group=self._group)
        if error is not None and failure is None:
            raise error
        bugs = [rank for rank, (_, _, bug) in enumerate(outcomes) if bug]
        if bugs:
            raise RuntimeError(f"saving {tmp} failed with an internal error on rank(s) {bugs}; see their traceback")
        failures = [failure for _, failure, _ in outcomes if failure]
        if not failures:
            failures = self._write_manifest(tmp, [piece for piece, _, _ in outcomes], facts)
        return failure_line(self.plan.folder, facts["step"], *failures[0]) if failures else None

    def _write_manifest(self, tmp: str, pieces: list[Any], facts: dict[str, int]) -> list[tuple[int, str]]:
        """Rank 0 writes the model record and then the manifest; every rank learns how that went: [] when the
        checkpoint is complete, else its file-system failure. Nothing without a manifest is ever published."""
        sealed: list[Any] = [("ok", None)]
        raised: Exception | None = None
        if self.is_main:
            try:
                write_record(tmp, self.spec)
                manifest.write_manifest(tmp, pieces, **facts)
            except Exception as error:
                raised = error
                failure = file_system_failure(error, self.plan.folder) if isinstance(error, OSError) else None
                sealed[0] = ("failed", failure) if failure else ("bug", f"{type(error).__name__}: {error}")
        dist.broadcast_object_list(sealed, src=0, group=self._group)
        kind, detail = sealed[0]
        if kind == "bug":
            if raised is not None:
                raise raised
            raise RuntimeError(f"rank 0 failed to finish {tmp} ({detail}); see its traceback")
        return [detail] if kind == "failed" else []

    def _discard(self, tmp: str, failure: str) -> None:
        """Every rank: give up a failed save. Rank 0 removes this attempt's own .tmp folder (every rank is
        past writing it), never anything else; then the run stops with the failure's line."""
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(failure)

    def _settle_in_flight(self) -> None:
        """At a step boundary, while a background save is in flight, the ranks agree (one all_reduce) on
        whether it failed anywhere, then every rank stops here with its line; or whether it is done
        everywhere, then rank 0 publishes it. Otherwise it stays in flight, and training goes on."""
        save = self._in_flight
        if save is None:
            return
        done = save.future.done()
        failed = done and (save.future.exception() is not None or save.future.result() is not None)
        flags = torch.tensor([int(failed), int(not done)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed_anywhere, running_somewhere = flags.tolist()
        if failed_anywhere or not running_somewhere:
            self._wait()

    def _wait(self) -> None:
        """Finish the background save, if any, on every rank; a failed save raises here on all of them."""
        save, self._in_flight = self._in_flight, None
        if save is None:
            return
        failure = save.future.result()
        if failure:
            self._discard(save.tmp, failure)
        if self.is_main:
            self._publish(save.tmp, save.final, save.started)

    def _publish(self, tmp: str, final: str, started: float) -> None:
        layout.publish(tmp, final)
        logger.info(f"saved {final} in {time.perf_counter() - started:.1f}s")
        folder, keep = self.plan.folder, self.plan.keep_latest_k
        if keep > 0:
            spared = self._newest_healthy()
            removed = layout.prune(folder, keep, spare=spared)
            if removed:
                logger.info(f"removed {', '.join(f'step-{s}' for s in removed)} (checkpoint.keep_latest_k)")
            if spared is not None and spared not in layout.complete_steps(folder)[-keep:]:
                logger.warning(
                    f"kept step-{spared} beyond checkpoint.keep_latest_k: it is the newest checkpoint saved before "
                    "the current run of skipped inf/NaN steps"
                )

    def _newest_healthy(self) -> int | None:
        """The newest complete checkpoint saved after a finite step (one without a manifest counts)."""
        for step in reversed(layout.complete_steps(self.plan.folder)):
            found = manifest.read_manifest(layout.step_dir(self.plan.folder, step))
            if found is None or not found.get("consecutive_skips"):
                return step
        return None

    def close(self) -> None:
        """Finish a save still in flight and release the folder locks."""
        try:
            if self.plan.enabled:
                self._wait()
        finally:
            if self._sealer is not None:
                self._sealer.shutdown()
            if self._stager is not None:
                self._stager.close()
            self.release_locks()

    def release_locks(self) -> None:
        """Give up the folder locks (also after a failed start, so that nothing is left behind); the last first,
        as its folders may lie inside those the first one created."""
        for lock in reversed(self._locks):
            lock.release()
        self._locks.clear()
