"""One device, bf16 parameters over fp32 master weights: the precision plugin that owns the model's dtype.

``trainer.precision`` picks Lightning's own modes (``32-true``, ``bf16-mixed`` = fp32 parameters + autocast).
This plugin is the third, the fast one-GPU mode of ``configs/bench-1gpu.yaml``::

    trainer:
      plugins:
        - class_path: lightning_modules.MasterWeightPrecision   # (no trainer.precision key beside it)
    model:
      optimizer:
        class_path: models.parallel.MasterWeightAdamW

Lightning calls ``convert_module`` after ``configure_model`` and before ``configure_optimizers``: the plugin casts
the parameters to bf16 there (buffers and the router stay fp32) and leaves each one's fp32 value on it, which
``MasterWeightAdamW`` takes as its master weight, so the masters start from the exact fp32 initialisation (or the
weights ``init_from`` loaded). Sharded runs keep fp32 parameters and let FSDP2's ``MixedPrecisionPolicy`` cast
them for compute (the strategy, with ``trainer.precision: bf16-mixed``); this plugin refuses other strategies.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from models.parallel.mixed_precision import MasterWeightAdamW, cast_parameters, main_params


class MasterWeightPrecision(Precision):
    """bf16 parameters for compute, fp32 master weights, moments and accumulated gradients in the optimizer.

    No autocast: the bf16 parameters compute in bf16 directly (the gate and the MoE buffers in fp32). Use it
    with ``models.parallel.MasterWeightAdamW``; gradient clipping and ``grad_norm`` read the optimizer's fp32
    gradients when micro-batches were accumulated (``main_params``).
    """

    precision = "bf16-true"

    def convert_module(self, module: nn.Module) -> nn.Module:
        trainer = module.trainer if isinstance(module, LightningModule) and module._trainer is not None else None
        if trainer is not None and not isinstance(trainer.strategy, SingleDeviceStrategy):
            raise ValueError(
                f"trainer.plugins MasterWeightPrecision runs on one device, not under {type(trainer.strategy).__name__}"
                "; for sharded training drop the plugin and set trainer.precision: bf16-mixed (FSDP2 mixed precision)"
            )
        # Masters are kept only when an optimizer will take them (fit), not for validate/test.
        fitting = trainer is None or trainer.state.fn == TrainerFn.FITTING
        return cast_parameters(module, torch.bfloat16, keep_masters=fitting)

    def connect(self, model: nn.Module, optimizers: list[Any], lr_schedulers: list[Any]) -> tuple:
        for optimizer in optimizers:
            if not isinstance(optimizer, MasterWeightAdamW):
                raise ValueError(
                    f"trainer.plugins MasterWeightPrecision needs model.optimizer models.parallel.MasterWeightAdamW "
                    f"(got {type(optimizer).__name__}, which would update the bf16 weights without fp32 masters); "
                    "or drop the plugin and use trainer.precision: bf16-mixed with torch.optim.AdamW"
                )
        return super().connect(model, optimizers, lr_schedulers)

    def main_params(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return main_params(optimizer)
