"""Tensor parallelism (Megatron-style) with optional sequence parallelism, via parallelize_module.

Attention heads and MLP columns are split over the tp mesh: wq/wk/wv and w1/w3 column-wise,
wo and w2 row-wise. With sequence parallelism the activations between those pairs (norms,
residuals) are split along the sequence instead of replicated, which saves activation memory
and turns each all-reduce into a reduce-scatter + all-gather pair. With loss parallelism the
output projection keeps its logits split over the vocabulary and the cross-entropy is computed
on the shards (`loss_parallel()`), so the full [tokens, vocab] logits never exist on one rank.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from titanlm.models.transformer import Transformer


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool) -> None:
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    if sequence_parallel:
        model.hidden_seq_shards = tp_mesh.size()
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks),
            "output": ColwiseParallel(
                input_layouts=between_blocks,
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
            # A plain local tensor out of the final norm: the chunked loss cuts this rank's share of
            # the sequence into chunks, which the output's input hook then all-gathers one by one.
            **({"norm": SequenceParallel(use_local_output=True)} if sequence_parallel else {}),
        },
    )
    # Both plans shard their weight over the vocabulary (Shard(0)), so a tied pair stays one DTensor.
    model.tie_embeddings_()
    # Blocks take (x, cos, sin, mask): only x is distributed; rope tables and masks stay local.
    gather_x = PrepareModuleInput(
        input_layouts=(between_blocks, None, None, None),
        desired_input_layouts=(Replicate(), None, None, None),
    )
    for block in model.layers.values():
        plan = {
            "attention": gather_x,
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between_blocks),
            "feed_forward": PrepareModuleInput(input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=between_blocks),
        }
        if sequence_parallel:
            plan |= {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}
        parallelize_module(block, tp_mesh, plan)
