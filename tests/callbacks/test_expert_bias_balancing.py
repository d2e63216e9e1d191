"""Aux-loss-free balancing: the bias update, what the bias may and may not change, counts under gradient
accumulation, activation checkpointing and two gloo ranks, checkpoint round trip, and MaxVio falling on a
skewed router."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ExpertBiasBalancing, MoECounts
from callbacks.expert_bias_balancing import bias_update
from callbacks.moe_load_monitor import max_vio
from models import DeepSeekV3, DeepSeekV3Config
from models.moe import Gate
from tests.callbacks.conftest import TinyLitModule, run_gloo_ranks


def test_bias_update_follows_sign_rule():
    counts_LE = torch.tensor([[10.0, 30.0, 20.0, 20.0], [0.0, 0.0, 0.0, 8.0]])
    torch.testing.assert_close(
        bias_update(counts_LE, 0.5), torch.tensor([[0.5, -0.5, 0.0, 0.0], [0.5, 0.5, 0.5, -0.5]])
    )
    centred = bias_update(counts_LE, 0.5, center=True)
    torch.testing.assert_close(centred.sum(dim=1), torch.zeros(2))
    torch.testing.assert_close(centred[1], torch.tensor([0.25, 0.25, 0.25, -0.75]))


@pytest.mark.parametrize("bad", [{"gamma": -1.0}, {"freeze_after_tokens": -5}])
def test_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ExpertBiasBalancing(**bad)


def _gate_reference(x_TD, weight_ED, topk_idx_TK, config):
    """Combine weights from the unbiased affinities s of the chosen experts (eqs. (13)-(15) of the report)."""
    scores_TE = torch.sigmoid(x_TD @ weight_ED.T)
    w_TK = scores_TE.gather(1, topk_idx_TK)
    return w_TK / w_TK.sum(dim=-1, keepdim=True) * config.routed_scaling_factor


def _route(gate, x_TD, bias_E, probe_TK):
    gate.weight.grad = None
    gate.e_score_correction_bias.copy_(bias_E)
    weights_TK, topk_idx_TK, _ = gate(x_TD)
    (weights_TK * probe_TK).sum().backward()
    return weights_TK.detach(), topk_idx_TK, gate.weight.grad.clone()


def test_bias_changes_selection_only(tiny_config):
    gate = Gate(tiny_config)
    gate.reset_parameters(std=0.5)
    x_TD = torch.randn(64, tiny_config.hidden_size)
    probe_TK = torch.randn(64, tiny_config.num_experts_per_tok)
    w0, idx0, grad0 = _route(gate, x_TD, torch.zeros(tiny_config.n_routed_experts), probe_TK)
    # A bias equal for all experts changes no choice (group scores all shift by the same amount) ...
    w1, idx1, grad1 = _route(gate, x_TD, torch.full((tiny_config.n_routed_experts,), 0.3), probe_TK)
    assert torch.equal(idx0, idx1)
    torch.testing.assert_close(w1, w0)
    torch.testing.assert_close(grad1, grad0)
    # ... a large bias on experts 5 and 6 forces them into every token's choice ...
    big = torch.zeros(tiny_config.n_routed_experts)
    big[5:7] = 10.0
    w2, idx2, grad2 = _route(gate, x_TD, big, probe_TK)
    assert not torch.equal(idx2.sort(dim=1).values, idx0.sort(dim=1).values)
    assert ((idx2 == 5).any(dim=1) & (idx2 == 6).any(dim=1)).all()
    # ... but the weights and the gate's gradient are those of the unbiased affinities of the chosen experts.
    weight = gate.weight.detach().clone().requires_grad_(True)
    w_ref = _gate_reference(x_TD, weight, idx2, tiny_config)
    (w_ref * probe_TK).sum().backward()
    torch.testing.assert_close(w2, w_ref.detach())
    torch.testing.assert_close(grad2, weight.grad)


class _RecordUpdates(ExpertBiasBalancing):
    """Records the global counts and the bias before/after each update."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.records = []

    def update(self, moe_layers, counts_LE, gamma=None):
        before = torch.stack([m.gate.e_score_correction_bias.clone() for m in moe_layers])
        super().update(moe_layers, counts_LE, gamma)
        after = torch.stack([m.gate.e_score_correction_bias.clone() for m in moe_layers])
        self.records.append((counts_LE.clone(), before, after))


