"""Parallelism and execution transforms applied to a built model from outside: compile, activation checkpointing,
mixed precision with fp32 master weights."""

from models.parallel.compile import AC_MODES, apply_activation_checkpointing, compile_blocks
from models.parallel.mixed_precision import MasterWeightAdamW, cast_parameters

__all__ = ["AC_MODES", "MasterWeightAdamW", "apply_activation_checkpointing", "cast_parameters", "compile_blocks"]
