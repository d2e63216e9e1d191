"""MoE load metrics in TensorBoard: MaxVio per layer, expert-load heatmap, bias histograms, router entropy.

Shapes: L MoE layers, E routed experts, G expert groups, T tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from callbacks import moe_stats
from models.moe import _in_backward


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


class RouterEntropy:
    """Forward hooks on the gates that sum the entropy of each token's normalised affinities, per layer.

    Attached only for the micro-batches of a logging step; the hook functions and accumulators are made once.
    """

    def __init__(self, gates: list[torch.nn.Module], device: torch.device) -> None:
        self.gates = gates
        self.sum_L = torch.zeros(len(gates), dtype=torch.float64, device=device)
        self.tokens_L = torch.zeros(len(gates), dtype=torch.float64, device=device)
        self._hooks = [self._hook(i) for i in range(len(gates))]
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
            if not module.training or _in_backward():  # no eval passes, no activation-checkpoint recompute
                return
            with torch.no_grad():
                scores_TE = output[2].detach().float()
                p_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
                entropy_T = -(p_TE * p_TE.clamp_min(1e-30).log()).sum(dim=-1)
                self.sum_L[layer] += entropy_T.sum()
                self.tokens_L[layer] += entropy_T.numel()

        return hook

    def attach(self) -> None:
        if not self._handles:
            self._handles = [gate.register_forward_hook(h) for gate, h in zip(self.gates, self._hooks, strict=True)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def read(self) -> torch.Tensor | None:
        """Detach, and return the (L,) mean entropy over all ranks' tokens since the last read (a collective when
        distributed), or None when the hooks saw no token; the sums restart from zero.

        A block compiled with ``torch.compile`` before the hooks were attached does not run them (Dynamo does not
        guard on module hooks by default), hence None rather than a false zero.
        """
        self.detach()
        stats_2L = torch.stack((self.sum_L, self.tokens_L))
        self.sum_L.zero_()
        self.tokens_L.zero_()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats_2L)
        if not stats_2L[1].all():
            return None
        return (stats_2L[0] / stats_2L[1]).float()


class MoELoadMonitor(Callback):
    """Log whether the experts are balanced: the report's MaxVio per layer and more, to TensorBoard.

    Every ``log_every_n_steps`` optimizer steps, from the global loads of that step (all ranks, all
    micro-batches: one global batch, gathered once with ``ExpertBiasBalancing``, see ``callbacks.moe_stats``):

    - ``moe/layer{i}/max_vio``, ``moe/max_vio`` (mean over MoE layers), ``moe/max_vio_max`` (worst layer);
    - ``moe/dead_experts``: experts that received no token, summed over layers;
    - ``moe/group{g}/share``: share of routed pairs per expert group, mean over layers (1/G is balanced), and
      ``moe/group_max_vio`` (the MaxVio of groups, mean over layers), which bounds cross-node traffic;
    - ``moe/layer{i}/router_entropy``, ``moe/router_entropy``: mean over tokens of the entropy (nats) of the
      normalised affinities s_i / sum_j s_j (log E = uniform); measured by forward hooks on the gates that exist
      only during logging steps, so the model runs hook-free otherwise.

    Every ``image_every_n_steps``, with a ``TensorBoardLogger``: the image ``moe/expert_load`` (layers x
    experts, load / mean load; white = mean, red = over, blue = under) and the histograms
    ``moe/layer{i}/expert_bias`` of ``e_score_correction_bias``.

    Args:
        log_every_n_steps: Scalar interval in optimizer steps; ``None`` = the Trainer's ``log_every_n_steps``.
        image_every_n_steps: Image/histogram interval; ``None`` = 10 x the scalar interval.
        router_entropy: Measure the router entropy (gate hooks on logging steps only). Eager mode only: blocks
            compiled with ``torch.compile`` do not run hooks attached later, and the monitor then warns once and
            stops measuring it.
    """

    def __init__(
        self, log_every_n_steps: int | None = None, image_every_n_steps: int | None = None, router_entropy: bool = True
    ) -> None:
        for name, value in (("log_every_n_steps", log_every_n_steps), ("image_every_n_steps", image_every_n_steps)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of optimizer steps or None, got {value}")
        self.log_every_n_steps = log_every_n_steps
        self.image_every_n_steps = image_every_n_steps
        self.router_entropy = router_entropy
        self._tracker = moe_stats.OptimizerStepTracker()
        self._entropy: RouterEntropy | None = None

    def _every(self, trainer: Trainer) -> tuple[int, int]:
        scalars = self.log_every_n_steps or trainer.log_every_n_steps
        return scalars, self.image_every_n_steps or 10 * scalars

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tracker.reset(trainer)
        moe_stats.clear(pl_module)
        if self.router_entropy:
            gates = [moe.gate for _, moe in moe_stats.moe_layers(pl_module)]
            self._entropy = RouterEntropy(gates, pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        logs_next = (trainer.global_step + 1) % self._every(trainer)[0] == 0
        if self._entropy is not None and logs_next:
            self._entropy.attach()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._tracker.stepped(trainer):
            return
        loads = moe_stats.step_loads(trainer, pl_module)  # every step: it also starts the next step's counts
        every, image_every = self._every(trainer)
        if trainer.global_step % every:
            return
        metrics = self.metrics(loads, pl_module)
        if self._entropy is not None and self._entropy.attached:
            metrics.update(self._entropy_metrics(loads.layer_ids))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.global_step % image_every == 0 and trainer.is_global_zero:
            self.log_images(trainer, pl_module, loads)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._entropy is not None:
            self._entropy.detach()
            self._entropy = None

    def _entropy_metrics(self, layer_ids: list[int]) -> dict[str, float]:
        entropy_L = self._entropy.read()
        if entropy_L is None:
            rank_zero_warn(
                "MoELoadMonitor: the gate hooks saw no token, so no router entropy is logged; compiled blocks do not "
                "run hooks attached after compilation. Set router_entropy=False to silence this."
            )
            self._entropy = None
            return {}
        values = entropy_L.tolist()
        metrics = {f"moe/layer{i}/router_entropy": h for i, h in zip(layer_ids, values, strict=True)}
        metrics["moe/router_entropy"] = sum(values) / len(values)
        return metrics

    @staticmethod
    def metrics(loads: moe_stats.StepLoads, pl_module: LightningModule) -> dict[str, float]:
        """Scalar metrics of one step's global loads (one device-to-host copy)."""
        counts_LE = loads.counts_LE
        gate = moe_stats.moe_layers(pl_module)[0][1].gate
        vio_L = max_vio(counts_LE)
        share_LG = group_share(counts_LE, gate.n_group)
        group_vio_L = max_vio(share_LG)
        dead = (counts_LE == 0).sum().float()
        packed = torch.cat((vio_L, share_LG.mean(dim=0), group_vio_L.mean().view(1), dead.view(1))).tolist()
        n_layers, n_group = len(loads.layer_ids), gate.n_group
        vio, shares, (group_vio, dead) = packed[:n_layers], packed[n_layers:-2], packed[-2:]
        metrics = {f"moe/layer{i}/max_vio": v for i, v in zip(loads.layer_ids, vio, strict=True)}
        metrics["moe/max_vio"] = sum(vio) / n_layers
        metrics["moe/max_vio_max"] = max(vio)
        metrics["moe/dead_experts"] = dead
        if n_group > 1:
            metrics.update({f"moe/group{g}/share": s for g, s in enumerate(shares)})
            metrics["moe/group_max_vio"] = group_vio
        return metrics

    @staticmethod
    def log_images(trainer: Trainer, pl_module: LightningModule, loads: moe_stats.StepLoads) -> None:
        """The expert-load heatmap and the bias histograms, to every TensorBoardLogger."""
        counts_LE = loads.counts_LE.float()
        load_LE = counts_LE / counts_LE.mean(dim=1, keepdim=True).clamp_min(1e-12)
        image = load_heatmap(load_LE)
        layers = moe_stats.moe_layers(pl_module)
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            writer.add_image("moe/expert_load", image, trainer.global_step, dataformats="CHW")
            for i, moe in layers:
                bias = moe.gate.e_score_correction_bias.detach().float().cpu()
                writer.add_histogram(f"moe/layer{i}/expert_bias", bias, trainer.global_step)
