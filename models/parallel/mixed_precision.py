"""bf16 parameters with fp32 master weights: AdamW that keeps the fp32 copy, the moments and the update in fp32.

Autocast keeps fp32 parameters and casts every weight to bf16 in each forward, then casts each bf16 weight
gradient back to fp32: two passes over all weights per step that do no model math. Here the model holds bf16
parameters (computing as under autocast, with a bf16 residual stream, as Megatron and FSDP2's
``MixedPrecisionPolicy(param_dtype=bf16)`` do) and the optimizer holds the fp32 truth: one fused pass reads
the master weight, the bf16 gradient and the two moments, and writes them back with the new bf16 weight.
The math of the update is ``torch.optim.AdamW``'s, in fp32.

Shapes: N elements of one parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

try:  # Triton exists where CUDA does; the CPU path below is the reference it is tested against.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating-point parameters (not buffers) to ``dtype`` in place.

    ``model.to(dtype)`` would also cast the float32 buffers the MoE relies on (expert bias, token counts);
    this leaves every buffer as it is.
    """
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


if triton is not None:

    @triton.jit
    def _adamw_kernel(
        param_ptr,
        grad_ptr,
        master_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        n_elements,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        bias_correction1,
        bias_correction2_sqrt,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        p = tl.load(master_ptr + offs, mask=mask)
        m = tl.load(exp_avg_ptr + offs, mask=mask)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
        p = p * (1.0 - lr * weight_decay)
        m = m + (1.0 - beta1) * (g - m)  # lerp, as torch.optim.AdamW
        v = beta2 * v + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
        p = p - (lr / bias_correction1) * (m / denom)
        tl.store(master_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)


def _adamw_reference(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], bc1: float, bc2: float
) -> None:
    """torch.optim.AdamW's single-tensor update, on the fp32 master, then rounded into the parameter."""
    master, exp_avg, exp_avg_sq = state["master"], state["exp_avg"], state["exp_avg_sq"]
    grad = grad.float()
    beta1, beta2 = group["betas"]
    master.mul_(1 - group["lr"] * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(group["eps"])
    master.addcdiv_(exp_avg, denom, value=-group["lr"] / bc1)
    param.copy_(master)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over low-precision parameters with fp32 master weights and fp32 moments.

    At construction each parameter's fp32 value is copied into the optimizer state (``master``) and the
    parameter is cast to ``param_dtype``; build it while the model is still in fp32 so no initial precision
    is lost. Each step runs one fused kernel per parameter on CUDA (Triton) and the same math in plain torch
    elsewhere.

    Args:
        params: Parameters or parameter groups, as for ``torch.optim.AdamW``.
        lr: Learning rate.
        betas: Adam (beta1, beta2).
        eps: Adam epsilon.
        weight_decay: Decoupled weight decay.
        param_dtype: Dtype the model computes in (its parameters become this dtype).
        fp32_grad_accumulation: Accumulate gradients of successive backwards (gradient accumulation) in an
            fp32 buffer, as Megatron's ``main_grad``, instead of in the bf16 ``.grad``. Costs one pass over
            the weights per micro-batch and fp32 gradient memory; only useful with gradient accumulation.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        param_dtype: torch.dtype = torch.bfloat16,
        fp32_grad_accumulation: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.param_dtype = param_dtype
        self.fp32_grad_accumulation = fp32_grad_accumulation
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state["master"] = p.detach().to(torch.float32, copy=True)
        state["exp_avg"] = torch.zeros_like(state["master"])
        state["exp_avg_sq"] = torch.zeros_like(state["master"])
        p.data = p.data.to(self.param_dtype)
        if self.fp32_grad_accumulation:
            p.register_post_accumulate_grad_hook(self._accumulate_fp32)

    def _accumulate_fp32(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if state.get("grad") is None:
            state["grad"] = p.grad.float()
        else:
            state["grad"].add_(p.grad)
        p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for state in self.state.values():
            state.pop("grad", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch.optim.Optimizer does, but keep the master weights and moments fp32.

        The base class casts floating-point state to the parameter dtype, which here is bf16.
        """
        fp32_state = {
            pid: {k: v for k, v in s.items() if k != "step" and torch.is_tensor(v) and v.is_floating_point()}
            for pid, s in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(ids, params, strict=True):
            for key, value in fp32_state.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                grad = state.get("grad") if self.fp32_grad_accumulation else p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("MasterWeightAdamW does not support sparse gradients")
                state["step"] += 1
                step = state["step"].item()  # a CPU tensor: no device sync
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                if p.is_cuda and triton is not None and p.is_contiguous() and grad.is_contiguous():
                    _launch(p, grad, state, group, bc1, bc2)
                else:
                    _adamw_reference(p, grad, state, group, bc1, bc2)
        return loss


def _launch(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], bc1, bc2) -> None:
    n = p.numel()
    block = 4096
    beta1, beta2 = group["betas"]
    _adamw_kernel[(triton.cdiv(n, block),)](
        p,
        grad,
        state["master"],
        state["exp_avg"],
        state["exp_avg_sq"],
        n,
        float(group["lr"]),
        beta1,
        beta2,
        group["eps"],
        group["weight_decay"],
        bc1,
        math.sqrt(bc2),
        BLOCK=block,
        num_warps=8,
    )
