"""float8 training through torchao: Linear layers compute in float8 with dynamic scaling.

The output projection stays in high precision (its logits feed the loss directly, and its vocab
dimension is often not a multiple of 16). With tensorwise scaling and FSDP, parameters can be
all-gathered in float8 (half the bytes of bf16); their scales are then computed for all
parameters at once after each optimizer step (`precompute_scales`). On CPU torchao emulates the
float8 matmul, so numerics are testable here and speed only on Hopper-class GPUs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from titanlm.config.job_config import Float8


def _float8_api():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ValueError(
            "float8.enable = true needs torchao: pip install 'titanlm[gpu]' (or pip install torchao)"
        ) from error
    return Float8LinearConfig, convert_to_float8_training


def apply_float8(model: nn.Module, cfg: Float8, output_name: str = "output") -> None:
    """Swap eligible Linear layers for torchao's float8 ones in place; `output_name` (the vocab
    projection, "lm_head" in transformers models) stays in high precision.

    Tensor parallelism comes after this with its usual styles: the Float8Linear layers then see
    DTensor activations and scale them over the whole tensor, as one process does (measured on
    CPU: the TP 2 step-1 loss equals one float8 process to 1e-6). torchao's float8 TP styles,
    which all-gather activations already in float8, need NCCL (gloo has no float8 dtype) and are
    a GPU follow-up.
    """
    _check_recipe(cfg)
    config_class, convert = _float8_api()
    config = config_class.from_recipe_name(cfg.recipe_name)
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

    convert(model, config=config, module_filter_fn=eligible)


def _check_recipe(cfg: Float8) -> None:
    """Refuse settings that contradict each other, whatever the world size: with one process there
    is no all-gather, yet the same config must not start on one rank and fail on two."""
    if cfg.enable and cfg.enable_fsdp_float8_all_gather and cfg.recipe_name != "tensorwise":
        raise ValueError(
            f"float8.enable_fsdp_float8_all_gather = true needs float8.recipe_name = 'tensorwise', not "
            f"'{cfg.recipe_name}' (torchao all-gathers only tensorwise-scaled weights in float8); set "
            "float8.recipe_name = 'tensorwise' or float8.enable_fsdp_float8_all_gather = false"
        )


def check_float8_device(cfg: Float8, device: torch.device) -> None:
    """Refuse, in one line, settings that contradict each other or a recipe this device's float8
    matmul cannot run."""
    _check_recipe(cfg)
    if cfg.enable and cfg.recipe_name == "rowwise" and device.type == "cpu" and not cpu_takes_row_scales():
        raise ValueError(
            f"float8.recipe_name 'rowwise' needs a GPU or torch >= 2.13 on CPU (torch {torch.__version__}'s CPU "
            "float8 matmul takes one scale per tensor); use float8.recipe_name = 'tensorwise'"
        )


def cpu_takes_row_scales() -> bool:
    """Whether the CPU float8 matmul accepts per-row scales (torch 2.11's does not; 2.13's does)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def float8_settings(cfg: Float8, fsdp: bool) -> Float8:
    """The float8 settings in effect, checked the same way with and without FSDP: without it (one
    process) there is no all-gather to do in float8."""
    _check_recipe(cfg)
    return cfg if fsdp else dataclasses.replace(cfg, enable_fsdp_float8_all_gather=False)


def precompute_scales(model_parts: list[nn.Module], cfg: Float8) -> None:
    """One fused amax/scale computation for all float8 parameters before the next all-gather."""
    if cfg.enable and cfg.enable_fsdp_float8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        for part in model_parts:
            precompute_float8_dynamic_scale_for_fsdp(part)
