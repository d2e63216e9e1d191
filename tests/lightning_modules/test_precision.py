"""Precision modes under the Trainer: grad_norm and clipping against an fp32 reference, with 1 and more micro-batches
(the batch ramp included); the MasterWeightPrecision plugin owns the cast and the masters start from the fp32 init."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_modules import BatchSizeWarmup, DeepSeekV3LitModule, MasterWeightPrecision
from models.parallel.mixed_precision import MasterWeightAdamW, fp32_parameters, main_params
from tests.lightning_modules.conftest import SMALL_MODEL

MODEL = {**SMALL_MODEL, "vocab_size": 256, "max_position_embeddings": 64, "init_std": 0.02}
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
MAX_NORM = 0.3  # below the gradient norm of these steps, so clipping acts


class StepSpy(Callback):
    """Per optimizer step: its micro-batches, the fp32 weights it starts from, the logged grad_norm, and the
    norm of the gradients the optimizer then applies (after clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._batches: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def spied_step(closure=None):
            closure()  # the last micro-batch's forward/backward and Lightning's clipping
            weights = {
                n: optimizer.state[p]["master"].clone()
                if "master" in optimizer.state[p]
                else p.detach().float().clone()
                for n, p in pl_module.model.named_parameters()
            }
            grads = [h.grad for h in main_params(optimizer) if h.grad is not None]
            applied = torch.nn.utils.get_total_norm(grads).item()
            dtypes = {g.dtype for g in grads}
            self.steps.append({"batches": self._batches, "weights": weights, "applied": applied, "dtypes": dtypes})
            self._batches = []
            return step()

        optimizer.step = spied_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batches.append(batch.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._batches:  # this batch closed a window: its step ran
            self.steps[-1]["grad_norm"] = trainer.callback_metrics["grad_norm"].item()


def _fit(mode: str, accumulate: int, ramp: bool = False, steps: int = 3) -> tuple[DeepSeekV3LitModule, StepSpy]:
    torch.manual_seed(0)
    master = mode == "master"
    optimizer = MasterWeightAdamW if master else torch.optim.AdamW
    module = DeepSeekV3LitModule(overrides=MODEL, optimizer=lambda params: optimizer(params, **ADAMW))
    spy = StepSpy()
    callbacks = [spy, BatchSizeWarmup(start=1, end=2, ramp_tokens=2 * 16)] if ramp else [spy]
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=1 if ramp else accumulate,
        gradient_clip_val=MAX_NORM,
        plugins=[MasterWeightPrecision()] if master else None,
        precision=None if master else "bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    data = torch.randint(0, MODEL["vocab_size"], (64, 17), generator=torch.Generator().manual_seed(1))
    trainer.fit(module, DataLoader(data, batch_size=2))
    return module, spy


def _reference_norm(module: DeepSeekV3LitModule, step: dict) -> float:
    """fp32 model at the step's fp32 weights, no autocast: the norm of the mean micro-batch gradient."""
    model = copy.deepcopy(module.model).float()
    model.load_state_dict(step["weights"], strict=False)
    model.zero_grad()
    for batch in step["batches"]:
        out = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        (out.loss / len(step["batches"])).backward()
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()


@pytest.mark.parametrize(
    ("mode", "accumulate", "ramp"),
    [("autocast", 1, False), ("autocast", 2, False), ("master", 1, False), ("master", 3, False), ("master", 0, True)],
    ids=["autocast-1", "autocast-2", "master-1", "master-3", "master-ramp"],
)
def test_grad_norm_and_clipping_match_an_fp32_reference(one_thread, mode, accumulate, ramp):
    module, spy = _fit(mode, accumulate, ramp, steps=4 if ramp else 3)
    windows = [len(s["batches"]) for s in spy.steps]
    assert windows == ([1, 1, 2, 2] if ramp else [accumulate] * 3)  # the ramp: 2 once 32 tokens are seen
    for step, window in zip(spy.steps, windows, strict=True):
        reference = _reference_norm(module, step)
        # bf16 compute (and bf16 weights under the plugin) against fp32 everything: measured within 0.2%.
        assert step["grad_norm"] == pytest.approx(reference, rel=5e-3), step
        assert reference > MAX_NORM and step["applied"] == pytest.approx(MAX_NORM, rel=5e-3)
        if mode == "master":  # one micro-batch: autograd's bf16 gradients as they are; more: fp32 sums
            assert step["dtypes"] == ({torch.float32} if window > 1 else {torch.bfloat16, torch.float32})


class RecordInit(DeepSeekV3LitModule):
    """The module, keeping a copy of the fp32 weights configure_model produced (before any precision cast)."""

    def configure_model(self) -> None:
        super().configure_model()
        self.init = {n: p.detach().clone() for n, p in self.model.named_parameters()}


def test_plugin_casts_for_compute_and_the_masters_keep_the_fp32_init(one_thread):
    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            opt, model, init = trainer.optimizers[0], pl_module.model, pl_module.init
            assert all(p.dtype == torch.float32 for p in init.values())
            gates = fp32_parameters(model)
            for name, p in model.named_parameters():
                if p in gates:
                    assert p.dtype == torch.float32 and torch.equal(p, init[name]), name
                else:
                    assert p.dtype == torch.bfloat16 and torch.equal(opt.state[p]["master"], init[name]), name
            for moe in model.moe_layers():
                assert moe.gate.e_score_correction_bias.dtype == moe.tokens_per_expert.dtype == torch.float32
            self.checked = True

    module = RecordInit(overrides=MODEL, optimizer=lambda params: MasterWeightAdamW(params, **ADAMW))
    check = AtStart()
    trainer = Trainer(accelerator="cpu", max_steps=1, plugins=[MasterWeightPrecision()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[check])  # fmt: skip
    data = torch.randint(0, MODEL["vocab_size"], (4, 17))
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert check.checked and trainer.precision == "bf16-true"
    # validate casts too, but keeps no fp32 copies (no optimizer will take them)
    module = DeepSeekV3LitModule(overrides=MODEL)
    trainer = Trainer(accelerator="cpu", plugins=[MasterWeightPrecision()], logger=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    trainer.validate(module, DataLoader(data, batch_size=2))
    assert not any(hasattr(p, "_fp32_master") for p in module.parameters())
    assert module.model.embed.weight.dtype == torch.bfloat16


def test_plugin_refuses_an_optimizer_without_masters(one_thread):
    module = DeepSeekV3LitModule(overrides=MODEL, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    trainer = Trainer(accelerator="cpu", max_steps=1, plugins=[MasterWeightPrecision()], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="needs model.optimizer models.parallel.MasterWeightAdamW"):
        trainer.fit(module, DataLoader(torch.randint(0, 256, (4, 17)), batch_size=2))
