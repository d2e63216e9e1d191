"""DeepSeekMoE gate and experts against a plain per-token reference of the report's equations (12)-(16)."""

import pytest
import torch
import torch.nn.functional as F

from models import DeepSeekV3Config
from models.moe import MoE


def reference_route(x_TD, weight_ED, bias_E, config):
    """Per token: sigmoid affinities, group score = sum of top-2 of (s + b), top-k of s + b in the kept groups."""
    n_per_group = config.n_routed_experts // config.n_group
    chosen, weights = [], []
    for x_D in x_TD:
        s = torch.sigmoid(weight_ED @ x_D)
        c = s + bias_E
        group_score = [c[g * n_per_group : (g + 1) * n_per_group].topk(2).values.sum() for g in range(config.n_group)]
        kept = torch.tensor(group_score).topk(config.topk_group).indices.tolist()
        candidates = [e for e in range(config.n_routed_experts) if e // n_per_group in kept]
        ranked = sorted(candidates, key=lambda e: -c[e].item())[: config.num_experts_per_tok]
        w = s[ranked]
        w = w / w.sum() * config.routed_scaling_factor
        chosen.append(ranked)
        weights.append(dict(zip(ranked, w.tolist(), strict=True)))
    return chosen, weights


@pytest.mark.parametrize("n_group", [1, 4])
def test_gate_matches_reference_with_selection_changing_bias(tiny_config, n_group):
    config = DeepSeekV3Config.from_dict({**tiny_config.to_dict(), "n_group": n_group, "topk_group": min(2, n_group)})
    moe = MoE(config)
    moe.reset_parameters(std=0.5)
    x_TD = torch.randn(64, config.hidden_size)
    idx_without_bias = moe.gate(x_TD)[1]
    moe.gate.e_score_correction_bias.normal_(0, 0.3)
    weights_TK, idx_TK, scores_TE = moe.gate(x_TD)
    assert not torch.equal(idx_TK.sort().values, idx_without_bias.sort().values), "bias should change the selection"
    chosen, ref_weights = reference_route(x_TD, moe.gate.weight, moe.gate.e_score_correction_bias, config)
    for t in range(len(x_TD)):
        assert sorted(idx_TK[t].tolist()) == sorted(chosen[t])
        for k, e in enumerate(idx_TK[t].tolist()):
            assert weights_TK[t, k].item() == pytest.approx(ref_weights[t][e], rel=1e-5)
    torch.testing.assert_close(scores_TE, torch.sigmoid(x_TD @ moe.gate.weight.T))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_gate_runs_in_fp32_under_bf16_autocast(tiny_config, weight_dtype):
    """Under autocast F.linear would run in bf16 even on .float() inputs; the router must not."""
    moe = MoE(tiny_config)
    moe.reset_parameters(std=0.5)
    moe.gate.weight.data = moe.gate.weight.data.to(weight_dtype)  # bf16 weights: the gate still computes in fp32
    x_TD = torch.randn(256, tiny_config.hidden_size).bfloat16()
    want = moe.gate(x_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe.gate(x_TD)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[0].dtype == got[2].dtype == torch.float32
    ref_scores = torch.sigmoid(x_TD.double() @ moe.gate.weight.double().T).float()
    torch.testing.assert_close(got[2], ref_scores, rtol=1e-5, atol=1e-6)


def test_bias_changes_selection_not_combine_weights_or_gradients(tiny_config):
    moe = MoE(tiny_config)
    moe.reset_parameters(std=0.5)
    x_TD = torch.randn(32, tiny_config.hidden_size)
    w0, idx0, _ = moe.gate(x_TD)
    (w0 * torch.arange(w0.shape[1])).sum().backward()
    grad0 = moe.gate.weight.grad.clone()
    moe.gate.weight.grad = None
    moe.gate.e_score_correction_bias.fill_(0.7)  # a uniform shift keeps every ranking, hence the selection
    w1, idx1, _ = moe.gate(x_TD)
    (w1 * torch.arange(w1.shape[1])).sum().backward()
    assert torch.equal(idx0, idx1)
    torch.testing.assert_close(w0, w1)
    torch.testing.assert_close(grad0, moe.gate.weight.grad)


def test_moe_output_matches_per_token_loop_and_drops_nothing(tiny_config):
    moe = MoE(tiny_config).train()
    moe.reset_parameters(std=0.2)
    torch.nn.init.normal_(moe.shared_experts.w1.weight, std=0.2)
    x = torch.randn(2, 9, tiny_config.hidden_size)
    y, aux = moe(x)
    x_TD = x.reshape(-1, tiny_config.hidden_size)
    weights_TK, idx_TK, _ = moe.gate(x_TD)
    ex = moe.experts
    expected = []
    for t, x_D in enumerate(x_TD):
        out = moe.shared_experts(x_D)
        for w, e in zip(weights_TK[t], idx_TK[t], strict=True):
            h = F.silu(ex.w1[e] @ x_D) * (ex.w3[e] @ x_D)
            out = out + w * (ex.w2[e] @ h)
        expected.append(out)
    torch.testing.assert_close(y.reshape(-1, tiny_config.hidden_size), torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert moe.tokens_per_expert.sum().item() == x_TD.shape[0] * tiny_config.num_experts_per_tok  # no token dropped
    assert aux is not None and aux.requires_grad


def test_counts_skip_eval(tiny_config):
    # Activation-checkpoint recomputes are not counted either: tests/models/test_perf_paths.py checks it.
    moe = MoE(tiny_config)
    moe.reset_parameters(std=0.2)
    x = torch.randn(2, 5, tiny_config.hidden_size)
    with torch.no_grad():
        moe.eval()(x)
    assert moe.tokens_per_expert.sum() == 0
    moe.train()(x)
    assert moe.tokens_per_expert.sum().item() == 10 * tiny_config.num_experts_per_tok


def _moe_input_grad(moe: MoE, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    y, _ = moe(x)
    (y * grad_out).sum().backward()
    return x.grad


def test_input_gradient_matches_the_per_token_loop(tiny_config):
    """The dispatch's own backward (gather the K copies' gradients, sum over k) is the autograd gradient."""
    moe = MoE(tiny_config).train()
    moe.reset_parameters(std=0.2)
    x = torch.randn(2, 9, tiny_config.hidden_size)
    grad_out = torch.randn_like(x)
    ex, expected = moe.experts, []
    for x_D, g_D in zip(x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, x.shape[-1]), strict=True):
        x_D = x_D.detach().requires_grad_()
        weights_K, idx_K = (t[0] for t in moe.gate(x_D[None])[:2])
        out = moe.shared_experts(x_D)
        for w, e in zip(weights_K, idx_K, strict=True):
            out = out + w * (ex.w2[e] @ (F.silu(ex.w1[e] @ x_D) * (ex.w3[e] @ x_D)))
        expected.append(torch.autograd.grad((out * g_D).sum(), x_D)[0])
    got = _moe_input_grad(moe, x, grad_out)
    torch.testing.assert_close(got.reshape(-1, x.shape[-1]), torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_backward_is_bitwise_reproducible_without_deterministic_mode(tiny_config):
    """Autograd's scatter-add backward of ``x[order // K]`` adds a token's K gradients in thread order: on 2 CPU
    threads two identical backwards differed in every trial. The dispatch's gather + sum does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        moe = MoE(tiny_config).train()
        moe.reset_parameters(std=0.2)
        x = torch.randn(16, 256, tiny_config.hidden_size)
        grad_out = torch.randn_like(x)
        first = _moe_input_grad(moe, x, grad_out)
        assert all(torch.equal(first, _moe_input_grad(moe, x, grad_out)) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
