"""The checkpoint manager: when to save, where from to resume, and making saves visible only when complete.

Every rank builds one and calls it at the same points, because DCP saves and loads are collectives.
Decisions that depend on the file system (which checkpoint to resume from, whether the folder is
writable) are taken on rank 0 and broadcast, so that ranks on different nodes never disagree, and
a bad input raises the same error on every rank instead of leaving the others waiting.

Where a run starts from:
  1. with checkpoints on, `checkpoint.folder` holding complete checkpoints: the newest (or
     `load_step`), everything in it, so that a restarted job continues exactly where it saved;
  2. otherwise `initial_load_path`, restricted to `load_content` (InternEvo's load_ckpt_info): e.g.
     the weights of a pretraining checkpoint for fine-tuning, starting at step 0;
  3. otherwise the weights of `model.hf_path`, starting at step 0;
  4. otherwise the freshly initialized model.
Starting weights (2, 3) are loaded whether or not checkpoints are saved: a fine-tune must never
start from random weights because saving is off.

Every checkpoint gets the run's model record (titanlm/models/spec.py) and a manifest of its files'
sizes and checksums (manifest.py) before it is published; a load checks them first. Rank 0 holds
a lock on the run's folders (folder_lock.py) from start to end: one job per folder.

A save that fails on a file-system error (disk full, quota, permissions) removes its own
.tmp folder and stops the run with one line naming checkpoint.folder and its free space; in async
mode at the step boundary after the failure shows. Earlier checkpoints are never touched.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

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
from titanlm.checkpoint.content import PARTS, CheckpointError, TrainingContent
from titanlm.checkpoint.folder_lock import FolderLock
from titanlm.checkpoint.hf_export import export_hf_folder
from titanlm.checkpoint.single_process import read_model_state
from titanlm.checkpoint.stop import Action, StopRequests
from titanlm.checkpoint.train_state import TrainState
from titanlm.config.job_config import JobConfig
from titanlm.distributed import PROCESS_GROUP_TIMEOUT_S
from titanlm.errors import TitanlmError
from titanlm.models.spec import ModelSpec, write_record
from titanlm.plan import CheckpointPlan

logger = logging.getLogger("titanlm")

T = TypeVar("T")


def initial_checkpoint(path: str) -> str:
    """The DCP folder that checkpoint.initial_load_path names, or an error saying what it is instead.

    A Hugging Face model folder is accepted as well: its weights are read directly (see
    TrainingContent.load_hf).
    """
    key = f"checkpoint.initial_load_path {path}"
    if not os.path.isdir(path):
        raise CheckpointError(f"{key} is not a folder; point it at a step-N folder or a converted model")
    if layout.is_dcp_checkpoint(path) or layout.looks_like_hf_model(path):
        return path
    steps = layout.complete_steps(path)
    if steps:
        raise CheckpointError(
            f"{key} is a checkpoint folder, not one checkpoint; point it at one of its step folders, "
            f"e.g. {layout.step_dir(path, steps[-1])}"
        )
    raise CheckpointError(
        f"{key} has no {layout.METADATA} file, so it is not a DCP checkpoint; point it at a step-N folder "
        "or a converted model"
    )


def _nearest_existing(folder: str) -> str:
    """`folder`, or its nearest ancestor that exists (a folder a save would create need not exist yet)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def _check_writable(folder: str) -> None:
    """Refuse a folder that saves could not create or write into, without creating it: a start that
    fails later must not leave an empty checkpoint folder behind."""
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} does not allow writing"
    else:
        return
    raise CheckpointError(
        f"checkpoint folder {folder} is not writable ({reason}); fix its permissions or point "
        "job.dump_folder / checkpoint.folder elsewhere"
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _os_error(error: BaseException) -> OSError | None:
    """The file-system error behind a failed save, looking inside DCP's CheckpointException (which
    carries each failed rank's exception) and through exception chains."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
        pending += [current.__cause__, current.__context__]
    return None


# Below this much free space a failed write is taken for a full disk: torch.save's zip writer turns the
# ENOSPC of a short write into "RuntimeError: ... unexpected pos", losing the OSError.
_FULL_BYTES = 64 << 20


def _free_bytes(folder: str) -> int:
    existing = _nearest_existing(folder)
    return shutil.disk_usage(existing if os.path.isdir(existing) else os.path.dirname(existing)).free


def _file_system_failure(error: BaseException, folder: str) -> tuple[int, str] | None:
    """(errno, reason) of a save that failed on the file system, or None when `error` is something else
    (a bug). Call it before the partial save is removed: a full disk is recognised by its free space."""
    found = _os_error(error)
    if found is not None:
        reason = found.strerror or str(found)
        return found.errno, f"{reason}: {found.filename}" if found.filename else reason
    if _free_bytes(folder) < _FULL_BYTES:
        return errno.ENOSPC, os.strerror(errno.ENOSPC)
    return None


def _on_rank0(decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 and give every rank its result, or raise its user error (a TitanlmError,
    e.g. CheckpointError or FolderInUse) everywhere as a CheckpointError. Any other exception is a
    bug: rank 0 re-raises it with its traceback and the other ranks raise too, instead of waiting."""
    box: list[Any] = [None]
    raised: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = (decide(), None, None)
        except TitanlmError as error:
            box[0] = (None, str(error), None)
        except Exception as error:
            raised = error
            box[0] = (None, None, f"{type(error).__name__}: {error}")
    dist.broadcast_object_list(box, src=0)
    result, error, bug = box[0]
    if raised is not None:
        raise raised
    if bug is not None:
        raise RuntimeError(f"rank 0 failed while deciding for all ranks ({bug}); see its traceback")
    if error is not None:
        raise CheckpointError(error)
    return result


@dataclass(frozen=True)
class _Start:
    """Rank 0's start-up decisions, shared by all ranks."""

    source: str | None  # the checkpoint to load, if any
    parts: tuple[str, ...]
    fix: str  # what to do when `source` lacks some of `parts`
    attempt: str  # names this attempt's .tmp folders, so a crashed attempt's are never reused
    origin: str = ""  # for the log: "resume", "checkpoint.initial_load_path" or "model.hf_path"


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
    """Locks the run's folders, loads at start, saves after steps, and stops the run on request; with
    checkpoint.enable off it only loads the starting weights, if any, and stops on request."""

    def __init__(
        self,
        cfg: JobConfig,
        resolved: CheckpointPlan,
        spec: ModelSpec,
        model_parts: list[nn.Module],
        optimizer: Optimizer,
        lr_scheduler: LRScheduler,
        dataloader: StatefulDataLoader,
        dp_rank: int,
        device: torch.device,
    ) -> None:
        """Lock the folders and choose what to start from; nothing is loaded yet.

        `resolved`: the plan's checkpoint settings (what a load takes, the async mode this device runs);
        `spec` is the run's model, with the tokenizer it actually uses: recorded in every save."""
        self.cfg = cfg.checkpoint
        self.enabled = resolved.enabled
        self.spec = spec
        self.dump_folder = cfg.job.dump_folder
        self.folder = os.path.join(cfg.job.dump_folder, self.cfg.folder)
        self.total_steps = cfg.training.steps
        self.device = device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.content = TrainingContent(model_parts, optimizer, lr_scheduler, dataloader, dp_rank)
        self.stop: StopRequests | None = None
        self._locks: list[FolderLock] = []
        self._in_flight: _Save | None = None
        self.export_dtype = resolved.export_dtype
        self.async_mode = resolved.async_mode
        try:
            _on_rank0(self._lock_folders)
            self.start = self._choose_start(resolved.load_parts)
        except BaseException:
            self.release_locks()
            raise
        # Made once the start is settled, so that a refused start leaves no thread or shared memory behind.
        # Saves exchange checksums and failures over their own gloo group: a background save's collectives
        # must not interleave with the training thread's on one group.
        self._group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S)) if self.enabled else None
        )
        self._sealer = ThreadPoolExecutor(1, "titanlm-save") if self.enabled and self.async_mode != "disabled" else None
        self._stager = (
            DefaultStager(
                StagingOptions(
                    use_pinned_memory=True, use_shared_memory=True, use_async_staging=False, use_non_blocking_copy=True
                )
            )
            if self.enabled and self.async_mode == "async_with_pinned_mem"
            else None
        )

    def _choose_start(self, parts: tuple[str, ...]) -> _Start:
        if not self.enabled:
            return _on_rank0(lambda: self._starting_weights(parts, attempt=""))
        return _on_rank0(lambda: self._start_in_folder(parts))

    def _lock_folders(self) -> None:
        """Rank 0: lock the dump folder (metrics, logs) and, when it lies elsewhere, the checkpoint folder."""
        folders = [("job.dump_folder", self.dump_folder)]
        inside = os.path.commonpath([os.path.abspath(self.folder), os.path.abspath(self.dump_folder)])
        if self.enabled and inside != os.path.abspath(self.dump_folder):
            folders.append(("checkpoint.folder", self.folder))
        for key, folder in folders:
            lock = FolderLock(folder, key)
            try:
                lock.acquire()
            except OSError as error:
                raise CheckpointError(
                    f"{key} {folder} is not writable ({error.strerror}); fix its permissions or set {key} to "
                    "a folder this job can write"
                ) from None
            self._locks.append(lock)

    def _start_in_folder(self, parts: tuple[str, ...]) -> _Start:
        """Rank 0: check the folder, report leftovers, and pick the checkpoint to start from."""
        _check_writable(self.folder)
        stale = layout.leftovers(self.folder)
        if stale:
            logger.warning(
                f"{self.folder} holds interrupted saves or deletions, which are never loaded nor deleted "
                f"automatically: {', '.join(stale)}; remove them by hand once no job writes there"
            )
        export = layout.step_dir(self.folder, self.total_steps, model_only=True)
        hf_export = layout.hf_dir(self.folder, self.total_steps)
        for path, asked in ((export, self.cfg.last_save_model_only), (hf_export, self.cfg.last_save_in_hf)):
            if asked and os.path.exists(path):
                raise CheckpointError(
                    f"{path} exists: this run already exported its final weights; move it away to export "
                    "again, or raise training.steps"
                )
        # Time and pid name the attempt for people; the random part keeps two attempts of one process
        # in one second (a quick crash and resume) from sharing, and so publishing, a leftover folder.
        attempt = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        source = self._resume_source(layout.complete_steps(self.folder))
        if source is not None:
            fix = "a resume needs a full checkpoint: move this one out of the folder, or pick another with load_step"
            return _Start(source, PARTS, fix, attempt, origin="resume")
        return self._starting_weights(parts, attempt)

    def _starting_weights(self, parts: tuple[str, ...], attempt: str) -> _Start:
        """Rank 0: the start of a run that resumes nothing: initial_load_path, else model.hf_path."""
        if self.cfg.initial_load_path:
            fix = "set checkpoint.load_content to parts it holds, e.g. model"
            return _Start(
                initial_checkpoint(self.cfg.initial_load_path),
                parts,
                fix,
                attempt,
                origin="checkpoint.initial_load_path",
            )
        if self.spec.hf_path:
            return _Start(self.spec.hf_path, ("model",), "", attempt, origin="model.hf_path")
        return _Start(None, (), "", attempt)

    def _resume_source(self, steps: list[int]) -> str | None:
        """The checkpoint of this run's folder to resume from: load_step's, else the newest, if any."""
        load_step = self.cfg.load_step
        if load_step >= 0:
            if load_step not in steps:
                available = ", ".join(f"step-{s}" for s in steps) or "none"
                raise CheckpointError(
                    f"checkpoint.load_step = {load_step}: {self.folder} has no complete step-{load_step} "
                    f"(complete checkpoints: {available}); pick one of those, or -1 for the newest"
                )
            newer = [f"step-{s}" for s in steps if s > load_step]
            if newer:
                raise CheckpointError(
                    f"checkpoint.load_step = {load_step}, but {self.folder} also holds newer {', '.join(newer)}, "
                    "which this run would overwrite and a restart would resume from; move them out of the "
                    "folder to go back to an earlier step"
                )
        elif not steps:
            return None
        source = layout.step_dir(self.folder, load_step if load_step >= 0 else steps[-1])
        if not layout.is_dcp_checkpoint(source):
            raise CheckpointError(
                f"{source} has no {layout.METADATA} file, so it is not a complete DCP checkpoint (copied in "
                "part?); move it out of the folder, or pick another with checkpoint.load_step"
            )
        if self.cfg.initial_load_path:
            logger.info(f"resuming from {source}; checkpoint.initial_load_path only seeds runs without checkpoints")
        return source

    def start_description(self, seed: int) -> str:
        """Where the run's weights come from, for the first log lines."""
        plan = self.start
        if plan.source is None:
            return f"freshly initialized (debug.seed {seed})"
        if plan.origin == "resume":
            return f"resumed from {plan.source}"
        kind = "Hugging Face folder" if plan.origin == "model.hf_path" else plan.origin
        return f"{', '.join(plan.parts)} from {kind} {plan.source}"

    def save_description(self) -> str:
        """What the run saves where, for the first log lines."""
        hf = f", and a Hugging Face folder step-{self.total_steps}-hf at the end" if self.cfg.last_save_in_hf else ""
        if not self.enabled:
            return f"no checkpoints (checkpoint.enable is off){hf.replace(', and', '; but')}"
        last = "weights only at the end" if self.cfg.last_save_model_only else "a full checkpoint at the end"
        return f"checkpoints to {self.folder} every {self.cfg.interval} steps and {last}{hf}"

    @torch.no_grad()
    def load(self) -> TrainState | None:
        """Check and restore what the plan names, then start listening for stop requests.

        Returns the TrainState to continue from, or None when the run starts at step 0 (nothing to
        load, or only parts without it, e.g. load_content = model).
        """
        state = None
        if self.start.source:
            start = time.perf_counter()
            if layout.looks_like_hf_model(self.start.source) and not layout.is_dcp_checkpoint(self.start.source):
                self.content.load_hf(self.start.source, self.start.parts, self.spec.args)
            else:
                self._verify(self.start.source)
                state = self.content.load(self.start.source, self.start.parts, self.start.fix)
            where = f"; continuing after step {state.step}" if state else "; starting at step 0"
            logger.info(
                f"loaded {', '.join(self.start.parts)} from {self.start.source} in "
                f"{time.perf_counter() - start:.1f}s{where}"
            )
        stop_file = self.cfg.stop_file or os.path.join(self.folder, "STOP")
        self.stop = StopRequests(stop_file, self.is_main, self.device)
        return state

    def _verify(self, source: str) -> None:
        """Check `source` against its manifest before anything is read: every file's size, and unless
        checkpoint.verify is off its checksum, each rank taking a share of the files."""
        found = _on_rank0(lambda: manifest.read_manifest(source))
        if found is None:
            if self.is_main:
                logger.warning(
                    f"{source} has no {manifest.MANIFEST} (saved by an older titanlm?): loading it unchecked"
                )
            return
        started = time.perf_counter()
        problem = _on_rank0(lambda: manifest.size_problem(source, found))  # one rank stats the files
        if problem is None and self.cfg.verify:
            try:
                problem = manifest.checksum_problem(source, found, self.rank, self.world_size)
            except Exception as error:  # a file that vanished or cannot be read: damage all the same
                problem = f"a file could not be read ({error})"
        problems: list[Any] = [None] * self.world_size
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
        if problem:
            raise CheckpointError(f"{source} is damaged: {problem}; {self._damage_fix(source)}")
        what = "sizes and checksums" if self.cfg.verify else "sizes (checkpoint.verify is off)"
        seconds = time.perf_counter() - started
        logger.info(f"checked {source}: {len(found['files'])} files, {what} match, in {seconds:.1f}s")

    def _damage_fix(self, source: str) -> str:
        """How to go on from a damaged checkpoint: resume from the one before it, or replace it."""
        aside = f"mv {source} {source}.damaged"
        if self.start.origin != "resume":
            return f"copy, convert or save it again, or set {self.start.origin} to another checkpoint"
        damaged_step = int(os.path.basename(source).removeprefix("step-"))
        earlier = [step for step in layout.complete_steps(self.folder) if step < damaged_step]
        load_step = " and set checkpoint.load_step = -1" if self.cfg.load_step >= 0 else ""
        if earlier:
            return (
                f"move it aside ({aside}){load_step} and restart to resume from step-{earlier[-1]}, the previous "
                "complete checkpoint"
            )
        return f"move it aside ({aside}){load_step}; there is no earlier complete checkpoint, so the run starts over"

    def step_end(self, state: TrainState) -> bool:
        """Save if due after this step (interval, last step, stop file, signal); True when the run must stop.

        A collective: every rank calls it after every step. A background save that failed stops the run here.
        """
        action = self.stop.poll(state.step)
        if not self.enabled:
            return action == Action.SAVE_AND_STOP
        self._settle_in_flight()
        last = state.step >= self.total_steps
        stop = action == Action.SAVE_AND_STOP
        if last or stop:
            self._save(state, blocking=True, model_only=last and self.cfg.last_save_model_only)
            if last and self.cfg.last_save_in_hf and self.is_main:
                self._export_hf(layout.step_dir(self.folder, state.step, self.cfg.last_save_model_only), state.step)
        elif action == Action.SAVE or state.step % self.cfg.interval == 0:
            self._save(state, blocking=False)
        return stop

    @torch.no_grad()
    def _save(self, state: TrainState, blocking: bool, model_only: bool = False) -> None:
        """Write step-N (or step-N-model) through a .tmp folder; in async mode only start writing.

        At most one save is in flight: the previous one is finished (and published) first.
        """
        self._wait()
        final = layout.step_dir(self.folder, state.step, model_only)
        tmp = layout.tmp_dir(final, self.start.attempt)
        content = self.content
        state_dict = content.model_state_dict(self.export_dtype) if model_only else content.state_dict(state)
        facts = {"step": state.step, "consecutive_skips": state.consecutive_skips}
        started = time.perf_counter()
        if blocking or self.async_mode == "disabled":
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
            failure = _file_system_failure(error, self.folder)
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
        return self._failure_line(facts["step"], *failures[0]) if failures else None

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
                failure = _file_system_failure(error, self.folder) if isinstance(error, OSError) else None
                sealed[0] = ("failed", failure) if failure else ("bug", f"{type(error).__name__}: {error}")
        dist.broadcast_object_list(sealed, src=0, group=self._group)
        kind, detail = sealed[0]
        if kind == "bug":
            if raised is not None:
                raise raised
            raise RuntimeError(f"rank 0 failed to finish {tmp} ({detail}); see its traceback")
        return [detail] if kind == "failed" else []

    def _failure_line(self, step: int, code: int, reason: str, action: str = "saving", retry: str = "") -> str:
        """What went wrong with the save (or export) of `step`, what is left, and what to do (`retry`, or
        restarting the run)."""
        free = _gib(_free_bytes(self.folder))
        steps = layout.complete_steps(self.folder)
        if steps:
            last = layout.step_dir(self.folder, steps[-1])
            kept = f"step-{steps[-1]} ({_gib(_folder_size(last))}) is the last complete checkpoint, untouched"
            restart = retry or "restart to resume"
        else:
            kept, restart = "there is no earlier checkpoint", retry or "restart"
        if code in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"checkpoint.folder {self.folder} is full ({free} free): {action} step-{step} failed and its partial "
                f"files were removed; {kept}. Free space there (checkpoint.keep_latest_k keeps fewer checkpoints) or "
                f"point checkpoint.folder at a larger disk, then {restart}"
            )
        return (
            f"checkpoint.folder {self.folder}: {action} step-{step} failed ({reason}; {free} free) and its partial "
            f"files were removed; {kept}. Fix the folder, then {restart}"
        )

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
        if self.cfg.keep_latest_k > 0:
            spared = self._newest_healthy()
            removed = layout.prune(self.folder, self.cfg.keep_latest_k, spare=spared)
            if removed:
                logger.info(f"removed {', '.join(f'step-{s}' for s in removed)} (checkpoint.keep_latest_k)")
            if spared is not None and spared not in layout.complete_steps(self.folder)[-self.cfg.keep_latest_k :]:
                logger.warning(
                    f"kept step-{spared} beyond checkpoint.keep_latest_k: it is the newest checkpoint saved before "
                    "the current run of skipped inf/NaN steps"
                )

    def _newest_healthy(self) -> int | None:
        """The newest complete checkpoint saved after a finite step (one without a manifest counts)."""
        for step in reversed(layout.complete_steps(self.folder)):
            found = manifest.read_manifest(layout.step_dir(self.folder, step))
            if found is None or not found.get("consecutive_skips"):
                return step
        return None

    def _export_hf(self, saved: str, step: int) -> None:
        """Rank 0: the checkpoint just saved as a Hugging Face folder step-N-hf, published like a save."""
        started = time.perf_counter()
        final = layout.hf_dir(self.folder, step)
        tmp = layout.tmp_dir(final, self.start.attempt)
        try:
            os.makedirs(tmp)
            export_hf_folder(read_model_state(saved), self.spec, Path(tmp), self.export_dtype)
        except BaseException as error:
            failure = _file_system_failure(error, self.folder) if isinstance(error, (OSError, RuntimeError)) else None
            shutil.rmtree(tmp, ignore_errors=True)
            if failure is None:
                raise
            retry = f"export it with python -m titanlm.tools.convert dcp_to_hf {saved} {final}"
            raise CheckpointError(self._failure_line(step, *failure, action="exporting", retry=retry)) from None
        layout.publish(tmp, final)
        logger.info(f"exported {final} for transformers in {time.perf_counter() - started:.1f}s")

    def close(self) -> None:
        """Finish a save still in flight, give the signal handlers back and release the folder locks."""
        try:
            if self.enabled:
                self._wait()
        finally:
            if self._sealer is not None:
                self._sealer.shutdown()
            if self._stager is not None:
                self._stager.close()
            if self.stop is not None:
                self.stop.close()
            self.release_locks()

    def release_locks(self) -> None:
        """Give up the folder locks (also after a failed start, so that nothing is left behind)."""
        for lock in self._locks:
            lock.release()
        self._locks.clear()
