"""MoE load metrics: MaxVio arithmetic, one shared gather whatever the callback order, TensorBoard output
(with RouterEntropyMonitor in the same run: its hooks exist only on logging steps)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import ExpertBiasBalancing, MoECounts, MoELoadMonitor, RouterEntropyMonitor
from callbacks.moe_load_monitor import group_share, load_heatmap, max_vio


def test_max_vio_and_group_share():
    counts_LE = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0], [30.0, 10.0, 0.0, 0.0]])
    torch.testing.assert_close(max_vio(counts_LE), torch.tensor([0.0, 3.0, 2.0]))
    torch.testing.assert_close(group_share(counts_LE, 2), torch.tensor([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]))


def test_heatmap_colours():
    image = load_heatmap(torch.tensor([[1.0, 0.0, 2.0, 5.0]]), cell=2)
    assert image.shape == (3, 2, 8)
    torch.testing.assert_close(image[:, 0, ::2].T, torch.tensor([[1.0, 1, 1], [0, 0, 1], [1, 0, 0], [1, 0, 0]]))


def test_rejects_bad_intervals():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        MoELoadMonitor(log_every_n_steps=0)


class _Spy(pl.Callback):
    """Records, per batch, the gate hooks present and the counts each step's balancing saw."""

    def __init__(self) -> None:
        self.hooks_at_batch = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        gate = pl_module.model.layers[1].ffn.gate
        self.hooks_at_batch.append((trainer.global_step, len(gate._forward_hooks)))


class _CountingBalancing(ExpertBiasBalancing):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.counts = []

    def update(self, moe_layers, counts_LE, gamma=None):
        self.counts.append(counts_LE.clone())
        super().update(moe_layers, counts_LE, gamma)


def _fit(tmp_path, config, lit_factory, loader_factory, trainer_factory, order: str):
    balancing, monitor, entropy, spy = (
        _CountingBalancing(gamma=0.01),
        MoELoadMonitor(log_every_n_steps=2, image_every_n_steps=4),
        RouterEntropyMonitor(log_every_n_steps=2),
        _Spy(),
    )
    callbacks = [balancing, monitor] if order == "balancing_first" else [monitor, balancing]
    logger = TensorBoardLogger(tmp_path, name=order, version=0)
    gathers = []
    reduce = MoECounts.all_reduce

    def counting(self, tensor):
        gathers.append(tensor.shape)
        return reduce(self, tensor)

    MoECounts.all_reduce = counting
    try:
        torch.manual_seed(0)
        module = lit_factory(config)
        trainer = trainer_factory(
            tmp_path, [*callbacks, entropy, spy], max_steps=4, logger=logger, accumulate_grad_batches=2
        )
        trainer.fit(module, loader_factory(config, n_batches=8, batch_size=2))
    finally:
        MoECounts.all_reduce = reduce
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    n_layers = len(module.moe_counts.layers)
    load_gathers = gathers.count((n_layers, config.n_routed_experts))
    assert gathers.count((2, n_layers)) == 2  # the entropy sums, once per logging step
    return balancing, spy, events, load_gathers, module


def test_monitor_and_balancing_share_one_gather_in_any_order(
    tmp_path, tiny_config, lit_factory, loader_factory, trainer_factory
):
    runs = {
        o: _fit(tmp_path, tiny_config, lit_factory, loader_factory, trainer_factory, o)
        for o in ("balancing_first", "monitor_first")
    }
    for balancing, spy, events, n_gathers, _ in runs.values():
        assert n_gathers == 4  # one per optimizer step, not per callback or micro-batch
        logged = [e.value for e in events.Scalars("moe/layer1/max_vio")]
        assert [e.step for e in events.Scalars("moe/layer1/max_vio")] == [2, 4]
        expected = [max_vio(balancing.counts[s - 1])[0].item() for s in (2, 4)]
        assert logged == pytest.approx(expected, rel=1e-6)
        for s, e in zip((2, 4), events.Scalars("moe/max_vio"), strict=True):
            assert e.value == pytest.approx(max_vio(balancing.counts[s - 1]).mean().item(), rel=1e-6)
        tags = events.Tags()
        assert {
            "moe/layer3/max_vio",
            "moe/max_vio_max",
            "moe/dead_experts",
            "moe/group0/share",
            "moe/group_max_vio",
        } <= set(tags["scalars"])
        assert {"moe/router_entropy", "moe/layer2/router_entropy"} <= set(tags["scalars"])
        assert tags["images"] == ["moe/expert_load"] and [e.step for e in events.Images("moe/expert_load")] == [4]
        assert "moe/layer1/expert_bias" in tags["histograms"]
        # Hooks only during the two micro-batches of each logging step (steps 2 and 4 start at global_step 1, 3).
        assert spy.hooks_at_batch == [(0, 0), (0, 0), (1, 1), (1, 1), (2, 0), (2, 0), (3, 1), (3, 1)]
    first, second = runs["balancing_first"], runs["monitor_first"]
    for c1, c2 in zip(first[0].counts, second[0].counts, strict=True):
        torch.testing.assert_close(c1, c2)
    assert first[0].counts[0].sum(dim=1).tolist() == [2 * 2 * 16 * 4] * 2 + [2 * 2 * 15 * 4]  # both micro-batches
    assert all(not m.tokens_per_expert.any() for m in first[4].model.moe_layers())  # reset after the last step
