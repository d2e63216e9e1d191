"""MoECounts: the layers it finds, one reduction per optimizer step shared by every caller, and the process group
it sums over (two gloo ranks: the default group sums them, a one-rank group keeps each rank's own counts)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from callbacks import MoECounts
from callbacks.moe_counts import moe_counts_of
from models import DeepSeekV3
from tests.callbacks.conftest import run_gloo_ranks


class _Wrapper(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model


def _train_forward(model: DeepSeekV3, tokens: torch.Tensor) -> None:
    model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss.backward()


def test_finds_every_moe_layer_with_its_block_id(tiny_config):
    counts = MoECounts(_Wrapper(DeepSeekV3(tiny_config)))
    main_moe = list(range(tiny_config.first_k_dense_replace, tiny_config.num_hidden_layers))
    assert counts.layer_ids == [*main_moe, tiny_config.num_hidden_layers]  # then the MTP block
    assert [g.n_experts for g in counts.gates] == [tiny_config.n_routed_experts] * len(main_moe + [0])


def test_one_reduction_per_step_and_fresh_counts_after_it(tiny_config, monkeypatch):
    model = DeepSeekV3(tiny_config)
    counts = MoECounts(model)
    taken = []
    take_local = counts.take_local
    monkeypatch.setattr(counts, "take_local", lambda: taken.append(1) or take_local())
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 17))
    _train_forward(model, tokens)
    first = counts.step_counts(1)
    assert counts.step_counts(1) is first and len(taken) == 1  # a second caller of step 1 gets the same tensor
    k = tiny_config.num_experts_per_tok
    assert first.shape == (3, tiny_config.n_routed_experts)
    assert first.sum(dim=1).tolist() == [2 * 16 * k] * 2 + [2 * 15 * k]  # MTP predicts one token fewer
    assert all(not m.tokens_per_expert.any() for m in counts.layers)  # the next step starts from zero
    _train_forward(model, tokens)
    _train_forward(model, tokens)  # two micro-batches in step 2
    torch.testing.assert_close(counts.step_counts(2), 2 * first)
    assert len(taken) == 2


def test_reset_forgets_stale_counts(tiny_config):
    model = DeepSeekV3(tiny_config)
    counts = MoECounts(model)
    _train_forward(model, torch.randint(0, tiny_config.vocab_size, (2, 17)))
    stale = counts.step_counts(0).clone()
    _train_forward(model, torch.randint(0, tiny_config.vocab_size, (2, 17)))
    counts.reset()  # a new fit starting again at step 0
    assert counts.step_counts(0).sum() == 0 and stale.sum() > 0


def test_counting_excludes_eval_and_recompute(tiny_config):
    moe = DeepSeekV3(tiny_config).moe_layers()[0]
    seen = []
    moe.gate.register_forward_hook(lambda m, a, out: seen.append(MoECounts.counting(m)))
    x = torch.randn(1, 4, tiny_config.hidden_size, requires_grad=True)
    y, _ = torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=False)
    y.sum().backward()  # the forward, then its recompute inside backward
    moe.eval()(x)
    assert seen == [True, False, False]


def test_modules_without_counts_get_a_clear_error(tiny_config):
    class Plain(nn.Module):
        pass

    with pytest.raises(ValueError, match=r"pl_module.moe_counts.*configure_model"):
        moe_counts_of(Plain(), "MoELoadMonitor")
    dense = Plain()
    dense.moe_counts = MoECounts(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no models.moe.MoE layer"):
        moe_counts_of(dense, "ExpertBiasBalancing")


def _rank_counts(rank: int, config, tokens: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    own_group = [dist.new_group([r]) for r in range(2)][rank]  # every rank creates every group
    results = {}
    for name, group in (("world", None), ("own", own_group)):
        _train_forward(model, tokens[rank])
        results[name] = MoECounts(model, group=group).step_counts(1)
    return results


@pytest.mark.distributed
def test_sums_over_the_given_group_only(tmp_path, tiny_config):
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 2, 17))
    local = []  # each rank's counts, from one process
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config)
    for rank in range(2):
        _train_forward(model, tokens[rank])
        local.append(MoECounts(model).step_counts(1))
    for rank, result in enumerate(run_gloo_ranks(tmp_path, _rank_counts, tiny_config, tokens)):
        torch.testing.assert_close(result["world"], local[0] + local[1])
        torch.testing.assert_close(result["own"], local[rank])
