"""Peak memory of one rank during a training step, estimated on any machine: no GPU, no peers.

`estimate_memory` picks one of two methods:

- "traced" (`trace_memory`): one steady-state step of the real model, in this process alone. A fake
  process group of the job's world size stands in for the peers (collectives move no data),
  FakeTensorMode for the tensors (shapes, dtypes and storages without bytes), and torch's memory
  tracker (`FSDPMemTracker`, `MemTracker` without FSDP) adds up the storages alive after every
  operator, by category. The model is built as the trainer builds it and the step runs as
  `titanlm.step.LocalStep` runs it: the last micro-batch's forward, loss and backward (with the
  earlier micro-batches' gradients present), the gradient norm, then AdamW with its state already
  there. It counts exactly the tensors that step creates, keeps and frees, with three substitutions:
  the tensors live on the CPU (FSDP2 needs the CUDA runtime to wrap a model on a "cuda" device), in
  the target device's dtypes; flex and varlen attention run as sdpa without a mask, which keeps
  what their kernels keep, the output and per-row softmax statistics, neither the score matrix nor
  a mask (`_MaskFreeAttention`; no document masks); and on a CUDA target the norms keep what CUDA's
  fused rms_norm keeps (`_cuda_rms_norm`).
- "formula" (`formula_memory`): a closed form from parameter counts and per-token activation sizes,
  used where the trace cannot run: pipeline parallelism (the tracker follows one forward per step; a
  schedule runs many), float8 (torchao's layers), FSDP CPU offload (host and device memory would be
  counted together), or a process group already present in this process.

What neither sees: the CUDA caching allocator's rounding and fragmentation, cuBLAS and NCCL
workspaces, the CUDA context (0.5-1 GiB per process), a compiled model's savings (traced eagerly) and
what a kernel allocates inside itself; how far a real GPU's peak lies above this estimate has not been
measured (no GPU here). Leave a margin before trusting a tight fit.

Measured (torch 2.13, 2 shared CPU cores): the fake trace equals the same step on real CPU tensors to
the byte on the debug model (FSDP 2 and TP 2; tests/test_memory_estimate.py). The formula is within
-9% to +4% of the trace on 28 debug-model layouts and within 0.2% on 5 cuts of Llama3-8B at 8K-32K
tokens. Tracing Llama3-8B at tp 4 x cp 2 x dp 4 (32 layers, 16K tokens per rank) takes 33 s and
350 MB (69 s with the 2 cores busy).

Written for torch 2.13 and 2.11; run on 2.13 only. It patches two torch internals for the length of a
trace (`_cuda_rms_norm`, `_untracked_sharding_propagation`) and imports torch's private memory
trackers and FakeStore, whose behaviour may change between releases.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from enum import Enum

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import _sharding_prop
from torch.testing._internal.distributed.fake_pg import FakeStore

from titanlm.models.attention import AttentionBackend, build_attention_backend
from titanlm.models.flavors import ModelArgs
from titanlm.models.transformer import Transformer
from titanlm.optim import build_optimizer
from titanlm.parallel.grad_norm import global_grad_norm
from titanlm.parallel.parallel_dims import Meshes
from titanlm.parallel.parallelize import materialize_parallelized, parallelize
from titanlm.plan import RunPlan
from titanlm.step import LocalStep

GIB = 2**30
_TRACE_DEVICE = "cpu"
_FORMULA_NOTE = "closed form"


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's memory in a steady-state training step (optimizer state already created), in GiB.

    `params_gib`: the parameters the rank keeps (under FSDP its fp32 shards). `grads_gib`: its
    gradients once backward is done. `optimizer_gib`: AdamW's two fp32 states. `activations_gib`: the
    tensors saved for backward alive at the peak. `other_gib`: the rest alive at the peak: FSDP's
    gathered parameters and unsharded gradients, gradients of activations (the loss's among them),
    buffers, inputs, the optimizer's temporaries.

    `peak_gib`: the highest total of live tensors in the step, = params + optimizer + activations +
    other + the gradients that exist at that moment. It is below the sum of the parts when the peak
    comes before backward has produced all gradients (usually: it comes early in backward).
    """

    params_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    other_gib: float
    peak_gib: float
    method: str  # "traced" or "formula"
    note: str  # one line: how it was made, or why the formula was used


