"""One training step's forward and backward on this rank's model parts, as the plan lays them out.

`LocalStep` runs the step's micro-batches one after another through the whole model (any mix of
FSDP, TP and CP); `PipelineStep` hands them to a torch.distributed.pipelining schedule over this
rank's stages. Both accumulate gradients of the step's global mean token loss: each rank's summed
loss is divided by the label count of the whole step on all DP x CP ranks, and FSDP (over
dp_shard x cp) sums gradients, so neither accumulation nor DP, CP or PP size changes the result.
Both also give the logits for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from titanlm.data.datasets import Batch
from titanlm.loss import IGNORE_INDEX, token_cross_entropy
from titanlm.models.transformer import Transformer
from titanlm.parallel.context_parallel import shard_batch_for_cp
from titanlm.parallel.parallel_dims import Meshes
from titanlm.parallel.pipeline import build_schedule, pipeline_forward
from titanlm.plan import RunPlan

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _local(value: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor: vocab-sharded (loss parallel) losses are replicated DTensors."""
    return value.full_tensor() if isinstance(value, DTensor) else value


class ModelStep:
    """What both kinds of step share: cutting a batch to this rank's share, the loss and compute
    contexts, and summing the loss over the ranks that hold different tokens."""

    def __init__(self, plan: RunPlan, parts: list[Transformer], meshes: Meshes, device: torch.device) -> None:
        self.plan = plan
        self.parts = parts
        self.device = device
        self.loss_group = meshes.loss.get_group()
        # Pipeline stages share the grad norm and the loss over it; None without pipeline parallelism.
        self.pp_group: dist.ProcessGroup | None = meshes.world["pp"].get_group() if plan.pipeline.degree > 1 else None
        self.cp_rank = meshes.world["cp"].get_local_rank()
        self.loss_fn: LossFn = torch.compile(token_cross_entropy) if plan.compile else token_cross_entropy

    def loss_context(self) -> AbstractContextManager:
        """Vocab-sharded cross-entropy (forward and backward) under loss parallelism."""
        return loss_parallel() if self.plan.tp.loss_parallel else nullcontext()

    def compute_context(self) -> AbstractContextManager:
        """Autocast, for forward only, when one process computes in low precision without FSDP's casting."""
        dtype = self.plan.precision.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    @contextmanager
    def context(self) -> Iterator[None]:
        """Both, for a forward pass (evaluation)."""
        with self.loss_context(), self.compute_context():
            yield

    def prepare(self, batch: Batch) -> Batch:
        """This rank's context-parallel share of a batch, on the device."""
        batch = shard_batch_for_cp(batch, self.cp_rank, self.plan.dims.cp)
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def forward_backward(self, micro_batches: list[Batch], loss_scale: float) -> torch.Tensor:
        """Accumulate the gradients of `loss_scale` x the step's global mean token loss; return that
        loss (unscaled, on the device)."""
        prepared = [self.prepare(mb) for mb in micro_batches]
        label_tokens = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in prepared).to(torch.float32)
        dist.all_reduce(label_tokens, group=self.loss_group)
        # A Python number: it divides both plain and vocab-sharded (DTensor) losses.
        global_tokens = max(label_tokens.item(), 1.0)
        loss = self.accumulate(prepared, global_tokens, loss_scale)
        dist.all_reduce(loss, group=self.loss_group)
        return loss

    def accumulate(self, micro_batches: list[Batch], global_tokens: float, loss_scale: float) -> torch.Tensor:
        """Forward and backward of prepared micro-batches, each loss divided by `global_tokens`; returns
        this rank's share of the loss (the memory estimate traces this too)."""
        raise NotImplementedError

    def logits(self, batch: Batch) -> torch.Tensor | None:
        """Logits of a prepared batch in eval mode, or None on a rank that has none (early pipeline stages)."""
        raise NotImplementedError

    def eval_groups(self) -> list[dist.ProcessGroup]:
        """The groups whose ranks' evaluation sums add up to the whole."""
        return [group for group in (self.loss_group, self.pp_group) if group is not None]