def test_one_update_per_optimizer_step_under_accumulation(
    tmp_path, tiny_config, lit_factory, loader_factory, trainer_factory
):
    callback = _RecordUpdates(gamma=0.01)
    trainer = trainer_factory(tmp_path, [callback], max_steps=2, accumulate_grad_batches=2)
    trainer.fit(lit_factory(tiny_config), loader_factory(tiny_config, n_batches=4, batch_size=2, seq_len=16))
    assert len(callback.records) == callback.num_updates == 2
    k = tiny_config.num_experts_per_tok
    for counts_LE, before, after in callback.records:
        # Two micro-batches of 2 x 16 tokens each in the main MoE layers, 2 x 15 in the MTP one.
        assert counts_LE.sum(dim=1).tolist() == [2 * 2 * 16 * k] * 2 + [2 * 2 * 15 * k]
        torch.testing.assert_close(after - before, bias_update(counts_LE, 0.01))
    torch.testing.assert_close(callback.records[1][1], callback.records[0][2])  # nothing else moved the bias


def test_freeze_follows_the_lit_modules_tokens_seen(tmp_path, tiny_config, loader_factory, trainer_factory):
    from lightning_modules import DeepSeekV3LitModule

    callback = _RecordUpdates(gamma=0.01, freeze_after_tokens=2 * 4 * 16)  # two steps of 4 x 16 tokens
    module = DeepSeekV3LitModule(overrides=tiny_config.to_dict())
    trainer = trainer_factory(tmp_path, [callback], max_steps=4)
    trainer.fit(module, loader_factory(tiny_config, n_batches=4))
    moved = [not torch.equal(before, after) for _, before, after in callback.records]
    assert moved == [True, True, False, False]  # while tokens_seen (after the step) <= 128
    assert module.tokens_seen == 4 * 4 * 16 and callback.num_updates == 4
    with pytest.raises(ValueError, match="tokens_seen"):  # a module that does not count tokens cannot freeze
        trainer_factory(tmp_path, [callback], max_steps=1).fit(
            TinyLitModule(tiny_config), loader_factory(tiny_config, n_batches=1)
        )


def test_checkpoint_keeps_biases_and_state(tmp_path, tiny_config, lit_factory, loader_factory, trainer_factory):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callback = ExpertBiasBalancing(gamma=0.01)
    module = lit_factory(tiny_config)
    trainer = trainer_factory(tmp_path, [callback, ckpt], max_steps=3, enable_checkpointing=True)
    trainer.fit(module, loader_factory(tiny_config, n_batches=3))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    name = "model.layers.1.ffn.gate.e_score_correction_bias"
    torch.testing.assert_close(saved["state_dict"][name], module.model.layers[1].ffn.gate.e_score_correction_bias)
    assert saved["state_dict"][name].abs().sum() > 0

    class _BiasAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.bias = pl_module.model.layers[1].ffn.gate.e_score_correction_bias.clone()

    resumed, probe = ExpertBiasBalancing(gamma=0.01), _BiasAtStart()
    trainer = trainer_factory(tmp_path, [resumed, probe], max_steps=5)
    trainer.fit(lit_factory(tiny_config), loader_factory(tiny_config, n_batches=5), ckpt_path=tmp_path / "last.ckpt")
    torch.testing.assert_close(probe.bias, saved["state_dict"][name])
    assert resumed.state_dict() == {"num_updates": 5}


