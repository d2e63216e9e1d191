"""Output head + next-token cross-entropy fused and chunked over tokens, so (T, V) logits never exist at once.

With a 129K vocabulary, the plain path holds bf16 logits, their fp32 copy, the fp32 log-softmax and its
gradient for every token: about 25 bytes per (token, vocab) entry, 13 GB at 4 x 4096 tokens. Here the head
matmul, the softmax and both gradient matmuls run per chunk of tokens during the forward pass (as Liger's
fused linear cross-entropy does), keeping only the (T, D) input gradient and the fp32 (V, D) weight gradient
for the backward pass. Same FLOPs, same bf16 matmuls as autocast; the weight gradient is summed in fp32.

Shapes: T tokens, D model dim, V vocabulary, C tokens per chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _ce_chunk(logits_CV: torch.Tensor, labels_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of one chunk and d(sum)/d(logits) = softmax - onehot (0 on ignored rows), in logits' dtype."""
    logits_CV = logits_CV.float()
    valid_C = labels_C != IGNORE_INDEX
    target_C1 = torch.where(valid_C, labels_C, 0).unsqueeze(1)
    lse_C1 = logits_CV.logsumexp(dim=-1, keepdim=True)
    loss = ((lse_C1 - logits_CV.gather(1, target_C1)).squeeze(1) * valid_C).sum()
    onehot_CV = torch.arange(logits_CV.shape[1], device=logits_CV.device) == target_C1
    grad_CV = ((logits_CV - lse_C1).exp() - onehot_CV.float()) * valid_C.unsqueeze(1)
    return loss, grad_CV


_compiled_ce_chunk = None


def _ce_chunk_fn(device: torch.device):
    """The chunk kernel: compiled into two fused kernels on CUDA (no fp32 (C, V) temporaries), eager elsewhere."""
    global _compiled_ce_chunk
    if device.type != "cuda":
        return _ce_chunk
    if _compiled_ce_chunk is None:
        _compiled_ce_chunk = torch.compile(_ce_chunk, dynamic=False)
    return _compiled_ce_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor, chunk_size: int):  # noqa: ANN001, ANN205
        device_type = h_TD.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h_TD.dtype
        w_VD = weight_VD.to(dtype)
        ce_chunk = _ce_chunk_fn(h_TD.device)
        grad_h_TD = torch.empty_like(h_TD)
        grad_w_VD = torch.zeros_like(weight_VD, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        for start in range(0, h_TD.shape[0], chunk_size):
            h_CD = h_TD[start : start + chunk_size].to(dtype)
            logits_CV = h_CD @ w_VD.t()
            chunk_loss, grad_CV = ce_chunk(logits_CV, labels_T[start : start + chunk_size])
            loss += chunk_loss
            grad_CV = grad_CV.to(dtype)
            grad_h_TD[start : start + chunk_size] = grad_CV @ w_VD
            grad_w_VD += grad_CV.t() @ h_CD
        scale = 1.0 / (labels_T != IGNORE_INDEX).sum().clamp(min=1).float()
        ctx.save_for_backward(grad_h_TD, grad_w_VD, scale)
        ctx.weight_dtype = weight_VD.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001, ANN205
        grad_h_TD, grad_w_VD, scale = ctx.saved_tensors
        factor = grad_loss * scale
        return grad_h_TD * factor.to(grad_h_TD.dtype), (grad_w_VD * factor).to(ctx.weight_dtype), None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``h @ weight.T`` against ``labels`` (``IGNORE_INDEX`` skipped).

    Equals ``F.cross_entropy((h @ weight.T).float().flatten(0, -2), labels.flatten(), ignore_index=-100)``
    without materialising the logits. Under autocast the matmuls run in the autocast dtype.

    Args:
        h: (..., D) final hidden states (after the final norm).
        weight: (V, D) output head weight.
        labels: (...) target ids.
        chunk_size: Tokens per chunk C; the chunk's (C, V) fp32 logits are the peak extra memory.

    Returns:
        Scalar float32 loss.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk_size)