def estimate_memory(plan: RunPlan, rank: int = 0) -> MemoryEstimate:
    """Rank `rank`'s peak memory under `plan` (for its world size and device type): traced where the
    trace can run, else the formula, with the reason in `note`. The trace takes seconds for small
    models, 30-70 s for Llama3-8B on 2 CPU cores (its time is in `note`)."""
    reason = _untraceable(plan)
    if reason:
        estimate = formula_memory(plan, rank)
        return replace(estimate, note=reason + estimate.note.removeprefix(_FORMULA_NOTE))
    return trace_memory(plan, rank)


def _untraceable(plan: RunPlan) -> str:
    """Why the trace cannot run this plan, or ""."""
    if plan.pipeline.degree > 1:
        return "pipeline parallelism, which the tracker cannot follow (one forward per step, a schedule runs many)"
    if plan.float8.enable:
        return "float8, whose torchao layers are not traced"
    if plan.fsdp.cpu_offload:
        return "FSDP CPU offload (a CPU trace cannot tell host from device memory)"
    if dist.is_initialized():
        return "this process already has a process group; the trace needs a fake one of its own"
    return ""


def trace_memory(plan: RunPlan, rank: int = 0, fake: bool = True) -> MemoryEstimate:
    """Trace one steady-state step of rank `rank` (see the module docstring) in a fake process group
    of the plan's world size, destroyed afterwards. Needs a process without a process group.

    `fake=False` runs the same step on real CPU tensors: collectives still move nothing, but every
    byte is allocated (the reference the fake trace is tested against; small models only)."""
    world_size, device_type = plan.world_size, plan.device_type
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with _quiet_torch_distributed():
            estimate = _traced_step(plan, fake)
    finally:
        shutdown_process_group()
    tensors = "fake" if fake else "real"
    note = f"one step on {tensors} CPU tensors in {time.perf_counter() - start:.0f} s"
    if device_type != _TRACE_DEVICE:
        note += f", {device_type}'s dtypes ({str(plan.precision.param_dtype).removeprefix('torch.')} parameters)"
    if plan.attention_backend != "sdpa":
        note += f"; {plan.attention_backend} attention as sdpa without a mask"
    if plan.compile:
        note += "; eagerly (a compiled model keeps less)"
    return replace(estimate, note=note)


@contextmanager
def _quiet_torch_distributed() -> Iterator[None]:
    """torch.distributed's advice about the step's collectives (e.g. a 2-D grad-norm reduction) is for a
    real run, not for the dry run's reader."""
    torch_logger = logging.getLogger("torch.distributed")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch_logger.setLevel(level)


