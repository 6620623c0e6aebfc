"""What a run starts from: the first source configured (CheckpointPlan.starts) that holds something.

  1. resume: with checkpoints on, `checkpoint.folder` holding complete checkpoints: the newest (or
     `load_step`), everything in it, so that a restarted job continues exactly where it saved;
  2. otherwise `checkpoint.initial_load_path`, restricted to `load_content` (InternEvo's
     load_ckpt_info): e.g. the weights of a pretraining checkpoint for fine-tuning, from step 0;
  3. otherwise the weights of `model.hf_path`, from step 0;
  4. otherwise the freshly initialized model.
Starting weights (2, 3) are loaded whether or not checkpoints are saved: a fine-tune must never
start from random weights because saving is off.

`choose_start` is pure: the caller lists the folder's steps. `check_folder` before it and
`check_source` after it read the folders and refuse what the run cannot use. The manager runs them
on rank 0 and shares the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from titanlm.checkpoint import layout
from titanlm.checkpoint.diagnosis import check_writable
from titanlm.checkpoint.layout import Kind
from titanlm.errors import CheckpointError
from titanlm.plan import CHECKPOINT_PARTS, CheckpointPlan

logger = logging.getLogger("titanlm")

RESUME_FIX = "a resume needs a full checkpoint: move this one out of the folder, or pick another with load_step"
INITIAL_FIX = "set checkpoint.load_content to parts it holds, e.g. model"


@dataclass(frozen=True)
class Start:
    """`parts` of the checkpoint or HF folder `source`, which the setting `origin` named ("resume" for the
    run's own folder); a fresh model has no source. `fix` says what to do when `source` lacks some parts."""

    origin: str = ""
    source: str | None = None
    parts: tuple[str, ...] = ()
    fix: str = ""
    hf_folder: bool = False  # `source` is a Hugging Face folder, read directly, not a DCP checkpoint (check_source)

    def describe(self, seed: int) -> str:
        """Where the run's weights come from, for the first log lines."""
        if self.source is None:
            return f"freshly initialized (debug.seed {seed})"
        if self.origin == "resume":
            return f"resumed from {self.source}"
        kind = "Hugging Face folder" if self.origin == "model.hf_path" else self.origin
        return f"{', '.join(self.parts)} from {kind} {self.source}"


def choose_start(plan: CheckpointPlan, hf_path: str, steps: list[int]) -> Start:
    """The start of a run whose checkpoint folder holds the complete checkpoints `steps` (oldest first)
    and whose model.hf_path is `hf_path`."""
    for origin in plan.starts:
        if origin == "resume":
            step = resume_step(plan, steps)
            if step is not None:
                return Start(origin, layout.step_dir(plan.folder, step), CHECKPOINT_PARTS, RESUME_FIX)
        elif origin == "checkpoint.initial_load_path":
            return Start(origin, plan.initial_load_path, plan.load_parts, INITIAL_FIX)
        else:  # model.hf_path
            return Start(origin, hf_path, ("model",))
    return Start()


def resume_step(plan: CheckpointPlan, steps: list[int]) -> int | None:
    """The step of the run's folder to resume from: load_step, else the newest, if any."""
    load_step = plan.load_step
    if load_step < 0:
        return steps[-1] if steps else None
    if load_step not in steps:
        available = ", ".join(f"step-{s}" for s in steps) or "none"
        raise CheckpointError(
            f"checkpoint.load_step = {load_step}: {plan.folder} has no complete step-{load_step} "
            f"(complete checkpoints: {available}); pick one of those, or -1 for the newest"
        )
    newer = [f"step-{s}" for s in steps if s > load_step]
    if newer:
        raise CheckpointError(
            f"checkpoint.load_step = {load_step}, but {plan.folder} also holds newer {', '.join(newer)}, "
            "which this run would overwrite and a restart would resume from; move them out of the "
            "folder to go back to an earlier step"
        )
    return load_step


def check_source(start: Start) -> Start:
    """`start` with what kind of folder its source is, or an error for a source that is not one loadable
    checkpoint, saying what it is instead. A Hugging Face folder is accepted from initial_load_path too:
    its weights are read directly (TrainingContent.load_hf); model.hf_path was checked when the plan read
    its config.json."""
    path = start.source
    if path is None:
        return start
    start = replace(start, hf_folder=layout.classify(path) is Kind.HF)
    if start.origin == "resume" and layout.classify(path) is not Kind.DCP:
        raise CheckpointError(
            f"{path} has no {layout.METADATA} file, so it is not a complete DCP checkpoint (copied in "
            "part?); move it out of the folder, or pick another with checkpoint.load_step"
        )
    if start.origin != "checkpoint.initial_load_path":
        return start
    key = f"checkpoint.initial_load_path {path}"
    if not os.path.isdir(path):
        raise CheckpointError(f"{key} is not a folder; point it at a step-N folder or a converted model")
    kind = layout.classify(path)
    if kind is Kind.RUN:
        raise CheckpointError(
            f"{key} is a checkpoint folder, not one checkpoint; point it at one of its step folders, "
            f"e.g. {layout.step_dir(path, layout.complete_steps(path)[-1])}"
        )
    if kind is Kind.NONE:
        raise CheckpointError(
            f"{key} has no {layout.METADATA} file, so it is not a DCP checkpoint; point it at a step-N folder "
            "or a converted model"
        )
    return start


def check_folder(plan: CheckpointPlan) -> None:
    """With checkpoints on: refuse a folder saves cannot write or whose final exports exist already, and
    report the leftovers of interrupted saves."""
    check_writable(plan.folder)
    stale = layout.leftovers(plan.folder)
    if stale:
        logger.warning(
            f"{plan.folder} holds interrupted saves or deletions, which are never loaded nor deleted "
            f"automatically: {', '.join(stale)}; remove them by hand once no job writes there"
        )
    export = layout.step_dir(plan.folder, plan.final_step, model_only=True)
    hf_export = layout.hf_dir(plan.folder, plan.final_step)
    for path, asked in ((export, plan.last_save_model_only), (hf_export, plan.last_save_in_hf)):
        if asked and os.path.exists(path):
            raise CheckpointError(
                f"{path} exists: this run already exported its final weights; move it away to export "
                "again, or raise training.steps"
            )
