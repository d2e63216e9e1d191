"""Router entropy: the hooks' value against torch's Categorical entropy, eval passes left out, nothing logged
(and no hook attached) when the blocks are compiled."""

from __future__ import annotations

import pytest
import torch

from callbacks import MoECounts, RouterEntropyMonitor
from callbacks.router_entropy import GateEntropyHooks
from models import DeepSeekV3


def test_router_entropy_matches_categorical(tiny_config):
    model = DeepSeekV3(tiny_config)
    counts = MoECounts(model)
    captured = []
    handle = counts.gates[0].register_forward_hook(lambda m, a, out: captured.append(out[2].detach()))
    hooks = GateEntropyHooks(counts, torch.device("cpu"))
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
    assert all(not gate._forward_hooks for gate in counts.gates)
    # Hooks that saw no token: None, not 0.
    hooks.attach()
    assert hooks.read() is None


def test_rejects_bad_interval():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        RouterEntropyMonitor(log_every_n_steps=0)


def test_compiled_blocks_get_no_hooks_and_no_metric(
    tmp_path, tiny_config, lit_factory, loader_factory, trainer_factory
):
    module = lit_factory(tiny_config)
    for block in module.model.layers:
        block.compile()  # marks the blocks compiled; eager CPU training still runs through torch.compile
    monitor = RouterEntropyMonitor(log_every_n_steps=1)
    trainer = trainer_factory(tmp_path, [monitor], max_steps=1)
    monitor.on_train_start(trainer, module)
    assert monitor._hooks is None
    monitor.on_train_batch_start(trainer, module, None, 0)
    assert not module.moe_counts.gates[0]._forward_hooks
