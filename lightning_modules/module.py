"""DeepSeekV3LitModule: wires the model, its losses, the optimizer, the LR schedule and the logging.

The network is built in ``configure_model`` on the meta device and then materialised, so that a strategy
(FSDP2, expert parallel, FP8) can transform it before any memory is spent. ``training_step`` stays thin:
one forward, the loss the model returns, ``self.log`` of tensors (no host sync).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from callbacks.moe_counts import MoECounts
from lightning_modules.checkpoint_contents import check_compatible, tokenizer_json
from lightning_modules.nonfinite import NonFiniteGuard
from lightning_modules.strategy import DeepSeekV3Strategy
from models import DeepSeekV3, DeepSeekV3Config
from models.parallel.clip import clip_grad_norm_
from models.parallel.compile import AC_MODES, apply_activation_checkpointing, compile_blocks
from models.parallel.fp8 import FP8Config, convert_to_fp8
from models.parallel.parallelize import init_weights as init_sharded_weights
from models.parallel.parallelize import parallelize


def build_config(
    preset: str, overrides: dict[str, Any] | None = None, vocab_size: int | None = None
) -> DeepSeekV3Config:
    """The model config: a named preset, then ``overrides``, then the data's ``vocab_size`` (when linked)."""
    overrides = dict(overrides or {})
    if vocab_size is not None:
        if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
            raise ValueError(
                f"model.overrides.vocab_size={overrides['vocab_size']} disagrees with the tokenizer's vocab_size="
                f"{vocab_size} (linked from data.vocab_size); remove vocab_size from model.overrides"
            )
        overrides["vocab_size"] = vocab_size
    known = DeepSeekV3Config.from_preset(preset).to_dict()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} in model.overrides; valid keys are DeepSeekV3Config fields: {sorted(known)}"
        )
    try:
        return DeepSeekV3Config.from_preset(preset, **overrides)
    except ValueError as err:  # name where the value came from
        raise ValueError(f"model.preset {preset!r} with model.overrides: {err}") from err


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (ndim >= 2, incl. embeddings and stacked experts), none on 1-D params.

    The decayed group carries no ``weight_decay`` key, so the optimizer's own (YAML) value applies to it.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class DeepSeekV3LitModule(LightningModule):
    """Pretraining of a DeepSeek-V3-style MoE language model.

    Args:
        preset: Name of a ``DeepSeekV3Config`` preset (``tiny``, ``bench-1gpu``, ``moonlight-16b-a3b``,
            ``deepseek-v3-671b``, ...).
        overrides: ``DeepSeekV3Config`` fields to change on top of the preset, e.g. ``{hidden_size: 256}``.
        vocab_size: Vocabulary size; the CLI links it from ``data.vocab_size`` (do not set it twice).
        seq_len: Training sequence length; linked from ``data.seq_len``, checked against
            ``max_position_embeddings``.
        optimizer: Optimizer factory (LightningCLI injects it from the ``optimizer`` YAML key). Default: AdamW
            with the report's betas (0.9, 0.95), eps 1e-8, weight decay 0.1, lr 2.2e-4.
        lr_scheduler: LR scheduler factory, stepped every optimizer step (e.g. ``WarmupStableCosineLR``).
            Default: constant LR.
        compile: ``torch.compile`` each transformer block (``models.parallel.compile_blocks``); on GPUs.
        activation_checkpointing: ``none``, ``selective`` (keep matmul/attention outputs, recompute the rest) or
            ``full`` (keep block inputs only): trades recompute for memory, for larger micro-batches.
        fp8: FP8 training (``models.parallel.fp8``, docs/fp8.md): a recipe name (``tensorwise``, ``rowwise``,
            ``blockwise``) or ``{recipe: ..., experts: true, exclude: [module patterns]}``; None (default): off.
        max_nonfinite_skips: Optimizer steps with a non-finite loss or gradient norm that are skipped (on the
            device, with a fused optimizer) before the run stops; 0 stops at the first (``NonFiniteGuard``).
    """

    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        activation_checkpointing: str = "none",
        fp8: str | FP8Config | None = None,
        max_nonfinite_skips: int = 0,
    ) -> None:
        super().__init__()
        if activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"model.activation_checkpointing must be one of {AC_MODES}, got {activation_checkpointing!r}"
            )
        self.config = build_config(preset, overrides, vocab_size)
        self.fp8 = FP8Config.parse(fp8)
        if seq_len is not None and seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"data.seq_len={seq_len} exceeds the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}; lower data.seq_len or set "
                "model.overrides.max_position_embeddings"
            )
        # vocab_size/seq_len are the datamodule's hyperparameters (Lightning refuses two different values
        # under one name); the resolved config carries the model's, for TensorBoard and checkpoint readers.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "vocab_size", "seq_len"])
        self.hparams["model_config"] = self.config.to_dict()
        self.hparams["fp8"] = dataclasses.asdict(self.fp8) if self.fp8 is not None else None
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.nonfinite = NonFiniteGuard(max_nonfinite_skips)
        self.model: DeepSeekV3 | None = None
        # The per-step expert loads the MoE callbacks share (callbacks.moe_counts); built with the model.
        self.moe_counts: MoECounts | None = None
        self.tokens_seen = 0
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None
        self._checkpoint_step = 0  # global step of the loaded checkpoint: where validate/test log

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the network on the meta device, then allocate it where the strategy puts tensors and init.

        Idempotent: Lightning may call it more than once (fit after validate, ``load_from_checkpoint``).
        """
        if self.model is not None:
            return
        with torch.device("meta"):
            model = DeepSeekV3(self.config)
        strategy = self._trainer.strategy if self._trainer is not None else None
        sharded = isinstance(strategy, DeepSeekV3Strategy)
        if self.fp8 is not None:  # FP8 linears and experts on the meta model, before EP/FSDP2 and allocation
            convert_to_fp8(
                model, self.fp8, device=strategy.root_device if sharded else torch.get_default_device(), fsdp=sharded
            )
        if sharded:  # EP -> AC -> compile -> FSDP2 on the meta model, then shards
            parallelize(
                model,
                strategy.device_mesh,
                param_dtype=strategy.param_dtype,
                activation_checkpointing=self.hparams.activation_checkpointing,
                compile=self.hparams.compile,
                ranks_per_node=strategy.num_processes,
            )
            model.to_empty(device=strategy.root_device)  # each rank allocates its shards only
            init_sharded_weights(model, buffer_device=strategy.root_device)
            self.model = model
            self.moe_counts = MoECounts(model, group=strategy.data_parallel_group)  # summed over dp ranks only
            return
        device = torch.get_default_device()  # the strategy's root device inside Lightning's init context
        model.to_empty(device=device)
        model.init_weights(buffer_device=device)
        apply_activation_checkpointing(model, self.hparams.activation_checkpointing)
        if self.hparams.compile:
            compile_blocks(model)
        self.model = model
        self.moe_counts = MoECounts(model)  # the default group: every rank is data-parallel here

    def forward(self, input_ids: torch.Tensor, **kwargs: Any):
        """(B, S) token ids -> ``DeepSeekV3Output``."""
        return self.model(input_ids, **kwargs)

    # ------------------------------------------------------------------ steps
    def on_fit_start(self) -> None:
        log_hparams_record(self.trainer, self)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """batch (B, S+1) int64: inputs ``[:, :-1]``, next-token labels ``[:, 1:]``."""
        out = self.model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        self.nonfinite.observe_loss(out.loss)
        dp = self._data_parallel_mean()
        self.log("train/loss", out.loss, prog_bar=True, **dp)
        self.log("train/ce_loss", out.ce_loss, **dp)
        if out.mtp_loss is not None:
            self.log("train/mtp_loss", out.mtp_loss, **dp)
        if out.balance_loss is not None:
            self.log("train/balance_loss", out.balance_loss, **dp)
        self.tokens_seen += batch.shape[0] * (batch.shape[1] - 1) * self.trainer.world_size
        self.log("train/tokens_seen", float(self.tokens_seen))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return out.loss

    def _data_parallel_mean(self) -> dict[str, Any]:
        """``self.log`` arguments for the mean over the data-parallel ranks under ``DeepSeekV3Strategy``, whose ranks
        each train on their own rows of the global batch (one small all-reduce per scalar; no host sync)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSeekV3Strategy) and strategy.parallel_dims.dp > 1:
            return {"sync_dist": True, "sync_dist_group": strategy.data_parallel_group}
        return {}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/nonfinite_steps", self.nonfinite.bad_steps.float())
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.nonfinite.check()  # at logging steps, where Lightning reads the metrics anyway

    def on_train_end(self) -> None:
        self.nonfinite.check()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: torch.Tensor) -> None:
        labels = batch[:, 1:]
        out = self.model(batch[:, :-1], labels=labels, return_logits=False)
        n = (labels != -100).sum()
        if self._val_sum is None:
            self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
            self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_sum += out.ce_loss.detach().double() * n  # token-weighted mean over the whole split
        self._val_count += n

    def on_validation_epoch_start(self) -> None:
        self._val_sum = self._val_count = None

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", hp_metric=True)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", hp_metric=False)

    def _log_eval(self, stage: str, hp_metric: bool) -> None:
        if self._val_sum is None:
            return
        total = self.trainer.strategy.reduce(torch.stack([self._val_sum, self._val_count]), reduce_op="sum")
        loss = (total[0] / total[1].clamp_min(1)).float()
        metrics = {f"{stage}/loss": loss, f"{stage}/ppl": loss.exp(), **({"hp_metric": loss} if hp_metric else {})}
        fitting = self.trainer.state.fn == "fit"
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == f"{stage}/loss", logger=fitting)
        if not fitting:  # dsv3 validate/test of a checkpoint: the points go at the step it was trained to
            for logger in self.trainer.loggers:
                logger.log_metrics({k: v.item() for k, v in metrics.items()}, step=self._checkpoint_step)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        groups = param_groups(self.model)
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(groups, lr=2.2e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        else:
            optimizer = self.optimizer_factory(groups)
        self.nonfinite.check_optimizer(optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """Log ``grad_norm`` (total L2 norm before clipping) and clip by norm, computing the norm once."""
        if gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        max_norm = gradient_clip_val if gradient_clip_val else math.inf
        wrapped = self.trainer.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP (v1) flat shards: the wrapper reduces the norm over ranks
            norm = wrapped.clip_grad_norm_(max_norm)
        else:  # plain tensors, or DTensors on the dense and the expert meshes (FSDP2 x EP)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = clip_grad_norm_(params, max_norm=max_norm, foreach=True)
        self.log("grad_norm", norm)
        self.nonfinite.before_optimizer_step(optimizer, norm, self.global_step + 1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.nonfinite.check()  # never write the state of a non-finite step
        checkpoint["model_config"] = self.config.to_dict()
        checkpoint["tokens_seen"] = self.tokens_seen
        # The tokenizer travels with the weights, so `dsv3 generate` needs nothing but the checkpoint.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = tokenizer_json(getattr(datamodule, "tokenizer", None))
        if tokenizer is not None:
            checkpoint["tokenizer"] = tokenizer
            checkpoint["eos_token_id"] = getattr(datamodule, "eos_token_id", None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("model_config")
        if self.model is None and saved is not None:
            # load_from_checkpoint: the model is built after this hook, exactly as it was saved.
            self.config = DeepSeekV3Config.from_dict(saved)
        check_compatible(saved, self.config)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self._checkpoint_step = checkpoint.get("global_step", 0)


def log_hparams_record(trainer: Any, pl_module: LightningModule, extra: dict[str, Any] | None = None) -> None:
    """Write the run's HParams record: datamodule and module hyperparameters (plus ``extra``), naming hp_metric.

    With ``default_hp_metric: false`` Lightning writes no HParams record at all; this one names hp_metric (NaN until
    the first validation logs it), so TensorBoard's HParams tab lists and compares the run. TensorBoard keeps the
    first record of a run, so a sweep trial writes its own (with the swept values) earlier, in ``setup``.
    """
    datamodule = trainer.datamodule
    hparams = {**(datamodule.hparams_initial if datamodule is not None else {}), **pl_module.hparams, **(extra or {})}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics={"hp_metric": math.nan})
        elif extra:  # other loggers already got Lightning's own record; only the extra values are new
            logger.log_hyperparams(hparams)
