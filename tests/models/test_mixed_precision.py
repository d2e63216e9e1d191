"""bf16 parameters over fp32 masters: the cast keeps buffers and the router fp32 and hands over the fp32 values;
MasterWeightAdamW is AdamW in fp32, accumulates micro-batches in fp32, and shows clipping the gradients it applies."""

import pytest
import torch

from models import DeepSeekV3
from models.parallel.mixed_precision import MasterWeightAdamW, cast_parameters, fp32_parameters, main_params

HP = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def test_cast_keeps_buffers_and_router_fp32_and_hands_over_the_fp32_values(tiny_config):
    model = DeepSeekV3(tiny_config)
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    storage = {n: p.data.data_ptr() for n, p in model.named_parameters()}
    cast_parameters(model, torch.bfloat16, keep_masters=True)
    gates = fp32_parameters(model)
    assert len(gates) == len(model.moe_layers())  # one router weight per MoE layer
    for name, p in model.named_parameters():
        if p in gates:
            assert p.dtype == torch.float32 and not hasattr(p, "_fp32_master"), name
        else:
            assert p.dtype == torch.bfloat16, name
            assert torch.equal(p._fp32_master, fp32[name]) and p._fp32_master.data_ptr() == storage[name], name
    moe = model.moe_layers()[0]
    assert moe.gate.e_score_correction_bias.dtype == moe.tokens_per_expert.dtype == torch.float32
    assert model.freqs_cis.dtype == torch.complex64
    # The optimizer takes the handed-over values as masters (exact fp32 init) and leaves the dtypes alone.
    opt = MasterWeightAdamW(model.parameters(), **HP)
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert not hasattr(p, "_fp32_master")
        if p in gates:
            assert "master" not in state and p.dtype == torch.float32  # its own master, updated in place
        else:
            assert torch.equal(state["master"], fp32[name]) and p.dtype == torch.bfloat16, name


def test_the_optimizer_does_not_cast_the_model():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))]
    opt = MasterWeightAdamW(params, **HP)
    assert [p.dtype for p in params] == [torch.float32, torch.bfloat16]
    assert "master" not in opt.state[params[0]] and opt.state[params[1]]["master"].dtype == torch.float32


def _backward(params, coeffs):
    """One micro-batch: loss = sum(p * c), so p.grad = c exactly (c in the parameter's dtype)."""
    sum((p * c.to(p.dtype)).sum() for p, c in zip(params, coeffs, strict=True)).backward()


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_matches_fp32_adamw_on_the_fp32_sum_of_micro_batch_gradients(micro_batches):
    torch.manual_seed(0)
    init = [torch.randn(5, 7), torch.randn(11), torch.randn(3, 4)]
    dtypes = [torch.bfloat16, torch.bfloat16, torch.float32]  # the last one stands for the fp32 router
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    params = [torch.nn.Parameter(t.to(d)) for t, d in zip(init, dtypes, strict=True)]
    for p, t in zip(params, init, strict=True):
        if p.dtype != torch.float32:
            p._fp32_master = t.clone()  # what cast_parameters(keep_masters=True) leaves
    ref_opt, opt = torch.optim.AdamW(ref_params, **HP), MasterWeightAdamW(params, **HP)
    for _ in range(3):
        coeffs = [[torch.randn_like(t).to(d) for t, d in zip(init, dtypes, strict=True)] for _ in range(micro_batches)]
        for c in coeffs:
            _backward(params, c)
        exact = [sum(c[i].float() for c in coeffs) for i in range(len(init))]  # fp32 sum of the bf16 gradients
        holders = main_params(opt)
        for i, (p, holder) in enumerate(zip(params, holders, strict=True)):
            if micro_batches == 1 or p.dtype == torch.float32:
                assert holder is p and p.grad.dtype == p.dtype  # fast path: autograd's gradient as it is
            else:
                assert holder is opt.state[p]["master"] and p.grad is None
            assert torch.equal(holder.grad.float(), exact[i])  # bf16 accumulation would round each sum
        for p, g in zip(ref_params, exact, strict=True):
            p.grad = g.clone()
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
        assert all(h.grad is None for h in main_params(opt))
    for p, ref in zip(params, ref_params, strict=True):
        master = opt.state[p].get("master", p)
        torch.testing.assert_close(master, ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p.float(), ref.detach().to(p.dtype).float())


def test_clipping_main_params_clips_what_the_step_applies():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32).bfloat16()), torch.nn.Parameter(torch.randn(16))]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt, ref_opt = MasterWeightAdamW(params, **HP), torch.optim.AdamW(ref, **HP)
    coeffs = [[torch.randn(64, 32).bfloat16(), torch.randn(16)] for _ in range(4)]
    for c in coeffs:
        _backward(params, c)
    for p, i in zip(ref, range(2), strict=True):
        p.grad = sum(c[i].float() for c in coeffs)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm=0.5)
    got = torch.nn.utils.clip_grad_norm_(main_params(opt), max_norm=0.5)
    torch.testing.assert_close(got, want)
    assert want > 1.0  # the clip acted
    opt.step()
    ref_opt.step()
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(opt.state[p].get("master", p), r.detach(), rtol=1e-6, atol=1e-6)


def test_a_new_optimizer_takes_over_the_accumulation_hooks():
    p = torch.nn.Parameter(torch.randn(8).bfloat16())
    MasterWeightAdamW([p], **HP)  # e.g. a first fit, still referenced by nothing
    opt = MasterWeightAdamW([p], **HP)
    coeffs = [torch.randn(8).bfloat16() for _ in range(3)]
    for c in coeffs:
        _backward([p], [c])
    assert torch.equal(main_params(opt)[0].grad, sum(c.float() for c in coeffs))


def test_state_dict_round_trip_keeps_fp32_state():
    params = [torch.nn.Parameter(torch.randn(5, 7).bfloat16()), torch.nn.Parameter(torch.randn(3))]
    opt = MasterWeightAdamW(params, **HP)
    for _ in range(3):
        _backward(params, [torch.randn(5, 7), torch.randn(3)])
        _backward(params, [torch.randn(5, 7), torch.randn(3)])
        opt.step()
        opt.zero_grad()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = MasterWeightAdamW(copies, **HP)
    opt2.load_state_dict(opt.state_dict())  # torch's default would cast the fp32 state to the bf16 param dtype
    for p, q in zip(params, copies, strict=True):
        a, b = opt.state[p], opt2.state[q]
        assert set(a) == set(b) and b["exp_avg"].dtype == torch.float32 and b["step"].item() == 3
        for key in set(a) - {"step"}:
            assert b[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key
    # Accumulation after a reload sums into the reloaded masters.
    for _ in range(2):
        _backward(copies, [torch.ones(5, 7), torch.ones(3)])
    assert torch.equal(main_params(opt2)[0].grad, torch.full((5, 7), 2.0))


def test_a_dropped_model_and_optimizer_are_freed():
    """The accumulation hooks on the parameters hold the optimizer weakly: no cycle that gc cannot collect."""
    import gc
    import weakref

    model = torch.nn.Linear(32, 32, bias=False)
    cast_parameters(model, torch.bfloat16, keep_masters=True)
    optimizer = MasterWeightAdamW(model.parameters())
    model(torch.randn(4, 32, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    refs = weakref.ref(model.weight), weakref.ref(optimizer)
    del model, optimizer
    gc.collect()
    assert all(ref() is None for ref in refs)
