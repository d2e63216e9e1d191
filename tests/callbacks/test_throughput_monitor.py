"""ThroughputMonitor: tokens/s, step time and MFU from a controlled clock, first step and validation excluded."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks import ThroughputMonitor
from callbacks import throughput_monitor as tm


class _RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if any(k.startswith("perf/") for k in metrics):
            self.metrics.append((step, dict(metrics)))


class _Clock:
    """perf_counter stand-in: each reading is 10 s after the previous one."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


def test_batch_tokens():
    assert tm.batch_tokens(torch.zeros(4, 17, dtype=torch.long)) == (64, 16)
    assert tm.batch_tokens({"input_ids": torch.zeros(2, 8, dtype=torch.long)}) == (16, 8)
    with pytest.raises(ValueError, match="input_ids"):
        tm.batch_tokens([torch.zeros(2, 8)])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="peak_flops"):
        ThroughputMonitor(peak_flops=0)


def test_tokens_per_s_and_mfu(monkeypatch, tmp_path, tiny_config, lit_factory, loader_factory, trainer_factory):
    monkeypatch.setattr(tm.time, "perf_counter", _Clock())
    logger = _RecordingLogger()
    monitor = ThroughputMonitor(log_every_n_steps=2, peak_flops=1e6)
    trainer = trainer_factory(tmp_path, [monitor], max_steps=5, logger=logger, accumulate_grad_batches=2)
    trainer.fit(lit_factory(tiny_config), loader_factory(tiny_config, n_batches=10, batch_size=4, seq_len=16))
    # Clock read at the end of step 1 (t=10, start), then at steps 2 (t=20) and 4 (t=30): step 5 is not logged.
    # Each optimizer step trains 2 micro-batches x 4 x 16 = 128 tokens.
    assert [step for step, _ in logger.metrics] == [2, 4]
    first, second = (m for _, m in logger.metrics)
    assert first["perf/tokens_per_s"] == pytest.approx(128 / 10)
    assert first["perf/step_time_s"] == pytest.approx(10)
    assert second["perf/tokens_per_s"] == pytest.approx(256 / 10)
    assert second["perf/step_time_s"] == pytest.approx(5)
    assert second["perf/mfu"] == pytest.approx(tiny_config.flops_per_token(16) * 25.6 / 1e6)
    assert trainer.progress_bar_metrics["perf/tokens_per_s"] == pytest.approx(25.6)


def test_validation_time_is_excluded(monkeypatch, tmp_path, tiny_config, lit_factory, loader_factory, trainer_factory):
    clock = _Clock()
    monkeypatch.setattr(tm.time, "perf_counter", clock)
    logger = _RecordingLogger()
    module = lit_factory(tiny_config)
    module.validation_step = lambda batch, batch_idx: clock.__setattr__("now", clock.now + 1000.0)
    monitor = ThroughputMonitor(log_every_n_steps=3)
    trainer = trainer_factory(
        tmp_path,
        [monitor],
        max_steps=3,
        logger=logger,
        val_check_interval=2,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    loader = loader_factory(tiny_config, n_batches=3, batch_size=2, seq_len=8)
    trainer.fit(module, loader, loader_factory(tiny_config, n_batches=1, batch_size=2, seq_len=8))
    # Reads: start 10, pause 20 (+10), 1000 s of validation, resume 1040, log 1050 (+10): 2 steps x 16 tokens in 20 s.
    ((step, metrics),) = logger.metrics
    assert step == 3
    assert metrics["perf/tokens_per_s"] == pytest.approx(32 / 20)
    assert "perf/mfu" not in metrics  # CPU without a peak given


def test_tokens_count_data_parallel_ranks_not_the_world():
    from types import SimpleNamespace

    pipeline = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1}, world_size=8)
    assert tm.data_parallel_size(pipeline) == 2  # e.g. 2 replicas x 4 pipeline stages read 2 batches
    assert tm.data_parallel_size(SimpleNamespace(distributed_sampler_kwargs=None, world_size=1)) == 1
