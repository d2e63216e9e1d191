"""Router entropy in TensorBoard: how spread each token's affinities are over the experts, per MoE layer.

Shapes: L MoE layers, E routed experts, T tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.moe_counts import MoECounts, moe_counts_of
from callbacks.optimizer_step import OptimizerStepTracker


class GateEntropyHooks:
    """Forward hooks on the gates that sum the entropy of each token's normalised affinities, per layer.

    Attached only for the micro-batches of a logging step; the hook functions and accumulators are made once.
    Eval forwards and activation-checkpoint recomputes are not counted (``MoECounts.counting``).
    """

    def __init__(self, counts: MoECounts, device: torch.device) -> None:
        self.counts = counts
        self.gates = counts.gates
        self.sum_L = torch.zeros(len(self.gates), dtype=torch.float64, device=device)
        self.tokens_L = torch.zeros(len(self.gates), dtype=torch.float64, device=device)
        self._hooks = [self._hook(i) for i in range(len(self.gates))]
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
            if not MoECounts.counting(module):
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
        """Detach, and return the (L,) mean entropy over all data-parallel ranks' tokens since the last read (a
        collective when distributed), or None when the hooks saw no token; the sums restart from zero.

        A block compiled with ``torch.compile`` before the hooks were attached does not run them (Dynamo does not
        guard on module hooks by default), hence None rather than a false zero.
        """
        self.detach()
        stats_2L = self.counts.all_reduce(torch.stack((self.sum_L, self.tokens_L)))
        self.sum_L.zero_()
        self.tokens_L.zero_()
        if not stats_2L[1].all():
            return None
        return (stats_2L[0] / stats_2L[1]).float()


def _compiled(module: torch.nn.Module) -> bool:
    # nn.Module.compile() (models.parallel.compile_blocks) swaps in a compiled call; hooks added later never run.
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


class RouterEntropyMonitor(Callback):
    """Log ``moe/layer{i}/router_entropy`` and ``moe/router_entropy`` every ``log_every_n_steps`` optimizer steps.

    The mean over the step's training tokens (all micro-batches, all data-parallel ranks) of the entropy, in nats,
    of the normalised affinities s_i / sum_j s_j: log E when the router is uniform, 0 when it picks one expert.
    Measured by forward hooks on the gates that exist only during the micro-batches of logging steps, so the
    model runs hook-free otherwise. Eager mode only: with compiled blocks (``model.compile: true``) the hooks
    would not run, so the callback says so once and measures nothing.

    Args:
        log_every_n_steps: Interval in optimizer steps; ``None`` = the Trainer's ``log_every_n_steps``.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        if log_every_n_steps is not None and log_every_n_steps <= 0:
            raise ValueError(
                f"log_every_n_steps must be a positive number of optimizer steps or None, got {log_every_n_steps}"
            )
        self.log_every_n_steps = log_every_n_steps
        self._tracker = OptimizerStepTracker()
        self._hooks: GateEntropyHooks | None = None

    def _every(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tracker.reset(trainer)
        counts = moe_counts_of(pl_module, type(self).__name__)
        if _compiled(pl_module):
            rank_zero_info("RouterEntropyMonitor: the blocks are compiled and would not run gate hooks; no entropy")
            return
        self._hooks = GateEntropyHooks(counts, pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._hooks is not None and (trainer.global_step + 1) % self._every(trainer) == 0:
            self._hooks.attach()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._tracker.stepped(trainer) or self._hooks is None or not self._hooks.attached:
            return
        if trainer.global_step % self._every(trainer):
            return
        entropy_L = self._hooks.read()
        if entropy_L is None:
            rank_zero_warn("RouterEntropyMonitor: the gate hooks saw no token, so no router entropy is logged")
            self._hooks = None
            return
        # Under pipeline parallelism every stage's layers, gathered from the pipeline ranks (a collective).
        layer_ids, entropy_L = moe_counts_of(pl_module, type(self).__name__).gather_stages(entropy_L)
        values = entropy_L.tolist()
        metrics = {f"moe/layer{i}/router_entropy": h for i, h in zip(layer_ids, values, strict=True)}
        metrics["moe/router_entropy"] = sum(values) / len(values)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._hooks is not None:
            self._hooks.detach()
            self._hooks = None
