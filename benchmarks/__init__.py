"""How titanlm measures itself: benchmarks, a peer adapter and profiling scripts, outside the package.

Not installed with titanlm. Run them from the repository root, e.g. `python benchmarks/benchmark.py --help`.

- benchmark.py: titanlm against a plain transformers loop and torchtitan on one model shape.
- torchtitan_peer.py: torchtitan's own trainer as that peer (CUDA and torchtitan 0.2.x).
- profile_step.py: where a training step's time goes, by kind of kernel.
- chunked_loss_memory.py: peak memory of one step with and without training.loss_chunk_tokens.
- manifest_cost.py: what the checkpoint manifest's checksums cost.
- loop_step_time.py: wall time per step of the whole training loop, to compare two checkouts.
- gpu_checks.sh: the GPU tests and measurements behind docs/benchmarks.md.
"""
