"""The fast paths compute what the plain ones do: fused chunked CE, master-weight AdamW, activation checkpointing,
per-block compile (GPU)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from models import DeepSeekV3
from models.loss import linear_cross_entropy
from models.parallel.compile import apply_activation_checkpointing, compile_blocks
from models.parallel.mixed_precision import MasterWeightAdamW, cast_parameters


@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
def test_linear_cross_entropy_matches_torch(chunk_size):
    h = torch.randn(3, 41, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 32, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (3, 41))
    labels[0, :9] = -100
    loss = linear_cross_entropy(h, weight, labels, chunk_size=chunk_size)
    (2.5 * loss).backward()
    grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    ref = F.cross_entropy((h @ weight.t()).flatten(0, 1), labels.flatten(), ignore_index=-100)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref.float())
    torch.testing.assert_close(grads[0], h.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, weight, labels, chunk_size=0)


def test_model_fused_loss_path_matches_logits_path(tiny_config):
    model = DeepSeekV3(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 33))
    plain = model(tokens[:, :-1], labels=tokens[:, 1:])
    plain.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
    fused.loss.backward()
    assert fused.logits is None and fused.mtp_logits == []
    torch.testing.assert_close(fused.ce_loss, plain.ce_loss)
    torch.testing.assert_close(fused.mtp_loss, plain.mtp_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], msg=name)


def _grads_after_backward(model, tokens):
    model.zero_grad()
    model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_grads_and_counts(tiny_config, mode):
    model = DeepSeekV3(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 33))
    ref = _grads_after_backward(model, tokens)
    ref_counts = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    ac_model = apply_activation_checkpointing(copy.deepcopy(model), mode)
    for m in ac_model.moe_layers():
        m.tokens_per_expert.zero_()
    got = _grads_after_backward(ac_model, tokens)
    assert set(got) == set(ref)  # parameter names unchanged
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name)
    for m, counts in zip(ac_model.moe_layers(), ref_counts, strict=True):
        torch.testing.assert_close(m.tokens_per_expert, counts)  # the recompute does not count twice
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_activation_checkpointing(model, "some")


# ----------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_adamw_kernel_matches_reference(dtype):
    hp = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    init = [torch.randn(1000, 37, device="cuda"), torch.randn(4097, device="cuda")]
    fast = [p.to(dtype).requires_grad_() for p in init]
    slow = [p.to(dtype).requires_grad_() for p in init]
    opt_fast, opt_slow = MasterWeightAdamW(fast, **hp), MasterWeightAdamW(slow, **hp)
    for step in range(3):
        for _ in range(1 + step % 2):  # one micro-batch (bf16 grads), then two (fp32 sums for bf16 params)
            g = [torch.randn_like(a) for a in fast]
            for params in (fast, slow):
                sum((p * c).sum() for p, c in zip(params, g, strict=True)).backward()
        opt_fast.step()
        _reference_step(opt_slow)  # the plain-torch path, on the same device
        opt_fast.zero_grad()
        opt_slow.zero_grad()
    for a, b in zip(fast, slow, strict=True):
        master_a, master_b = opt_fast.state[a].get("master", a), opt_slow.state[b].get("master", b)
        torch.testing.assert_close(master_a, master_b, rtol=1e-6, atol=1e-6)
        tol = 0 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _reference_step(opt):
    from models.parallel import mixed_precision

    triton = mixed_precision.triton
    mixed_precision.triton = None
    try:
        opt.step()
    finally:
        mixed_precision.triton = triton


@pytest.mark.gpu
def test_compiled_blocks_match_eager_on_gpu(tiny_config):
    torch.manual_seed(0)
    model = cast_parameters(DeepSeekV3(tiny_config).cuda(), torch.bfloat16)
    compiled = compile_blocks(apply_activation_checkpointing(copy.deepcopy(model), "selective"))
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 65), device="cuda")
    ref, got = _grads_after_backward(model, tokens), _grads_after_backward(compiled, tokens)
    for name in ref:
        torch.testing.assert_close(got[name].float(), ref[name].float(), rtol=5e-2, atol=2e-3, msg=name)


@pytest.mark.gpu
def test_grouped_experts_unaligned_groups_match_loop_on_gpu():
    from models.moe import GroupedExperts

    experts = GroupedExperts(8, 256, 128).cuda()
    experts.reset_parameters(0.02)
    counts = torch.tensor([0, 3, 17, 1, 40, 0, 9, 30], device="cuda")  # rows not multiples of 8/16
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    got = experts(x, counts.cumsum(0, dtype=torch.int32)).float()
    ref, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n].float()
        w1, w2, w3 = (w[e].to(torch.bfloat16).float() for w in (experts.w1, experts.w2, experts.w3))
        ref.append((F.silu(xe @ w1.t()) * (xe @ w3.t())) @ w2.t())
        start += n
    torch.testing.assert_close(got, torch.cat(ref), rtol=2e-2, atol=2e-2)


def test_moe_permutation_combine_gradients_match_scatter_add(tiny_config):
    from models.moe import MoE

    moe = MoE(tiny_config).train()
    moe.reset_parameters(std=0.2)
    x = torch.randn(2, 9, tiny_config.hidden_size, requires_grad=True)
    y, _ = moe(x)
    y.square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    for t in [x, *moe.parameters()]:
        t.grad = None
    # Reference combine: the scatter-add formulation.
    x_TD = x.reshape(-1, tiny_config.hidden_size)
    weights_TK, idx_TK, _ = moe.gate(x_TD)
    order = idx_TK.flatten().argsort(stable=True)
    token = order // idx_TK.shape[1]
    counts = torch.bincount(idx_TK.flatten(), minlength=moe.n_experts).cumsum(0, dtype=torch.int32)
    out = moe.experts(x_TD[token], counts) * weights_TK.flatten()[order].unsqueeze(-1)
    ref = torch.zeros_like(x_TD).index_add_(0, token, out) + moe.shared_experts(x_TD)
    ref.square().sum().backward()
    for g, t in zip(got, [x, *moe.parameters()], strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)
