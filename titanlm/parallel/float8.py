"""float8 training through torchao: Linear layers compute in float8 with dynamic scaling.

The output projection stays in high precision (its logits feed the loss directly, and its vocab
dimension is often not a multiple of 16). With tensorwise scaling and FSDP, parameters can be
all-gathered in float8 (half the bytes of bf16); their scales are then computed for all
parameters at once after each optimizer step (`precompute_scales`). On CPU torchao emulates the
float8 matmul, so numerics are testable here and speed only on Hopper-class GPUs.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from titanlm.config.job_config import Float8


def apply_float8(model: nn.Module, cfg: Float8, output_name: str = "output") -> None:
    """`cfg`: the settings in effect (`RunPlan.float8`). Swap eligible Linear layers for torchao's float8
    ones in place; `output_name` (the vocab projection, "lm_head" in transformers models) stays in high precision.

    Tensor parallelism comes after this with its usual styles: the Float8Linear layers then see
    DTensor activations and scale them over the whole tensor, as one process does (measured on
    CPU: the TP 2 step-1 loss equals one float8 process to 1e-6). torchao's float8 TP styles,
    which all-gather activations already in float8, need NCCL (gloo has no float8 dtype) and are
    a GPU follow-up.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # the plan checked it is installed

    config = Float8LinearConfig.from_recipe_name(cfg.recipe_name)
    if cfg.enable_fsdp_float8_all_gather:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)

    def eligible(module: nn.Module, fqn: str) -> bool:
        # float8 matmuls need both dimensions divisible by 16.
        return (
            isinstance(module, nn.Linear)
            and not fqn.endswith(output_name)
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    convert_to_float8_training(model, config=config, module_filter_fn=eligible)


def precompute_scales(model_parts: list[nn.Module], cfg: Float8) -> None:
    """One fused amax/scale computation for all float8 parameters before the next all-gather."""
    if cfg.enable and cfg.enable_fsdp_float8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        for part in model_parts:
            precompute_float8_dynamic_scale_for_fsdp(part)
