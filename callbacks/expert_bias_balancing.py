"""Auxiliary-loss-free load balancing: the expert-bias update of section 2.1.2 of the DeepSeek-V3 report.

Shapes: L MoE layers, E routed experts.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.moe_counts import moe_counts_of
from callbacks.optimizer_step import OptimizerStepTracker
from models.moe import MoE


def bias_update(counts_LE: torch.Tensor, gamma: float | torch.Tensor, center: bool = False) -> torch.Tensor:
    """The report's update: b_i += gamma * sign(mean load - load_i), per layer.

    Overloaded experts get a lower bias (chosen less), underloaded ones a higher bias.

    Args:
        counts_LE: (L, E) tokens routed to each expert over one global batch.
        gamma: Bias update speed (report: 0.001).
        center: Subtract each layer's mean update so that the biases of a layer keep summing to their start.

    Returns:
        (L, E) float32 increment.
    """
    counts_LE = counts_LE.float()
    delta_LE = torch.sign(counts_LE.mean(dim=1, keepdim=True) - counts_LE)
    if center:
        delta_LE = delta_LE - delta_LE.mean(dim=1, keepdim=True)
    return gamma * delta_LE


class ExpertBiasBalancing(Callback):
    """Move every MoE gate's ``e_score_correction_bias`` after each optimizer step (aux-loss-free balancing).

    After each optimizer step (once per gradient-accumulation cycle) the per-expert token counts of all MoE
    layers are summed over the data-parallel ranks with one all-reduce (``pl_module.moe_counts``, shared with
    ``MoELoadMonitor``, see ``callbacks.moe_counts``), the biases move by ``gamma * sign(mean_load - load_i)``
    in float32, and the counts are reset. The biases are persistent buffers of the model, so checkpoints carry
    them; the tokens seen (for ``freeze_after_tokens``) are the LitModule's ``tokens_seen``, the count every
    schedule reads. No host synchronisation per step.

    Args:
        gamma: Bias update speed gamma (report: 0.001).
        freeze_after_tokens: Update only while ``pl_module.tokens_seen`` (after the step) is at most this, then
            gamma = 0: the report's 0.001 for the first 14.3T tokens and 0 for the last 500B. ``None`` never
            freezes.
        center: Mean-centre each layer's update (the report does not).
    """

    def __init__(self, gamma: float = 1e-3, freeze_after_tokens: int | None = None, center: bool = False) -> None:
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0 (report: 0.001), got {gamma}")
        if freeze_after_tokens is not None and freeze_after_tokens < 0:
            raise ValueError(f"freeze_after_tokens must be >= 0 or None (never freeze), got {freeze_after_tokens}")
        self.gamma = gamma
        self.freeze_after_tokens = freeze_after_tokens
        self.center = center
        self.num_updates = 0
        self._tracker = OptimizerStepTracker()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tracker.reset(trainer)
        counts = moe_counts_of(pl_module, type(self).__name__)
        counts.reset()
        if self.freeze_after_tokens is not None and not hasattr(pl_module, "tokens_seen"):
            raise ValueError(
                "ExpertBiasBalancing.freeze_after_tokens reads pl_module.tokens_seen (DeepSeekV3LitModule)"
            )
        for gate in counts.gates:
            if gate.e_score_correction_bias.dtype != torch.float32:
                rank_zero_warn(
                    f"e_score_correction_bias is {gate.e_score_correction_bias.dtype}, not float32: bias steps of "
                    f"gamma={self.gamma} may round away. Keep the gate buffers in float32 (use mixed precision, "
                    "not a *-true precision, or cast them back in configure_model)."
                )
                break

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._tracker.stepped(trainer):
            return
        counts = moe_counts_of(pl_module, type(self).__name__)
        frozen = self.freeze_after_tokens is not None and pl_module.tokens_seen > self.freeze_after_tokens
        self.update(counts.layers, counts.step_counts(trainer.global_step), gamma=0.0 if frozen else self.gamma)

    @torch.no_grad()
    def update(self, moe_layers: list[MoE], counts_LE: torch.Tensor, gamma: float | None = None) -> None:
        """Apply one bias update from the global (L, E) counts of a step (``gamma`` None: ``self.gamma``)."""
        self.num_updates += 1
        gamma = self.gamma if gamma is None else gamma
        if gamma == 0:
            return
        delta_LE = bias_update(counts_LE, gamma, self.center)
        for moe, delta_E in zip(moe_layers, delta_LE, strict=True):
            bias = moe.gate.e_score_correction_bias
            bias.copy_(bias.float() + delta_E)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
