"""MoE load metrics: MaxVio arithmetic, one shared gather whatever the callback order, TensorBoard output,
router entropy hooks that exist only on logging steps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import ExpertBiasBalancing, MoELoadMonitor, moe_stats
from callbacks.moe_load_monitor import RouterEntropy, group_share, load_heatmap, max_vio
from models import DeepSeekV3


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


def test_router_entropy_matches_categorical(tiny_config):
    model = DeepSeekV3(tiny_config)
    gates = [moe.gate for moe in model.moe_layers()]
    captured = []
    handle = gates[0].register_forward_hook(lambda m, a, out: captured.append(out[2].detach()))
    hooks = RouterEntropy(gates, torch.device("cpu"))
    hooks.attach()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 9))
    model(tokens[:, :-1], labels=tokens[:, 1:])
    model.eval()
    model(tokens[:, :-1])  # eval passes are not counted
    entropy_L = hooks.read()
    handle.remove()
    scores_TE = captured[0]
    expected = torch.distributions.Categorical(probs=scores_TE / scores_TE.sum(-1, keepdim=True)).entropy().mean()
    torch.testing.assert_close(entropy_L[0], expected)
    assert all(not gate._forward_hooks for gate in gates)
    # Hooks that saw no token (e.g. compiled blocks, which skip hooks attached after compilation): None, not 0.
    hooks.attach()
    assert hooks.read() is None


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

    def update(self, moe_layers, counts_LE):
        self.counts.append(counts_LE.clone())
        super().update(moe_layers, counts_LE)


def _fit(tmp_path, config, lit_factory, loader_factory, trainer_factory, order: str):
    balancing, monitor, spy = (
        _CountingBalancing(gamma=0.01),
        MoELoadMonitor(log_every_n_steps=2, image_every_n_steps=4),
        _Spy(),
    )
    callbacks = [balancing, monitor, spy] if order == "balancing_first" else [monitor, balancing, spy]
    logger = TensorBoardLogger(tmp_path, name=order, version=0)
    gathers = []
    original = moe_stats.reduce_and_reset_counts

    def counting(*args, **kwargs):
        gathers.append(1)
        return original(*args, **kwargs)

    moe_stats.reduce_and_reset_counts = counting
    try:
        torch.manual_seed(0)
        module = lit_factory(config)
        trainer = trainer_factory(tmp_path, callbacks, max_steps=4, logger=logger, accumulate_grad_batches=2)
        trainer.fit(module, loader_factory(config, n_batches=8, batch_size=2))
    finally:
        moe_stats.reduce_and_reset_counts = original
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    return balancing, spy, events, len(gathers), module


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