def _extra_inputs(batch: Batch) -> dict[str, torch.Tensor | None]:
    return {"position_ids": batch.get("position_ids"), "document_ids": batch.get("document_ids")}


class LocalStep(ModelStep):
    """The whole model on this rank: micro-batches accumulate one after another."""

    def accumulate(self, micro_batches: list[Batch], global_tokens: float, loss_scale: float) -> torch.Tensor:
        model = self.parts[0]
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with self.loss_context():
                with self.compute_context():
                    if self.plan.loss.chunked:  # the model computes the loss, chunk by chunk
                        summed = model(mb["input_ids"], **_extra_inputs(mb), labels=mb["labels"])
                    else:
                        summed = self.loss_fn(model(mb["input_ids"], **_extra_inputs(mb)), mb["labels"])
                    loss = summed / global_tokens
                (loss * loss_scale).backward()
            total += _local(loss).detach()
        return total

    def logits(self, batch: Batch) -> torch.Tensor | None:
        return self.parts[0](batch["input_ids"], **_extra_inputs(batch))


class PipelineStep(ModelStep):
    """This rank's pipeline stages under the planned schedule; the step's micro-batches are the
    schedule's. The loss exists only on the last stage, so it is summed over the pp group too."""

    def __init__(self, plan: RunPlan, parts: list[Transformer], meshes: Meshes, device: torch.device) -> None:
        super().__init__(plan, parts, meshes, device)
        self.stage_ids = plan.pipeline.stages_of(meshes.world["pp"].get_local_rank())
        self.has_first = 0 in self.stage_ids
        self.has_last = plan.pipeline.num_stages - 1 in self.stage_ids
        self._loss_factor = 1.0  # loss scale / global label tokens, set before each schedule step
        self.schedule = build_schedule(
            parts,
            self.stage_ids,
            meshes.world["pp"],
            device,
            plan.pipeline,
            plan.batch.accumulation_steps,
            loss_fn=self._scaled_loss,
        )

    def _scaled_loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss for the schedule: of the last stage's logits, or with loss chunking the
        summed loss that stage computed itself; times loss scale / global label tokens."""
        summed = output if self.plan.loss.chunked else self.loss_fn(output, labels)
        return summed * self._loss_factor

    def accumulate(self, micro_batches: list[Batch], global_tokens: float, loss_scale: float) -> torch.Tensor:
        inputs = torch.cat([mb["input_ids"] for mb in micro_batches])
        labels = torch.cat([mb["labels"] for mb in micro_batches])
        # Keyword tensors reach every stage of this rank (split per micro-batch), so later stages
        # get the rope positions and document boundaries that activations do not carry.
        per_stage = {
            key: torch.cat([mb[key] for mb in micro_batches])
            for key in ("position_ids", "document_ids")
            if key in micro_batches[0]
        }
        if self.plan.loss.chunked:  # the last stage computes the loss, chunk by chunk
            per_stage["labels"] = labels
        self._loss_factor = loss_scale / global_tokens
        losses: list[torch.Tensor] = []
        with self.loss_context():  # the schedule runs backward too: no autocast (several ranks cast with FSDP)
            self.schedule.step(
                *((inputs,) if self.has_first else ()),
                target=labels if self.has_last else None,
                losses=losses,
                return_outputs=False,  # only the losses are wanted: no outputs kept until the step's end
                **per_stage,
            )
        total = torch.zeros((), device=self.device)
        for value in losses:
            total += _local(value).detach() / loss_scale
        dist.all_reduce(total, group=self.pp_group)
        return total

    def logits(self, batch: Batch) -> torch.Tensor | None:
        return pipeline_forward(
            self.parts,
            list(self.stage_ids),
            list(self.plan.pipeline.stage_owners),
            self.pp_group,
            batch["input_ids"],
            **_extra_inputs(batch),
        )


def build_model_step(plan: RunPlan, parts: list[Transformer], meshes: Meshes, device: torch.device) -> ModelStep:
    step_class = PipelineStep if plan.pipeline.degree > 1 else LocalStep
    return step_class(plan, parts, meshes, device)
