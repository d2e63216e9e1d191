"""MoE load metrics in TensorBoard: MaxVio per layer, dead experts, group shares, expert-load heatmap, biases.

Shapes: L MoE layers, E routed experts, G expert groups.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.moe_counts import moe_counts_of
from callbacks.optimizer_step import OptimizerStepTracker


def max_vio(counts_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i load_i / mean_i load_i - 1 per layer (Wang et al. 2024, used in the DeepSeek-V3 report).

    Args:
        counts_LE: (L, E) tokens routed to each expert over one global batch.

    Returns:
        (L,) float32; 0 is perfect balance, E - 1 is every token on one expert.
    """
    counts_LE = counts_LE.float()
    return counts_LE.amax(dim=1) / counts_LE.mean(dim=1).clamp_min(1e-12) - 1


def group_share(counts_LE: torch.Tensor, n_group: int) -> torch.Tensor:
    """(L, G) share of the routed (token, expert) pairs that went to each expert group (1/G is balanced)."""
    counts_LGe = counts_LE.float().view(counts_LE.shape[0], n_group, -1)
    group_LG = counts_LGe.sum(dim=-1)
    return group_LG / group_LG.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def load_heatmap(load_RC: torch.Tensor, vmax: float = 2.0, cell: int | None = None) -> torch.Tensor:
    """Render a (rows, cols) map of normalised loads (1 = mean) as a (3, H, W) image in [0, 1].

    White is the mean load, blue underloaded (0 = no tokens), red overloaded (saturating at ``vmax``). Each
    value becomes a ``cell`` x ``cell`` square so that small maps stay readable.
    """
    rows, cols = load_RC.shape
    cell = cell or max(1, min(16, 512 // max(rows, cols)))
    t_RC = ((load_RC.float().cpu() - 1) / (vmax - 1)).clamp(-1, 1)
    over_RC, under_RC = t_RC.clamp_min(0), (-t_RC).clamp_min(0)
    img_3RC = torch.stack((1 - under_RC, 1 - over_RC - under_RC, 1 - over_RC))
    return img_3RC.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)


class MoELoadMonitor(Callback):
    """Log whether the experts are balanced: the report's MaxVio per layer and more, to TensorBoard.

    Every ``log_every_n_steps`` optimizer steps, from the global loads of that step (all data-parallel ranks, all
    micro-batches: one global batch, summed once and shared with ``ExpertBiasBalancing`` through
    ``pl_module.moe_counts``, see ``callbacks.moe_counts``):

    - ``moe/layer{i}/max_vio``, ``moe/max_vio`` (mean over MoE layers), ``moe/max_vio_max`` (worst layer);
    - ``moe/dead_experts``: experts that received no token, summed over layers;
    - ``moe/group{g}/share``: share of routed pairs per expert group, mean over layers (1/G is balanced), and
      ``moe/group_max_vio`` (the MaxVio of groups, mean over layers), which bounds cross-node traffic.

    Every ``image_every_n_steps``, with a ``TensorBoardLogger``: the image ``moe/expert_load`` (layers x
    experts, load / mean load; white = mean, red = over, blue = under) and the histograms
    ``moe/layer{i}/expert_bias`` of ``e_score_correction_bias``. The router entropy is ``RouterEntropyMonitor``.

    Args:
        log_every_n_steps: Scalar interval in optimizer steps; ``None`` = the Trainer's ``log_every_n_steps``.
        image_every_n_steps: Image/histogram interval; ``None`` = 10 x the scalar interval.
    """

    def __init__(self, log_every_n_steps: int | None = None, image_every_n_steps: int | None = None) -> None:
        for name, value in (("log_every_n_steps", log_every_n_steps), ("image_every_n_steps", image_every_n_steps)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of optimizer steps or None, got {value}")
        self.log_every_n_steps = log_every_n_steps
        self.image_every_n_steps = image_every_n_steps
        self._tracker = OptimizerStepTracker()

    def _every(self, trainer: Trainer) -> tuple[int, int]:
        scalars = self.log_every_n_steps or trainer.log_every_n_steps
        return scalars, self.image_every_n_steps or 10 * scalars

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tracker.reset(trainer)
        moe_counts_of(pl_module, type(self).__name__).reset()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._tracker.stepped(trainer):
            return
        counts = moe_counts_of(pl_module, type(self).__name__)
        counts_LE = counts.step_counts(trainer.global_step)  # every step: it also starts the next step's counts
        every, image_every = self._every(trainer)
        if trainer.global_step % every:
            return
        # Under pipeline parallelism every stage's layers, gathered from the pipeline ranks (a collective).
        layer_ids, counts_LE = counts.gather_stages(counts_LE)
        metrics = self.metrics(layer_ids, counts.gates[0].n_group, counts_LE)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.global_step % image_every == 0:
            biases_LE = torch.stack([gate.e_score_correction_bias.detach().float() for gate in counts.gates])
            _, biases_LE = counts.gather_stages(biases_LE)
            if trainer.is_global_zero:
                self.log_images(trainer, layer_ids, counts_LE, biases_LE)

    @staticmethod
    def metrics(layer_ids: list[int], n_group: int, counts_LE: torch.Tensor) -> dict[str, float]:
        """Scalar metrics of one step's global (L, E) loads of the layers ``layer_ids`` (one device-to-host copy)."""
        vio_L = max_vio(counts_LE)
        share_LG = group_share(counts_LE, n_group)
        group_vio_L = max_vio(share_LG)
        dead = (counts_LE == 0).sum().float()
        packed = torch.cat((vio_L, share_LG.mean(dim=0), group_vio_L.mean().view(1), dead.view(1))).tolist()
        n_layers = len(layer_ids)
        vio, shares, (group_vio, dead) = packed[:n_layers], packed[n_layers:-2], packed[-2:]
        metrics = {f"moe/layer{i}/max_vio": v for i, v in zip(layer_ids, vio, strict=True)}
        metrics["moe/max_vio"] = sum(vio) / n_layers
        metrics["moe/max_vio_max"] = max(vio)
        metrics["moe/dead_experts"] = dead
        if n_group > 1:
            metrics.update({f"moe/group{g}/share": s for g, s in enumerate(shares)})
            metrics["moe/group_max_vio"] = group_vio
        return metrics

    @staticmethod
    def log_images(trainer: Trainer, layer_ids: list[int], counts_LE: torch.Tensor, biases_LE: torch.Tensor) -> None:
        """The expert-load heatmap and the bias histograms of the layers ``layer_ids``, to every TensorBoardLogger."""
        counts_LE = counts_LE.float()
        image = load_heatmap(counts_LE / counts_LE.mean(dim=1, keepdim=True).clamp_min(1e-12))
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            writer.add_image("moe/expert_load", image, trainer.global_step, dataformats="CHW")
            for i, bias_E in zip(layer_ids, biases_LE.cpu(), strict=True):
                writer.add_histogram(f"moe/layer{i}/expert_bias", bias_E, trainer.global_step)
