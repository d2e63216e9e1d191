"""BatchSizeWarmup: accumulation windows grow from start to end, never cut short."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_modules import BatchSizeWarmup, DeepSeekV3LitModule


class Windows(Callback):
    """Micro-batches per optimizer step, and the accumulation Lightning used for each."""

    def __init__(self) -> None:
        self.windows: list[tuple[int, int]] = []
        self.count = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.count += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.windows.append((self.count, trainer.accumulate_grad_batches))
        self.count = 0


def test_accumulation_ramps_and_windows_stay_whole(tiny_config):
    warmup, windows = BatchSizeWarmup(start=1, end=3, ramp_tokens=64), Windows()  # micro-batches of 2 x 8 tokens
    module = DeepSeekV3LitModule(preset="tiny", overrides={**tiny_config.to_dict(), "num_nextn_predict_layers": 0})
    data = torch.randint(0, tiny_config.vocab_size, (200, 9))
    trainer = Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[warmup, windows])  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=2))
    sizes = [n for n, _ in windows.windows]
    assert all(n == acc for n, acc in windows.windows)  # every window as long as the accumulation it was scaled by
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 3
    # targets 1 + 2 x tokens // 64 after 0, 16, 32, 64, 96 tokens: 1, 1, 2, 3 (waits: 4 % 3 != 0), then 3 at
    # 6 micro-batches done
    assert sizes == [1, 1, 2, 2, 3, 3, 3, 3]
    assert module.tokens_seen == sum(sizes) * 2 * 8


def test_bad_ramp_is_refused():
    with pytest.raises(ValueError, match="start <= end"):
        BatchSizeWarmup(start=4, end=2)
