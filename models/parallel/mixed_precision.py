"""bf16 parameters with fp32 master weights: AdamW that keeps the fp32 copy, the moments and the update in fp32.

Autocast keeps fp32 parameters and casts every weight to bf16 in each forward, then casts each bf16 weight
gradient back to fp32: two passes over all weights per step that do no model math. Here the model holds bf16
parameters (computing as under autocast, with a bf16 residual stream, as Megatron and FSDP2's
``MixedPrecisionPolicy(param_dtype=bf16)`` do) and the optimizer holds the fp32 truth: one fused pass reads
the master weight, the gradient and the two moments, and writes them back with the new bf16 weight.
The math of the update is ``torch.optim.AdamW``'s, in fp32.

Who does what (the report's section 3.3: master weights, weight gradients and optimizer states in fp32):

* the precision owner (``lightning_modules.MasterWeightPrecision`` in a YAML) casts the parameters with
  ``cast_parameters(model, torch.bfloat16, keep_masters=True)``: every floating parameter except the router's
  (``FP32_MODULES``) becomes bf16, the buffers stay as they are, and each cast parameter keeps its fp32 value
  for the optimizer (the same storage: no copy), so no initial precision is lost;
* ``MasterWeightAdamW`` takes those fp32 values as its masters (a parameter without one gets ``p.float()``),
  updates fp32 parameters (the gate) in place, and accumulates gradients of several micro-batches in fp32;
* gradient clipping and ``grad_norm`` read ``main_params(optimizer)``: the tensors whose ``.grad`` the optimizer
  will apply (the fp32 accumulators when there were several micro-batches, else the parameters themselves).

Shapes: N elements of one parameter.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from models.moe import Gate

try:  # Triton exists where CUDA does; the CPU path below is the reference it is tested against.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

# Modules whose parameters stay fp32 in every precision mode: the router (its affinities pick the experts).
FP32_MODULES: tuple[type[nn.Module], ...] = (Gate,)

# Attribute under which cast_parameters leaves a parameter's fp32 value for MasterWeightAdamW.
_MASTER_ATTR = "_fp32_master"


def fp32_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters that stay fp32 whatever the compute precision: those of ``FP32_MODULES`` (the gates)."""
    return {p for m in model.modules() if isinstance(m, FP32_MODULES) for p in m.parameters()}


def cast_parameters(model: nn.Module, dtype: torch.dtype, keep_masters: bool = False) -> nn.Module:
    """Cast floating-point parameters (not buffers, not the gates') to ``dtype`` in place.

    ``model.to(dtype)`` would also cast the float32 buffers the MoE relies on (expert bias, token counts) and
    the router; this leaves every buffer and ``FP32_MODULES``' parameters as they are.

    Args:
        model: The model, in fp32.
        dtype: The compute dtype of its parameters (bf16).
        keep_masters: Keep each cast parameter's fp32 tensor on it for ``MasterWeightAdamW`` to take as its
            master weight (no copy: the fp32 storage is handed over). Only when an optimizer will be built.
    """
    keep_fp32 = fp32_parameters(model)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and param not in keep_fp32:
            fp32 = param.data
            param.data = fp32.to(dtype)
            if keep_masters:
                setattr(param, _MASTER_ATTR, fp32)
    return model


