"""The complementary sequence-wise balance loss against a loop-by-loop reading of eqs. (17)-(20) of the report."""

from __future__ import annotations

import torch

from models.moe import MoE, sequence_balance_loss


def reference_loss(scores_BSE: torch.Tensor, top_k: int, alpha: float) -> float:
    """L_Bal = alpha * sum_i f_i P_i per sequence (eq. 17), averaged over the batch's sequences.

    f_i = N_r / (K_r T) * sum_t 1(s_{i,t} in Topk({s_{j,t}}, K_r))  (eq. 18)
    s'_{i,t} = s_{i,t} / sum_j s_{j,t}                              (eq. 19)
    P_i = 1/T * sum_t s'_{i,t}                                      (eq. 20)
    """
    batch, seqlen, n_experts = scores_BSE.shape
    losses = []
    for b in range(batch):
        f = [0.0] * n_experts
        p = [0.0] * n_experts
        for t in range(seqlen):
            s = scores_BSE[b, t].tolist()
            chosen = sorted(range(n_experts), key=lambda i, s=s: -s[i])[:top_k]
            for i in range(n_experts):
                if i in chosen:
                    f[i] += n_experts / (top_k * seqlen)
                p[i] += s[i] / sum(s) / seqlen
        losses.append(alpha * sum(fi * pi for fi, pi in zip(f, p, strict=True)))
    return sum(losses) / batch


def test_function_matches_equations():
    scores_BSE = torch.rand(3, 7, 8, dtype=torch.float64)
    topk_idx_TK = scores_BSE.view(-1, 8).topk(2, dim=-1).indices
    loss = sequence_balance_loss(scores_BSE.view(-1, 8), topk_idx_TK, batch=3, alpha=1e-4)
    assert abs(loss.item() - reference_loss(scores_BSE, 2, 1e-4)) < 1e-12


def test_moe_layer_matches_equations(tiny_config):
    # One group and a zero bias: the routed experts are exactly Topk(s), as eq. (18) reads.
    config = tiny_config.from_dict({**tiny_config.to_dict(), "n_group": 1, "topk_group": 1, "seq_aux_alpha": 1e-4})
    moe = MoE(config)
    moe.reset_parameters(std=0.3)
    x = torch.randn(2, 11, config.hidden_size)
    captured = []
    moe.gate.register_forward_hook(lambda m, a, out: captured.append(out[2].detach()))
    _, aux = moe(x)
    expected = reference_loss(captured[0].view(2, 11, -1), config.num_experts_per_tok, 1e-4)
    assert abs(aux.item() - expected) < 1e-9
    # f_i <= N_r / K_r and sum_i P_i = 1 bound the loss by alpha * N_r / K_r.
    assert 0 < aux.item() <= 1e-4 * config.n_routed_experts / config.num_experts_per_tok
    moe.eval()
    assert moe(x)[1] is None  # training only
