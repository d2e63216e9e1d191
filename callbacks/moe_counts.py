"""``MoECounts``: the per-step expert loads of every MoE layer, summed once and shared by the MoE callbacks.

Shapes: L MoE layers (main blocks, then MTP blocks), E routed experts.

Each ``models.moe.MoE`` adds the tokens it routes to its ``tokens_per_expert`` (E,) buffer during training
forwards of its rank. The LightningModule owns one ``MoECounts`` over its model (``pl_module.moe_counts``,
built in ``configure_model``); after an optimizer step, the first callback that asks for the step's loads makes
it stack every layer's counts to (L, E), zero the local counters and sum the stack over the data-parallel
ranks with ONE ``all_reduce``. Other callbacks asking for the same step get the same tensor, so
``ExpertBiasBalancing`` and ``MoELoadMonitor`` share one collective and see the same global-batch loads
whatever their order in ``Trainer(callbacks=...)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from torch import nn

from models.model import Block
from models.moe import Gate, MoE, is_recomputing


def find_moe_layers(module: nn.Module) -> list[tuple[int, MoE]]:
    """(layer id, MoE) for every MoE in ``module``, main blocks first, then MTP blocks.

    Layer ids are those of the enclosing ``Block`` (as in ``moe/layer{i}/...``); MoE modules outside a
    DeepSeek-V3 block are numbered in module order.
    """
    found = [(m.layer_id, m.ffn) for m in module.modules() if isinstance(m, Block) and isinstance(m.ffn, MoE)]
    if not found:
        found = list(enumerate(m for m in module.modules() if isinstance(m, MoE)))
    return found


class MoECounts:
    """The tokens routed to each expert in one optimizer step, over all data-parallel ranks and micro-batches.

    Build it once the model exists (``configure_model``) and keep it on the LightningModule as ``moe_counts``:
    the MoE callbacks read it there. Every rank must call ``step_counts`` after each optimizer step (it may run
    a collective), which ``ExpertBiasBalancing`` and ``MoELoadMonitor`` do.

    Args:
        model: The network holding the ``models.moe.MoE`` layers (a ``DeepSeekV3``, or any module around one).
        group: Process group the counts are summed over: the data-parallel ranks, each of which routes its own
            tokens. ``None`` is the default group (all ranks: right for DDP and plain FSDP); with expert,
            tensor or pipeline parallelism pass the data-parallel group (e.g. ``mesh["dp"].get_group()``).
        stage_group: Under pipeline parallelism, the pipeline ranks (``mesh["pp"].get_group()``), which hold
            other layers: ``gather_stages`` collects every layer's statistics from them for logging.

    Attributes:
        layer_ids: Block index of each row (MTP blocks numbered after the main blocks).
        layers: The MoE modules, in the same order.
        group: The process group of the reductions; may be set after construction, before training.
    """

    def __init__(
        self, model: nn.Module, group: dist.ProcessGroup | None = None, stage_group: dist.ProcessGroup | None = None
    ) -> None:
        found = find_moe_layers(model)
        self.layer_ids = [i for i, _ in found]
        self.layers = [m for _, m in found]
        self.group = group
        self.stage_group = stage_group
        self._stage_layer_ids: list[list[int]] | None = None  # every pipeline rank's layer_ids, gathered once
        self._step: int | None = None
        self._counts_LE: torch.Tensor | None = None

    @property
    def gates(self) -> list[Gate]:
        return [m.gate for m in self.layers]

    def reset(self) -> None:
        """Zero the local counters and forget the cached step (at the start of training: stale counts go)."""
        self._step, self._counts_LE = None, None
        for m in self.layers:
            m.tokens_per_expert.zero_()

    def step_counts(self, step: int) -> torch.Tensor:
        """(L, E) float32 global counts of optimizer step ``step`` (``trainer.global_step`` after it), summed once.

        The first call for a step reduces and zeroes the local counters, so that the next step starts from zero;
        later calls for the same step return the same tensor. No host synchronisation.
        """
        if self._step != step:
            self._counts_LE = self.all_reduce(self.take_local())
            self._step = step
        return self._counts_LE

    def take_local(self) -> torch.Tensor:
        """This rank's (L, E) float32 counts since the last call, stacked; the layers' counters are zeroed."""
        counts_LE = torch.stack([m.tokens_per_expert.float() for m in self.layers])  # a copy: safe to reset below
        for m in self.layers:
            m.tokens_per_expert.zero_()
        return counts_LE

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over ``group`` (one collective, only with more than one rank); returns it.

        For any statistic of the routed tokens that must cover the global batch (the router entropy uses it).
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def gather_stages(self, values_LX: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Per-layer rows of this rank and of the other pipeline stages, in layer order: (layer ids, (L_all, ...)).

        ``values_LX`` holds one row per ``layer_ids`` entry (counts, statistics, biases). A collective over
        ``stage_group`` (call it on every pipeline rank); without one, this rank's rows as they are.
        """
        if self.stage_group is None or dist.get_world_size(self.stage_group) == 1:
            return self.layer_ids, values_LX
        if self._stage_layer_ids is None:
            self._stage_layer_ids = [None] * dist.get_world_size(self.stage_group)
            dist.all_gather_object(self._stage_layer_ids, self.layer_ids, group=self.stage_group)
        padded = values_LX.new_zeros((max(map(len, self._stage_layer_ids)), *values_LX.shape[1:]))
        padded[: len(self.layer_ids)] = values_LX
        gathered = [torch.empty_like(padded) for _ in self._stage_layer_ids]
        dist.all_gather(gathered, padded, group=self.stage_group)
        rows = [
            (layer, rank_rows[j])
            for ids, rank_rows in zip(self._stage_layer_ids, gathered, strict=True)
            for j, layer in enumerate(ids)
        ]
        rows.sort(key=lambda row: row[0])
        return [layer for layer, _ in rows], torch.stack([row for _, row in rows])

    @staticmethod
    def counting(module: nn.Module) -> bool:
        """Whether a forward of ``module`` now counts: training, and not an activation-checkpoint recompute.

        The rule ``MoE`` applies to ``tokens_per_expert``; hooks that gather their own statistics follow it.
        """
        return module.training and not is_recomputing()


def moe_counts_of(pl_module: LightningModule, callback: str) -> MoECounts:
    """``pl_module.moe_counts``, or a ``ValueError`` saying what the module must provide."""
    counts = getattr(pl_module, "moe_counts", None)
    if not isinstance(counts, MoECounts):
        raise ValueError(
            f"{callback} needs pl_module.moe_counts, a callbacks.MoECounts over the model's MoE layers: build it in "
            "configure_model (self.moe_counts = MoECounts(self.model)), as DeepSeekV3LitModule does"
        )
    if not counts.layers:
        raise ValueError(
            f"{callback}: the model has no models.moe.MoE layer; the MoE callbacks need n_routed_experts > 0 and "
            "first_k_dense_replace < num_hidden_layers"
        )
    return counts