def main_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors whose ``.grad`` the optimizer applies: what gradient clipping and ``grad_norm`` must read."""
    if isinstance(optimizer, MasterWeightAdamW):
        return optimizer.main_params()
    return [p for group in optimizer.param_groups for p in group["params"]]


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
    master, exp_avg, exp_avg_sq = state.get("master", param), state["exp_avg"], state["exp_avg_sq"]
    grad = grad.float()
    beta1, beta2 = group["betas"]
    master.mul_(1 - group["lr"] * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(group["eps"])
    master.addcdiv_(exp_avg, denom, value=-group["lr"] / bc1)
    if master is not param:
        param.copy_(master)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over low-precision parameters with fp32 master weights, fp32 moments and fp32 gradient accumulation.

    The optimizer does not change the model's dtype: give it the parameters as the precision owner left them
    (``cast_parameters``). A bf16 parameter's master is the fp32 value ``cast_parameters(..., keep_masters=True)``
    kept on it (else ``p.float()``); an fp32 parameter (the router's) is its own master, updated in place. Each
    step runs one fused kernel per parameter on CUDA (Triton) and the same math in plain torch elsewhere.

    Gradients: with one micro-batch per step the bf16 ``p.grad`` autograd wrote is used as it is (no pass over
    the weights beyond the update). From the second backward before a step on, each bf16 parameter's gradient
    is summed in fp32 into ``master.grad`` (Megatron's ``main_grad``) and ``p.grad`` is left None, so gradient
    accumulation, the batch-size ramp included, adds in fp32 whatever the number of micro-batches. Clip and
    measure the gradients through ``main_params()`` (``models.parallel.mixed_precision.main_params``).
    ``zero_grad`` frees the fp32 sums.

    Args:
        params: Parameters or parameter groups, as for ``torch.optim.AdamW``.
        lr: Learning rate.
        betas: Adam (beta1, beta2).
        eps: Adam epsilon.
        weight_decay: Decoupled weight decay.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        if not p.is_floating_point():
            raise ValueError(f"MasterWeightAdamW got a {p.dtype} parameter; it optimises floating-point ones only")
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        handed_over = getattr(p, _MASTER_ATTR, None)
        if handed_over is not None:
            delattr(p, _MASTER_ATTR)
        if p.dtype != torch.float32:
            if handed_over is None or handed_over.shape != p.shape:
                handed_over = p.detach().float()
            state["master"] = handed_over.detach().to(p.device)
            self._hook_accumulation(p)
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)

    def _hook_accumulation(self, p: torch.Tensor) -> None:
        """Hooks that move a second (third, ...) micro-batch's gradient into the fp32 ``master.grad``."""
        for handle in getattr(p, "_fp32_accumulation_hooks", ()):  # the newest optimizer of p owns them
            handle.remove()

        # The hooks live on the parameter and must not hold the optimizer: parameter -> hook -> optimizer -> state ->
        # parameter is a cycle through autograd's C++ side that gc cannot collect (a dropped model and optimizer
        # would keep their memory, e.g. between the variants of benchmarks/train_throughput.py).
        optimizer = weakref.ref(self)
        p_ref = weakref.ref(p)

        def before_accumulation(grad: torch.Tensor) -> None:
            p = p_ref()
            master = optimizer().state[p]["master"]  # looked up each time: load_state_dict replaces it
            if master.grad is None:
                if p.grad is None:
                    return  # the first micro-batch: autograd stores its gradient in p.grad as usual
                master.grad = p.grad.float()  # a second one: the sum continues in fp32
                p.grad = None
            master.grad.add_(grad)

        def after_accumulation(param: torch.Tensor) -> None:
            if optimizer().state[param]["master"].grad is not None:
                param.grad = None  # autograd stored the gradient just added to master.grad

        p._fp32_accumulation_hooks = (
            p.register_hook(before_accumulation),
            p.register_post_accumulate_grad_hook(after_accumulation),
        )

    def main_params(self) -> list[torch.Tensor]:
        """Per parameter, the tensor whose ``.grad`` the next step applies: the fp32 master after accumulation."""
        return [holder for group in self.param_groups for holder in self._holders(group)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for state in self.state.values():
            if "master" in state:
                state["master"].grad = None

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
            state = self.state[p]
            for key, value in fp32_state.get(pid, {}).items():
                state[key] = value.to(device=p.device, dtype=torch.float32)
            if p.dtype == torch.float32 and "master" in state:  # saved while p was low-precision
                with torch.no_grad():
                    p.copy_(state.pop("master"))
            if "master" in state:
                state["master"].grad = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p, holder in zip(group["params"], self._holders(group), strict=True):
                grad = holder.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("MasterWeightAdamW does not support sparse gradients")
                state = self.state[p]
                state["step"] += 1
                step = state["step"].item()  # a CPU tensor: no device sync
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                if p.is_cuda and triton is not None and p.is_contiguous() and grad.is_contiguous():
                    _launch(p, grad, state, group, bc1, bc2)
                else:
                    _adamw_reference(p, grad, state, group, bc1, bc2)
        return loss

    def _holders(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The group's gradient holders: a parameter's fp32 master once it accumulates, else the parameter."""
        holders = []
        for p in group["params"]:
            master = self.state[p].get("master")
            holders.append(master if master is not None and master.grad is not None else p)
        return holders


def _launch(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], bc1, bc2) -> None:
    n = p.numel()
    block = 4096
    beta1, beta2 = group["betas"]
    _adamw_kernel[(triton.cdiv(n, block),)](
        p,
        grad,
        state.get("master", p),
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