def _rank_biases(rank: int, config: DeepSeekV3Config, batches: torch.Tensor) -> dict:
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(args[0].shape)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        torch.manual_seed(0)
        model = DeepSeekV3(config)
        callback = ExpertBiasBalancing(gamma=0.01)
        for _ in range(2):  # two optimizer steps (no optimizer: only the routing matters here)
            model(batches[rank][:, :-1], labels=batches[rank][:, 1:]).loss.backward()
            callback.update(model.moe_layers(), MoECounts(model).step_counts(0))
        biases = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
        return {"biases": biases, "calls": calls, "state": callback.state_dict()}
    finally:
        dist.all_reduce = all_reduce


@pytest.mark.distributed
def test_two_ranks_match_one_process_with_both_batches(tmp_path, tiny_config):
    batches = torch.randint(0, tiny_config.vocab_size, (2, 2, 17))
    ranks = run_gloo_ranks(tmp_path, _rank_biases, tiny_config, batches)
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config)
    callback = ExpertBiasBalancing(gamma=0.01)
    for _ in range(2):
        for batch in batches:
            model(batch[:, :-1], labels=batch[:, 1:]).loss.backward()
        callback.update(model.moe_layers(), MoECounts(model).step_counts(0))
    expected = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
    assert expected.abs().sum() > 0
    for result in ranks:
        torch.testing.assert_close(result["biases"], expected, rtol=0, atol=0)
        assert result["calls"] == [(3, tiny_config.n_routed_experts)] * 2  # one all-reduce per step for all layers
        assert result["state"] == callback.state_dict()


def _skewed_run(config: DeepSeekV3Config, balance: bool, steps: int) -> list[float]:
    """Train with AdamW on random tokens from a router where experts 0-2 start with most tokens; MaxVio per step."""
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    with torch.no_grad():  # a shared direction u in every hidden state, and gate rows 0-2 aligned with it
        u = torch.randn(config.hidden_size)
        u /= u.norm()
        model.embed.weight += 0.1 * u
        for moe in model.moe_layers():
            moe.gate.weight[:3] += 0.2 * u
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    callback = ExpertBiasBalancing(gamma=1e-3)
    generator = torch.Generator().manual_seed(1)
    vios = []
    for _ in range(steps):
        tokens = torch.randint(0, config.vocab_size, (8, 65), generator=generator)
        model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        counts_LE = MoECounts(model).step_counts(0)
        vios.append(max_vio(counts_LE).mean().item())
        if balance:
            callback.update(model.moe_layers(), counts_LE)
    return vios


def test_max_vio_falls_with_balancing_and_stays_high_without():
    config = DeepSeekV3Config.from_preset(
        "tiny",
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        num_nextn_predict_layers=0,
        seq_aux_alpha=0.0,
        init_std=0.02,
    )
    balanced, free = _skewed_run(config, True, 200), _skewed_run(config, False, 200)
    assert balanced[0] > 2.5 and free[0] > 2.5  # experts 0-2 take (almost) every token: MaxVio 3 = E/K - 1
    assert sum(balanced[-50:]) / 50 < 0.3
    assert sum(free[-50:]) / 50 > 2.0


class _SaveRankState(pl.Callback):
    def __init__(self, out, balancing: ExpertBiasBalancing) -> None:
        self.out, self.balancing = out, balancing

    def on_train_end(self, trainer, pl_module):
        biases = torch.stack([m.gate.e_score_correction_bias for m in pl_module.model.moe_layers()])
        state = {"biases": biases, "callback": self.balancing.state_dict()}
        torch.save(state, f"{self.out}/rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_ddp_trainer_ranks_agree(tmp_path, tiny_config, lit_factory, loader_factory, trainer_factory):
    balancing = ExpertBiasBalancing(gamma=0.01)
    callbacks = [balancing, _SaveRankState(tmp_path, balancing)]
    trainer = trainer_factory(tmp_path, callbacks, max_steps=3, strategy="ddp_fork", devices=2)
    trainer.fit(lit_factory(tiny_config), loader_factory(tiny_config, n_batches=6))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["biases"].abs().sum() > 0
    torch.testing.assert_close(ranks[0]["biases"], ranks[1]["biases"], rtol=0, atol=0)
    assert ranks[0]["callback"] == ranks[1]["callback"] == {"num_updates": 3}
