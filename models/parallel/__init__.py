"""Parallelism and execution transforms applied to a built model from outside: compile, activation checkpointing,
mixed precision with fp32 master weights."""

from models.parallel.compile import AC_MODES, apply_activation_checkpointing, compile_blocks
from models.parallel.mixed_precision import FP32_MODULES, MasterWeightAdamW, cast_parameters, main_params

__all__ = [
    "AC_MODES",
    "FP32_MODULES",
    "MasterWeightAdamW",
    "apply_activation_checkpointing",
    "cast_parameters",
    "compile_blocks",
    "main_params",
]
