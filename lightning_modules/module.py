"""DeepSeekV3LitModule: wires the model, its losses, the optimizer, the LR schedule and the logging.

The network is built in ``configure_model`` on the meta device and then materialised, so that a strategy
(FSDP2, expert parallel, FP8) can transform it before any memory is spent. ``training_step`` stays thin:
one forward, the loss the model returns, ``self.log`` of tensors (no host sync).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.distributed.tensor import DTensor

from callbacks.moe_counts import MoECounts
from lightning_modules.checkpoint_contents import check_compatible, tokenizer_json
from lightning_modules.nonfinite import NonFiniteGuard
from lightning_modules.pipelining import PipelinedSteps, check_pipeline
from lightning_modules.schedule import WarmupStableCosineLR, value_after_tokens
from lightning_modules.strategy import DeepSeekV3Strategy, is_sharded_checkpoint, read_any_checkpoint
from models import DeepSeekV3, DeepSeekV3Config
from models.config import SHAPE_FIELDS
from models.hf_checkpoint import load_hf_weights, read_hf_config
from models.parallel.clip import clip_grad_norm_
from models.parallel.compile import AC_MODES, apply_activation_checkpointing, compile_blocks
from models.parallel.fp8 import FP8Config, convert_to_fp8, precompute_fsdp_scales
from models.parallel.mixed_precision import main_params
from models.parallel.parallelize import init_weights as init_sharded_weights
from models.parallel.parallelize import parallelize
from models.parallel.pipeline import PipelineConfig


def build_config(
    preset: str,
    overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    init_from: str | None = None,
) -> DeepSeekV3Config:
    """The model config: a named preset (or ``init_from``'s config), then ``overrides``, then the data's ``vocab_size``.

    With ``init_from`` the checkpoint fixes the shape: ``overrides`` may change other fields only (YaRN, loss
    weights, ...), and the tokenizer may be smaller than the checkpoint's (padded) vocabulary, not larger.
    """
    overrides = dict(overrides or {})
    base = config_from_source(init_from) if init_from else DeepSeekV3Config.from_preset(preset)
    if vocab_size is not None:
        if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
            raise ValueError(
                f"model.overrides.vocab_size={overrides['vocab_size']} disagrees with the tokenizer's vocab_size="
                f"{vocab_size} (linked from data.vocab_size); remove vocab_size from model.overrides"
            )
        if init_from and vocab_size > base.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens (data.vocab_size) but model.init_from {init_from} embeds "
                f"{base.vocab_size}; use the checkpoint's tokenizer (data.tokenizer)"
            )
        if not init_from:
            overrides["vocab_size"] = vocab_size
    known = base.to_dict()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} in model.overrides; valid keys are DeepSeekV3Config fields: {sorted(known)}"
        )
    reshaped = [k for k in SHAPE_FIELDS if k in overrides and overrides[k] != known[k]]
    if init_from and reshaped:
        raise ValueError(
            "model.overrides change the shape of the model.init_from checkpoint ("
            + "; ".join(f"{k}: {overrides[k]!r}, checkpoint {known[k]!r}" for k in reshaped)
            + "); the shape comes from the checkpoint, so remove these keys"
        )
    try:
        return DeepSeekV3Config.from_dict({**known, **overrides})
    except ValueError as err:  # name where the value came from
        source = f"model.init_from {init_from}" if init_from else f"model.preset {preset!r}"
        raise ValueError(f"{source} with model.overrides: {err}") from err


def data_parallel_size(trainer: Any) -> int:
    """Ranks that each read their own batch: the strategy's sampler replicas (its "dp" size), else the world size.

    Under expert or pipeline parallelism the world is larger than the data-parallel group, so tokens are counted
    with this, not with ``trainer.world_size``.
    """
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", trainer.world_size))


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
        init_from: Start from these weights: a Hugging Face folder of a DeepSeek-V3/Moonlight-shaped model
            (``config.json`` + safetensors, DeepSeek's FP8 block-scaled release included) or a dsv3 ``.ckpt``.
            The model config comes from it (``preset`` is not used; ``overrides`` may change non-shape fields,
            e.g. YaRN for a context extension); the optimizer, LR schedule and ``tokens_seen`` start fresh.
        mtp_loss_weight_after_tokens: The MTP loss weight by tokens seen, ``{tokens: weight}``: from each key on,
            its weight; before the first, ``mtp_loss_weight`` of the config (report: 0.3, then
            ``{10_000_000_000_000: 0.1}``).
        pipeline: How the model is pipelined when ``DeepSeekV3Strategy`` has ``pp > 1``: schedule, micro-batches,
            layers per stage (``models.parallel.pipeline.PipelineConfig``); None there = DualPipeV with as many
            micro-batches as stages. Not used without pipeline parallelism. docs/pipeline.md.
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
        init_from: str | None = None,
        mtp_loss_weight_after_tokens: dict[int, float] | None = None,
        pipeline: PipelineConfig | dict | None = None,
    ) -> None:
        super().__init__()
        if activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"model.activation_checkpointing must be one of {AC_MODES}, got {activation_checkpointing!r}"
            )
        if any(t < 0 or w < 0 for t, w in (mtp_loss_weight_after_tokens or {}).items()):
            raise ValueError(
                "model.mtp_loss_weight_after_tokens needs tokens >= 0 and weights >= 0, got "
                f"{mtp_loss_weight_after_tokens}"
            )
        self.config = build_config(preset, overrides, vocab_size, init_from)
        self.fp8 = FP8Config.parse(fp8)
        self._fp8_all_gather = False  # tensorwise weights all-gathered in FP8 by FSDP2 (set by configure_model)
        if seq_len is not None and seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"data.seq_len={seq_len} exceeds the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}; lower data.seq_len or set "
                "model.overrides.max_position_embeddings"
            )
        # vocab_size/seq_len are the datamodule's hyperparameters (Lightning refuses two different values
        # under one name); the resolved config carries the model's, for TensorBoard and checkpoint readers.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "vocab_size", "seq_len", "pipeline"])
        self.hparams["model_config"] = self.config.to_dict()
        self.hparams["fp8"] = dataclasses.asdict(self.fp8) if self.fp8 is not None else None
        # A plain dict in the hyperparameters (checkpoints load with weights_only); load_from_checkpoint passes it back.
        self.pipeline = PipelineConfig(**pipeline) if isinstance(pipeline, dict) else pipeline
        self.hparams["pipeline"] = dataclasses.asdict(self.pipeline) if self.pipeline is not None else None
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.nonfinite = NonFiniteGuard(max_nonfinite_skips)
        self.model: DeepSeekV3 | None = None
        self.pipelined: PipelinedSteps | None = None  # set by configure_model when the strategy has pp > 1
        # The per-step expert loads the MoE callbacks share (callbacks.moe_counts); built with the model.
        self.moe_counts: MoECounts | None = None
        # Global training tokens (all data-parallel ranks): the one count the schedules, the bias callback's
        # freeze, the batch ramp, checkpoints and logs read.
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
            self._fp8_all_gather = sharded and self.fp8.recipe == "tensorwise"
        if sharded:  # EP -> AC -> compile -> FSDP2 on the meta model, then shards
            if strategy.parallel_dims.pp > 1:  # this pp rank keeps the modules of its stages only
                check_pipeline(self.config, self.pipeline, strategy.parallel_dims.pp, None, strategy.param_dtype)
                ac = self.hparams.activation_checkpointing
                self.pipelined = PipelinedSteps(self.pipeline or PipelineConfig(), strategy.device_mesh, ac)
                self.pipelined.prune(model)
            parallelize(
                model,
                strategy.device_mesh,
                param_dtype=strategy.param_dtype,
                activation_checkpointing=self.hparams.activation_checkpointing,
                compile=self.hparams.compile,
                ranks_per_node=strategy.num_processes,
                ep_backward_group=self.pipelined is not None and self.pipelined.ep_backward_group,
            )
            model.to_empty(device=strategy.root_device)  # each rank allocates its shards only
            init_sharded_weights(model, buffer_device=strategy.root_device)
            if self.hparams.init_from:  # rank 0 reads it, every rank gets its shards
                load_source_weights(model, self.hparams.init_from)
            self.model = model
            # Summed over the dp ranks only; the pipeline ranks hold other layers, gathered for the logs.
            stages = self.pipelined.group if self.pipelined is not None else None
            self.moe_counts = MoECounts(model, group=strategy.data_parallel_group, stage_group=stages)
            return
        device = torch.get_default_device()  # the strategy's root device inside Lightning's init context
        model.to_empty(device=device)
        model.init_weights(buffer_device=device)
        if self.hparams.init_from:  # on a resume the checkpoint's weights replace these right after
            load_source_weights(model, self.hparams.init_from)
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
        if self.pipelined is not None and self.trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} is not supported with "
                "pipeline parallelism (the schedule accumulates its micro-batches); raise "
                "model.pipeline.n_microbatches and data.batch_size instead"
            )
        log_hparams_record(self.trainer, self)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """batch (B, S+1) int64: inputs ``[:, :-1]``, next-token labels ``[:, 1:]``."""
        mtp_weight = self.mtp_loss_weight()
        if self.pipelined is not None:  # the schedule runs every micro-batch's forward and backward
            out = self.pipelined.train_step(batch, mtp_loss_weight=mtp_weight)
        else:
            out = self.model(batch[:, :-1], labels=batch[:, 1:], return_logits=False, mtp_loss_weight=mtp_weight)
        self.nonfinite.observe_loss(out.loss)
        dp = self._data_parallel_mean()
        self.log("train/loss", out.loss, prog_bar=True, **dp)
        self.log("train/ce_loss", out.ce_loss, **dp)
        if out.mtp_loss is not None:
            self.log("train/mtp_loss", out.mtp_loss, **dp)
            self.log("train/mtp_loss_weight", mtp_weight)
        if out.balance_loss is not None:
            self.log("train/balance_loss", out.balance_loss, **dp)
        self.tokens_seen += batch.shape[0] * (batch.shape[1] - 1) * data_parallel_size(self.trainer)
        self.log("train/tokens_seen", float(self.tokens_seen))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return out.loss

    def _data_parallel_mean(self) -> dict[str, Any]:
        """``self.log`` arguments for the mean over the data-parallel ranks under ``DeepSeekV3Strategy``, whose ranks
        each train on their own rows of the global batch (one small all-reduce per scalar; no host sync)."""
        strategy = self.trainer.strategy
        if self.pipelined is not None:  # the pipeline's losses are the global batch's means already
            return {}
        if isinstance(strategy, DeepSeekV3Strategy) and strategy.parallel_dims.dp > 1:
            return {"sync_dist": True, "sync_dist_group": strategy.data_parallel_group}
        return {}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/nonfinite_steps", self.nonfinite.bad_steps.float())
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.nonfinite.check()  # at logging steps, where Lightning reads the metrics anyway

    def on_train_end(self) -> None:
        self.nonfinite.check()

    def mtp_loss_weight(self) -> float:
        """The MTP loss weight at ``tokens_seen`` (``mtp_loss_weight_after_tokens``)."""
        return value_after_tokens(
            self.config.mtp_loss_weight, self.hparams.mtp_loss_weight_after_tokens, self.tokens_seen
        )

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: torch.Tensor) -> None:
        labels = batch[:, 1:]
        if self.pipelined is not None:
            ce_loss = self.pipelined.eval_step(batch)
        else:
            ce_loss = self.model(batch[:, :-1], labels=labels, return_logits=False).ce_loss
        n = (labels != -100).sum()
        if self._val_sum is None:
            self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
            self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_sum += ce_loss.detach().double() * n  # token-weighted mean over the whole split
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
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.pipelined is None:  # under pipelining the schedule already ran the backward
            super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        # Lightning zeroes between training_step and backward; under pipelining the gradients exist by then (the
        # pipelined step clears them before its schedule).
        if self.pipelined is None:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

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

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step the schedule; a token-driven one (``WarmupStableCosineLR``) gets ``tokens_seen``."""
        if isinstance(scheduler, WarmupStableCosineLR):
            scheduler.step(self.tokens_seen)
        else:
            super().lr_scheduler_step(scheduler, metric)

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
            # The gradients the step applies: MasterWeightAdamW's fp32 sums after accumulation.
            # Under pipelining each rank holds other parameters: the norm sums over the pp group.
            group = self.pipelined.group if self.pipelined is not None else None
            norm = clip_grad_norm_(main_params(optimizer), max_norm=max_norm, foreach=True, group=group)
        self.log("grad_norm", norm)
        self.nonfinite.before_optimizer_step(optimizer, norm, self.global_step + 1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._fp8_all_gather:  # the new weights' FP8 all-gather scales, in one all-reduce
            precompute_fsdp_scales(self.model)

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


def config_from_source(init_from: str) -> DeepSeekV3Config:
    """``model.init_from``'s model config: an HF folder's ``config.json``, a dsv3 checkpoint's ``model_config``."""
    path = Path(init_from)
    if path.is_dir() and not is_sharded_checkpoint(path):
        return read_hf_config(path)
    if path.exists():
        return DeepSeekV3Config.from_dict(_source_checkpoint(path, weights=False)["model_config"])
    raise ValueError(
        f"model.init_from {init_from}: no such folder or file; give a Hugging Face checkpoint folder (config.json + "
        "safetensors) or a .ckpt written by dsv3 fit"
    )


def load_source_weights(model: DeepSeekV3, init_from: str) -> None:
    """Copy ``model.init_from``'s weights (and expert biases) into an allocated ``model`` of its shape.

    One device: tensor by tensor into the model (peak: the model plus one tensor). Sharded (DTensor parameters,
    FSDP2/EP): rank 0 reads the whole state dict into host memory and ``set_model_state_dict`` broadcasts it into
    every rank's shards, so rank 0 needs host memory for the full fp32 model. A pipeline stage (``prune_to_stages``:
    each pp rank holds other layers) reads the whole state dict on every rank and keeps its own entries.
    """
    path = Path(init_from)
    if isinstance(model.layers, nn.ModuleDict):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        own = model.state_dict()
        full = {k: v for k, v in _source_state_dict(path, model.config).items() if k in own}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    elif any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = _source_state_dict(path, model.config) if torch.distributed.get_rank() == 0 else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
    elif path.is_dir() and not is_sharded_checkpoint(path):
        load_hf_weights(model, path)
    else:
        model.load_state_dict(_source_state_dict(path, model.config))


def _source_state_dict(path: Path, config: DeepSeekV3Config) -> dict[str, torch.Tensor]:
    """``init_from``'s full state dict in this model's names, on the CPU."""
    if path.is_dir() and not is_sharded_checkpoint(path):
        with torch.device("meta"):
            model = DeepSeekV3(config)
        model.to_empty(device="cpu")
        model.init_weights()  # the buffers the checkpoint does not hold; every weight is overwritten
        load_hf_weights(model, path)
        return model.state_dict()
    state = _source_checkpoint(path)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def _source_checkpoint(path: Path, weights: bool = True) -> dict[str, Any]:
    """``init_from``'s dsv3 checkpoint (file or sharded); ``weights=False`` reads its metadata only (the config)."""
    checkpoint = read_any_checkpoint(path, weights=weights)
    if "model_config" not in checkpoint or (weights and "state_dict" not in checkpoint):
        raise ValueError(f"model.init_from {path}: not a dsv3 checkpoint (no 'model_config'/'state_dict')")
    return checkpoint