def shutdown_process_group() -> None:
    """Destroy this process's default process group, if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()


# Tracker categories (FSDPMemTracker's names, then MemTracker's) of the MemoryEstimate fields; the
# other categories go to `other_gib`.
_PARAMS = ("Sharded Param", "Parameter")
_GRADS = ("Sharded Grad", "Gradient")
_OPTIMIZER = ("OptState", "Optstate")
_ACTIVATIONS = ("Activation",)


def _traced_step(plan: RunPlan, fake: bool) -> MemoryEstimate:
    # Imported here: the trackers' package takes 2 s to import, which the formula does not need.
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device(_TRACE_DEVICE)
    traced_plan = replace(plan, compile=False)
    global_tokens = plan.batch.global_batch_size * plan.batch.seq_len
    # Meshes hold real rank tensors: they are built outside the fake mode (as torch's own estimator
    # does), and so is the meta-device model under FSDP, hence a mode that accepts real inputs.
    meshes = plan.dims.build_meshes(device.type)
    tensors = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    backend = build_attention_backend("sdpa") if plan.attention_backend == "sdpa" else _MaskFreeAttention()
    model = _build_model(traced_plan, meshes, device, tensors, backend)
    gc.collect()  # the tracker sees a storage freed when Python frees it
    with tensors:
        step = LocalStep(traced_plan, [model], meshes, device)
        params = list(model.parameters())
        optimizer = build_optimizer(params, plan.optimizer, plan.optimizer_implementation)
        _steady_state(params, optimizer, accumulating=plan.batch.accumulation_steps > 1)
        batch = step.prepare(_random_batch(plan, device))
        if plan.fsdp.enabled:
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((batch,))
        else:
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
        norms = _cuda_rms_norm() if plan.device_type == "cuda" else nullcontext()
        propagation = _untracked_sharding_propagation() if fake else nullcontext()
        with tracker, norms, propagation:
            step.accumulate([batch], global_tokens, loss_scale=1.0)
            grads = _bytes(_categories(tracker.get_tracker_snapshot()), _GRADS)
            global_grad_norm([p.grad for p in params if p.grad is not None])  # clipping then scales in place
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steady = _categories(tracker.get_tracker_snapshot())
        peak = _categories(tracker.get_tracker_snapshot("peak"))
    params_bytes, optimizer_bytes = _bytes(steady, _PARAMS), _bytes(steady, _OPTIMIZER)
    activations = _bytes(peak, _ACTIVATIONS)
    other = peak["Total"] - params_bytes - optimizer_bytes - activations - _bytes(peak, _GRADS)
    return MemoryEstimate(
        params_gib=params_bytes / GIB,
        grads_gib=grads / GIB,
        optimizer_gib=optimizer_bytes / GIB,
        activations_gib=activations / GIB,
        other_gib=other / GIB,
        peak_gib=peak["Total"] / GIB,
        method="traced",
        note="",
    )


def _build_model(
    plan: RunPlan, meshes: Meshes, device: torch.device, tensors: AbstractContextManager, backend: AttentionBackend
) -> Transformer:
    """The model as `build_model_parts` builds it without pipeline stages, its tensors made under
    `tensors` (a FakeTensorMode, or nothing) and left unfilled: `init_weights` cuts each rank's shard
    out of a full tensor, which fake tensors cannot do.

    Under FSDP it is parallelized on the meta device outside `tensors` (FSDP over a TP mesh computes
    mesh coordinates from the real rank tensors), then allocated. One process has nothing to shard and
    is built on `device` at once: the fake mode holds weak references to the meta parameters it has
    converted, which `materialize` then cannot swap."""
    if not plan.fsdp.enabled:
        with tensors, device:
            model = Transformer(plan.model_args, backend)
        parallelize(model, meshes, plan)
        return model.train()
    with torch.device("meta"):
        model = Transformer(plan.model_args, backend)
    parallelize(model, meshes, plan)
    with tensors:
        materialize_parallelized(model, device, plan.fsdp.cpu_offload)
    return model.train()


class _MaskFreeAttention(AttentionBackend):
    """flex and varlen as the trace runs them: causal sdpa with no mask, which keeps what their kernels
    keep for backward, the output and the per-row logsumexp (the CPU's flash kernel, as theirs, makes
    no score matrix). sdpa itself takes context parallelism's rows as a dense [rows, 1, S/cp, S]
    boolean mask, built once per forward, and makes from it an additive copy in the compute dtype that
    every block without recomputation keeps: at 32K tokens and cp 2, 0.5 GiB and 1 GiB per block,
    which flex (a block mask of under a MiB) and varlen (none) do not hold. Left out: varlen under
    context parallelism copies each chunk's keys and values out of the gathered ones, (2 cp + 1) /
    (2 cp) times the gathered bytes instead of them (at 32K tokens, cp 2 and Llama3-8B's 8 key-value
    heads, 32 MiB more per block). Only the kept tensors matter here, so the causal alignment of a
    rank's queries against the whole row's keys is not the real one."""

    name = "sdpa without a mask"

    def prepare(self, document_ids):
        return None

    def prepare_shard(self, query_index, key_index, query_documents, key_documents):
        return None

    def __call__(self, q, k, v, prepared):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _steady_state(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, accumulating: bool) -> None:
    """One step on zero gradients creates AdamW's state. With gradient accumulation the gradients
    stay, as the step's earlier micro-batches leave theirs: the traced micro-batch is then the last
    one, which holds the most (the ones before it hold no more than it does)."""
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    if not accumulating:
        optimizer.zero_grad(set_to_none=True)


def _random_batch(plan: RunPlan, device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch of random tokens as the data loader gives it; bin data also carries positions
    and document ids, from which sdpa builds its mask (flex and varlen need no dense mask)."""
    rows, seq = plan.batch.local_batch_size, plan.batch.seq_len
    vocab = plan.model_args.vocab_size
    batch = {
        "input_ids": torch.randint(0, vocab, (rows, seq), device=device),
        "labels": torch.randint(0, vocab, (rows, seq), device=device),
    }
    if plan.data.kind == "bin" and plan.attention_backend == "sdpa":
        batch["position_ids"] = torch.arange(seq, device=device).expand(rows, seq)
        batch["document_ids"] = torch.zeros(rows, seq, dtype=torch.long, device=device)
    return batch


