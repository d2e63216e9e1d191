"""The four callbacks on the project's DeepSeekV3LitModule (model built in configure_model), to TensorBoard."""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import ExpertBiasBalancing, MoELoadMonitor, RouterEntropyMonitor, ThroughputMonitor
from lightning_modules import DeepSeekV3LitModule


def test_callbacks_log_on_the_lit_module(tmp_path, tiny_config, loader_factory, trainer_factory):
    overrides = {k: v for k, v in tiny_config.to_dict().items() if k != "vocab_size"}
    module = DeepSeekV3LitModule(preset="tiny", overrides=overrides, vocab_size=tiny_config.vocab_size)
    balancing = ExpertBiasBalancing(gamma=0.01)
    callbacks = [
        balancing,
        MoELoadMonitor(log_every_n_steps=2),
        RouterEntropyMonitor(log_every_n_steps=2),
        ThroughputMonitor(log_every_n_steps=2, peak_flops=1e12),
    ]
    logger = TensorBoardLogger(tmp_path, name="lit", version=0)
    trainer = trainer_factory(tmp_path, callbacks, max_steps=4, logger=logger, log_every_n_steps=1)
    trainer.fit(module, loader_factory(tiny_config, n_batches=4))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"moe/max_vio", "moe/layer3/max_vio", "moe/router_entropy", "train/balance_loss"} <= scalars
    assert {"perf/tokens_per_s", "perf/mfu", "perf/step_time_s"} <= scalars
    assert [e.step for e in events.Scalars("moe/max_vio")] == [2, 4]
    assert balancing.num_updates == 4
    assert module.model.layers[1].ffn.gate.e_score_correction_bias.abs().sum() > 0
