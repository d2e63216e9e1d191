"""Global per-expert loads of one optimizer step, gathered once and shared by the MoE callbacks.

Shapes: L MoE layers (main blocks, then MTP blocks), E routed experts.

Each ``MoE`` accumulates ``tokens_per_expert`` (E,) over the training forwards of its rank. After an
optimizer step, the first callback that needs the loads calls ``step_loads``: it stacks every layer's
counts to (L, E), resets the local counters, sums the stack over all ranks with ONE ``all_reduce`` and
caches the result on the LightningModule under the step number. Any other callback asking for the same
step gets the cached tensor, so ``ExpertBiasBalancing`` and ``MoELoadMonitor`` share one collective and
see the same global-batch loads whatever their order in ``Trainer(callbacks=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from models.model import Block
from models.moe import MoE

_CACHE_ATTR = "_moe_step_loads"
_LAYERS_ATTR = "_moe_layers"


@dataclass
class StepLoads:
    """Tokens routed to each expert in one optimizer step, summed over all ranks and micro-batches.

    Attributes:
        key: (id(trainer), global step) the loads belong to.
        layer_ids: Block index of each row (MTP blocks numbered after the main blocks).
        counts_LE: (L, E) float32 token counts, on the model's device.
    """

    key: tuple[int, int]
    layer_ids: list[int]
    counts_LE: torch.Tensor


def find_moe_layers(module: nn.Module) -> list[tuple[int, MoE]]:
    """(layer id, MoE) for every MoE in ``module``, main blocks first, then MTP blocks.

    Layer ids are those of the enclosing ``Block`` (as in ``moe/layer{i}/...``); MoE modules outside a
    DeepSeek-V3 block are numbered in module order.
    """
    found = [(m.layer_id, m.ffn) for m in module.modules() if isinstance(m, Block) and isinstance(m.ffn, MoE)]
    if not found:
        found = list(enumerate(m for m in module.modules() if isinstance(m, MoE)))
    return found


def reduce_and_reset_counts(moe_layers: list[MoE], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Stack the local ``tokens_per_expert`` of every layer, zero them, and sum the stack over ``group``.

    One ``all_reduce`` for all layers together, only when ``torch.distributed`` is initialised with more than
    one rank; no host synchronisation (the collective is enqueued like any other kernel).

    Returns:
        (L, E) float32 global counts.
    """
    counts_LE = torch.stack([m.tokens_per_expert.float() for m in moe_layers])  # a copy: safe to reset below
    for m in moe_layers:
        m.tokens_per_expert.zero_()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts_LE, op=dist.ReduceOp.SUM, group=group)
    return counts_LE


def step_loads(trainer: Trainer, pl_module: LightningModule) -> StepLoads:
    """Global loads of the optimizer step that just finished (``trainer.global_step``), gathered once.

    Call it on every rank after each optimizer step (it may run a collective).
    """
    key = (id(trainer), trainer.global_step)
    cached = getattr(pl_module, _CACHE_ATTR, None)
    if cached is not None and cached.key == key:
        return cached
    layers = moe_layers(pl_module)
    loads = StepLoads(key, [i for i, _ in layers], reduce_and_reset_counts([m for _, m in layers]))
    setattr(pl_module, _CACHE_ATTR, loads)
    return loads


def moe_layers(pl_module: LightningModule) -> list[tuple[int, MoE]]:
    """``find_moe_layers(pl_module)``, looked up once per training run (see ``clear``)."""
    layers = getattr(pl_module, _LAYERS_ATTR, None)
    if layers is None:
        layers = find_moe_layers(pl_module)
        if not layers:
            raise ValueError(
                "no models.moe.MoE layer found in the LightningModule; the MoE callbacks need a DeepSeekV3 model "
                "with n_routed_experts > 0 and first_k_dense_replace < num_hidden_layers"
            )
        setattr(pl_module, _LAYERS_ATTR, layers)
    return layers


def clear(pl_module: LightningModule) -> None:
    """Call at the start of training: look the layers up again, forget cached loads, zero the stale counters."""
    setattr(pl_module, _CACHE_ATTR, None)
    setattr(pl_module, _LAYERS_ATTR, None)
    for _, m in moe_layers(pl_module):
        m.tokens_per_expert.zero_()


class OptimizerStepTracker:
    """Tells, in ``on_train_batch_end``, whether an optimizer step happened since the previous call.

    Lightning calls ``on_train_batch_end`` after every micro-batch; ``trainer.global_step`` only advances when
    the optimizer stepped, i.e. once per gradient-accumulation cycle.
    """

    def __init__(self) -> None:
        self.last_step: int | None = None

    def reset(self, trainer: Trainer) -> None:
        self.last_step = trainer.global_step

    def stepped(self, trainer: Trainer) -> bool:
        if self.last_step is None:
            self.last_step = trainer.global_step
            return False
        stepped = trainer.global_step != self.last_step
        self.last_step = trainer.global_step
        return stepped