def _categories(snapshot: dict[torch.device, dict]) -> dict[str, int]:
    """A tracker snapshot of the trace device as {category: bytes}, "Total" included."""
    per_device = next((values for device, values in snapshot.items() if device.type == _TRACE_DEVICE), {})
    return {key.value if isinstance(key, Enum) else key: nbytes for key, nbytes in per_device.items()}


def _bytes(categories: dict[str, int], names: tuple[str, ...]) -> int:
    return sum(categories.get(name, 0) for name in names)


class _FusedRMSNorm(torch.autograd.Function):
    """`F.rms_norm` keeping for backward what CUDA's fused kernel keeps: its input (and a per-row
    fp32 scale, left out). CPU's composite rms_norm keeps two fp32 tensors of the input's size
    instead, in bfloat16 four times the input's bytes (measured on the debug model under FSDP: 29%
    more activations). Backward recomputes the norm."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        ctx.normalized_shape, ctx.eps = normalized_shape, eps
        ctx.save_for_backward(x, weight)
        return _composite_rms_norm(x, normalized_shape, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
            out = _composite_rms_norm(x, ctx.normalized_shape, weight, ctx.eps)
            grad_x, grad_weight = torch.autograd.grad(out, (x, weight), grad)
        return grad_x, None, grad_weight, None


_composite_rms_norm = F.rms_norm


@contextmanager
def _cuda_rms_norm() -> Iterator[None]:
    """Within: `F.rms_norm` (the model's norms) keeps what it keeps on CUDA."""
    F.rms_norm = lambda x, shape, weight=None, eps=None: _FusedRMSNorm.apply(x, shape, weight, eps)
    try:
        yield
    finally:
        F.rms_norm = _composite_rms_norm


@contextmanager
def _untracked_sharding_propagation() -> Iterator[None]:
    """Within: DTensor's sharding propagation makes its global-shape fake tensors in a fake mode of
    its own, which the tracker skips. torch 2.13 reuses the active fake mode, the trace's, and the
    tracker then counted them as the rank's memory: measured, 2 x tp extra [tokens, vocab / tp] fp32
    tensors in loss parallelism's cross-entropy, twice the real figure at tp 4."""
    detect = getattr(_sharding_prop, "detect_fake_mode", None)
    if detect is None:  # a torch whose propagation makes its own fake mode anyway
        yield
        return
    _sharding_prop.detect_fake_mode = lambda *args, **kwargs: None
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = detect


def formula_memory(plan: RunPlan, rank: int = 0) -> MemoryEstimate:
    """Rank `rank`'s peak memory under `plan` from a closed form, for its device type's dtypes (bfloat16
    parameters on cuda unless training.mixed_precision_param says otherwise).

    Notation: d = dim, f = ffn_dim, h = heads x head_dim, g = kv_heads x head_dim, V = vocab, t = tp,
    sp = t with sequence parallelism else 1, s = the FSDP shard size (dp_shard x cp; 1 without FSDP),
    T = the rank's tokens per micro-batch (local_batch_size x seq_len / cp), S = seq_len; c = bytes of
    the compute dtype (the parameter dtype under FSDP, the autocast dtype without it, else 4), p = of
    the parameter dtype, r = of the gradient reduce dtype.

    State: N = the rank's parameters: its stages' blocks (4 attention and 3 MLP matrices split over
    t, 2 norms) plus the embedding on the first stage and the output (V d / t) and final norm on the
    last. Parameters stay fp32 (the model is built so): 4N/s bytes, gradients 4N/s, AdamW 8N/s.

    Activations a block keeps per token, in bytes (eager; attention kernels that keep the output and
    the per-row softmax statistics, not the scores: flash, memory-efficient, flex, varlen):
      none       (2 d/sp) n + (2 d + (2 h + 2 g cp) / t + 4 f / t) c + 4 heads / t
                 norm inputs (n = c on CUDA, 4 under autocast, whose residual stream is fp32; 8 on the
                 CPU, whose composite norm keeps two fp32 copies), norm outputs (whole under SP:
                 gathered for the matmuls), q, k and v (gathered over cp), the attention output, w1's,
                 w3's and silu's outputs and their product, fp32 softmax statistics
      selective  (d/sp + 2 d + (2 h + 2 g) / t + 2 f / t) c + 4 heads / t: the block's input and what
                 activation_checkpoint._SAVED_OPS keeps (every matmul's and attention's output)
      full       (d/sp) c: the block's input; blocks past activation_checkpoint.layer_fraction keep
                 `none`'s
    A recomputing block holds its `none` activations again during its backward. The last stage keeps
    the final norm's input and output ((d/sp + d) c) and the fp32 log-probabilities (4 T V' bytes,
    V' = V/t under loss parallelism, else V); the loss's backward holds 2 more such tensors (3 under
    loss parallelism, measured). With training.loss_chunk_tokens = C nothing of the logits is kept
    and backward holds 3 fp32 [C, V] tensors. sdpa under a boolean mask (context parallelism, or bin
    data's document ids) adds the mask (local_batch_size x S/cp x S bytes) and per call its additive
    copy in c bytes, which a block without recomputation keeps. Without FSDP, autocast's c-byte copies of
    the weights count.

    Pipeline parallelism keeps the activations of the micro-batches in flight: all under GPipe and
    LoopedBFS; pp - pp_rank under 1F1B; under the schedules with v stages per rank, (v - 1) pp +
    2 (pp - 1 - pp_rank) + 1 stage-micro-batches (Megatron's interleaved warm-up; the zero-bubble
    and V schedules are taken to hold as many, unmeasured).

    Workspace (other), under FSDP: the root (embedding, output, final norm) stays gathered from
    forward to backward (p bytes), and with reshard_after_forward "never" (the default under
    pipeline parallelism) every block too (p bytes; 1 with float8 all-gathers). In a block's
    backward: that block and the next gathered, the block's unsharded gradients (p), the output's.

    The peak is the largest of five moments: the loss's backward (all kept activations, the loss's
    temporaries, the earlier micro-batches' gradients); the last block's backward (the loss's tensors
    gone, a recomputing block's activations back); the first block's backward (the other blocks'
    activations gone, their gradients made); the end of backward (all gradients, and the root's
    unsharded gradients with their r-byte reduce-scatter copy); the optimizer step (all gradients,
    and for the foreach kernel one more fp32 copy of the rank's parameters; CUDA's fused one none).
    `activations_gib` and `other_gib` are those of the chosen moment.

    Accuracy, against the trace (torch 2.13, CPU): from -9% to +4% on 28 debug-model layouts (FSDP,
    HSDP, TP with and without SP, CP, full, partial and selective recomputation, chunked loss, bin
    data's document masks, accumulation, one process; the worst is full recomputation, whose peak
    moves along backward; the tests hold it to 10%), within 0.2% on 5 cuts of Llama3-8B. Pipeline
    schedules cannot be traced: their in-flight counts are unmeasured. Left out: the small tensors
    (rope tables, norms' fp32 statistics, token indices, TP and CP communication buffers); float8
    activations are taken as bfloat16 ones (an upper bound); under FSDP CPU offload the state is in
    host memory and out of the figures (`note` gives its size).
    """
    args, dims, pipe = plan.model_args, plan.dims, plan.pipeline
    pp_rank = dims.coordinates(rank)["pp"]
    stages = pipe.stages_of(pp_rank)
    first, last = 0 in stages, pipe.num_stages - 1 in stages
    layers = [pipe.first_layer(stage) + i for stage in stages for i in range(pipe.layers_per_stage[stage])]
    t, shard = dims.tp, plan.fsdp.shard_degree if plan.fsdp.enabled else 1
    param_bytes = plan.precision.param_dtype.itemsize
    c = param_bytes if plan.fsdp.enabled else (plan.precision.autocast_dtype or torch.float32).itemsize
    gathered_bytes = 1 if plan.float8.enable_fsdp_float8_all_gather else param_bytes
    r = plan.precision.reduce_dtype.itemsize

    block = _block_params(args, t)
    embedding = args.vocab_size * args.dim // t if first else 0
    output = args.vocab_size * args.dim // t if last and not (args.tie_embeddings and first) else 0
    root = embedding + output + (args.dim if last else 0)
    n = len(layers) * block + root
    params, grads, optimizer = 4 * n / shard, 4 * n / shard, 8 * n / shard

    tokens = plan.batch.local_batch_size * plan.batch.seq_len // dims.cp
    per_token = _block_activation_bytes(plan, c)
    modes = [plan.activation_checkpoint if layer < plan.recomputed_layers else "none" for layer in layers]
    mask, document_mask = 0, 0
    if plan.attention_backend == "sdpa" and (dims.cp > 1 or plan.data.kind == "bin"):
        # Under context parallelism every batch carries document ids (one per row without bin data).
        document_mask = mask = plan.batch.local_batch_size * plan.batch.seq_len // dims.cp * plan.batch.seq_len
    blocks_kept = [per_token[mode] * tokens + (mask * c if mode == "none" else 0) for mode in modes]
    vocab_share = args.vocab_size // t if plan.tp.loss_parallel else args.vocab_size
    sp = t if plan.tp.sequence_parallel else 1
    final_kept, log_probs, loss_backward = 0, 0, 0
    if last:
        final_kept = (args.dim / sp + args.dim) * tokens * c
        if plan.loss.chunked:
            loss_backward = 3 * 4 * min(plan.loss.chunk_tokens, tokens) * vocab_share
        else:
            log_probs = 4 * tokens * vocab_share
            loss_backward = (3 if plan.tp.loss_parallel else 2) * log_probs
    autocast_copies = (n - embedding) * c if plan.precision.autocast_dtype else 0
    micro_batch = sum(blocks_kept) + final_kept + log_probs + document_mask + autocast_copies
    activations = _micro_batches_in_flight(plan, pp_rank) * micro_batch

    gathered = root * param_bytes if plan.fsdp.enabled else 0
    if plan.fsdp.enabled and plan.fsdp.reshard_after_forward == "never":
        gathered += len(layers) * block * gathered_bytes
    earlier_grads = grads if plan.batch.accumulation_steps > 1 else 0
    # Each moment: (activations, gradients, other) alive then, besides parameters and optimizer state.
    moments = {"the loss's backward": (activations, earlier_grads, gathered + loss_backward)}
    if layers:
        # A block's backward: the loss's tensors are gone; a recomputing block has its activations
        # back; FSDP holds it and the next gathered, its unsharded gradients and the output's. The
        # last block's comes first, with the most activations left; the first block's last, with
        # the most gradients made: which one is higher depends on recomputation.
        workspace = gathered + (
            block * (2 * gathered_bytes + param_bytes) + output * param_bytes if plan.fsdp.enabled else 0
        )
        restored = [
            (per_token["none"] - per_token[mode]) * tokens + mask * c if mode != "none" else 0 for mode in modes
        ]
        after_loss = activations - log_probs - final_kept
        moments["the last block's backward"] = (after_loss + restored[-1], earlier_grads, workspace)
        made = 4 * (n - block - embedding) / shard
        moments["the first block's backward"] = (
            after_loss - sum(blocks_kept[1:]) + restored[0],
            max(earlier_grads, made),
            workspace,
        )
    if plan.fsdp.enabled:
        moments["the end of backward"] = (0, grads, root * (param_bytes + r))
    foreach = plan.optimizer_implementation == "foreach"
    moments["the optimizer step"] = (0, grads, 4 * n / shard if foreach and not plan.fsdp.cpu_offload else 0)
    on_device = 0 if plan.fsdp.cpu_offload else 1  # the state lives in host memory
    activations, present, other = max(moments.values(), key=lambda m: m[0] + m[1] * on_device + m[2])
    peak = (params + optimizer + present) * on_device + activations + other
    note = _FORMULA_NOTE
    if plan.fsdp.cpu_offload:
        note += f"; {(params + grads + optimizer) / GIB:.2f} GiB of state in host memory, left out"
    return MemoryEstimate(
        params_gib=params * on_device / GIB,
        grads_gib=grads * on_device / GIB,
        optimizer_gib=optimizer * on_device / GIB,
        activations_gib=activations / GIB,
        other_gib=other / GIB,
        peak_gib=peak / GIB,
        method="formula",
        note=note,
    )


def _block_params(args: ModelArgs, tp: int) -> int:
    """One transformer block's parameters on a tensor-parallel rank."""
    h, g = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    matrices = args.dim * (2 * h + 2 * g) + 3 * args.dim * args.ffn_dim
    biases = (h + 2 * g) // tp + args.dim if args.attn_bias else 0
    return matrices // tp + biases + 2 * args.dim


def _block_activation_bytes(plan: RunPlan, c: int) -> dict[str, float]:
    """Bytes a block keeps per token, per activation-checkpoint mode (see `formula_memory`)."""
    args, t, cp = plan.model_args, plan.dims.tp, plan.dims.cp
    d, f = args.dim, args.ffn_dim
    h, g = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    sp = t if plan.tp.sequence_parallel else 1
    norm = 8 if plan.device_type != "cuda" else 4 if plan.precision.autocast_dtype else c
    statistics = 4 * args.n_heads / t
    return {
        "none": 2 * d / sp * norm + (2 * d + (2 * h + 2 * g * cp) / t + 4 * f / t) * c + statistics,
        "selective": (d / sp + 2 * d + (2 * h + 2 * g) / t + 2 * f / t) * c + statistics,
        "full": d / sp * c,
    }


def _micro_batches_in_flight(plan: RunPlan, pp_rank: int) -> float:
    """How many micro-batches' activations of all its stages a pipeline rank holds at once."""
    pipe, n = plan.pipeline, plan.batch.accumulation_steps
    if pipe.degree == 1:
        return 1
    if pipe.schedule.lower() in ("gpipe", "loopedbfs"):
        return n
    if pipe.stages_per_rank == 1:
        return min(n, pipe.degree - pp_rank)
    warmup = (pipe.stages_per_rank - 1) * pipe.degree + 2 * (pipe.degree - 1 - pp_rank) + 1
    return min(n * pipe.stages_per_rank, warmup) / pipe.stages_per_rank
