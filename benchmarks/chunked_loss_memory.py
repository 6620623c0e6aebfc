"""Peak host memory and time of one forward + backward with and without training.loss_chunk_tokens.

    python benchmarks/chunked_loss_memory.py CHUNK_TOKENS SEQ_LEN     # CHUNK_TOKENS 0 = full logits

A 2-layer, dim-256 model with Llama3's 128,256-token vocabulary, so the output projection and its
float32 logits dominate. Run each setting in its own process: the peak resident size is per process.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
import torch.nn.functional as F

from titanlm.models import ModelArgs, Transformer


def main(chunk: int, seq: int) -> None:
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=128256, rope_theta=500000.0)
    model = Transformer(args)
    model.init_weights(seed=0)
    model.loss_chunk_tokens = chunk
    tokens = torch.randint(0, args.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, dims=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    start = time.perf_counter()
    if chunk:
        loss = model(tokens, labels=labels)
    else:
        loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), labels.flatten(), reduction="sum")
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"loss_chunk_tokens {chunk}: loss {loss.item():.2f}; peak RSS {peak:.2f} GiB "
        f"({before:.2f} before the step); forward + backward {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
