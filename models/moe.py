"""DeepSeekMoE: shared experts plus fine-grained routed experts, sigmoid gate with group-limited top-k.

Shapes: B batch, S sequence, T = B*S tokens, D model dim, E routed experts, K experts per token,
G groups, F expert hidden dim, TK = T*K routed (token, expert) pairs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from models.config import DeepSeekV3Config


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for dense layers and the shared experts."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router of section 2.1.2 / eqs. (12)-(16): affinities s, selection by s + b, combine weights from s.

    ``e_score_correction_bias`` (b) is a float32 buffer moved only by the aux-loss-free balancing
    callback; it changes which experts are chosen, never the combine weights or the gate's gradients.
    The gate runs in float32 whatever the surrounding precision (autocast is disabled around it); its weight
    stays float32 too under ``models.parallel.cast_parameters``.
    """

    def __init__(self, config: DeepSeekV3Config) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func, self.norm_topk_prob = config.scoring_func, config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens.

        Args:
            x_TD: (T, D) token states.

        Returns:
            weights_TK: (T, K) float32 combine weights; topk_idx_TK: (T, K) chosen experts;
            scores_TE: (T, E) float32 affinities s (before the bias).
        """
        with torch.autocast(x_TD.device.type, enabled=False):  # autocast would run this F.linear in bf16
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            scores_TE = logits_TE.sigmoid() if self.scoring_func == "sigmoid" else logits_TE.softmax(dim=-1)
        choice_TE = scores_TE.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            choice_TGe = choice_TE.view(-1, self.n_group, self.n_experts // self.n_group)
            # Group score: sum of its top-2 (V3, sigmoid); max (V2, softmax).
            if self.scoring_func == "sigmoid":
                group_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_TG = choice_TGe.amax(dim=-1)
            top_groups = group_TG.topk(self.topk_group, dim=-1).indices
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, top_groups, True)
            choice_TE = choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).flatten(1)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, topk_idx_TK)
        # Normalised at K = 1 too (weight 1): eq. (13) of the report, DeepSeek's inference code and transformers.
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * self.routed_scaling_factor, topk_idx_TK, scores_TE

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        nn.init.zeros_(self.e_score_correction_bias)


def _local(w: torch.Tensor) -> torch.Tensor:
    # This rank's experts of an expert-parallel DTensor (no communication); a plain tensor as it is.
    return w.to_local() if isinstance(w, DTensor) else w


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on, else x's own."""
    # torch._grouped_mm has no autocast rule: follow autocast by hand.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked (E, ...) weights and run with one grouped GEMM per projection.

    ``w1``/``w3`` are (E, F, D) and ``w2`` is (E, D, F): the layout of E stacked ``nn.Linear`` weights. Under
    expert parallelism (``models.parallel.expert_parallel``) they are DTensors sharded along E and the forward
    runs this rank's experts on the tokens dispatched to it.
    ``group_alignment``: the row multiple at which every expert's group must start (1: none; FP8 kernels need more).
    """

    group_alignment = 1

    def __init__(self, n_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Apply expert e to rows offsets_E[e-1]:offsets_E[e] of x_ND (rows sorted by expert).

        Args:
            x_ND: (N, D) token copies grouped by expert.
            offsets_E: (E,) int32 cumulative row counts (E = the local experts under expert parallelism).

        Returns:
            (N, D) in the compute dtype.
        """
        dtype = compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)
        w1, w2, w3 = (_local(w).to(dtype).transpose(-2, -1) for w in (self.w1, self.w2, self.w3))
        h_NF = F.silu(torch._grouped_mm(x_ND, w1, offs=offsets_E)) * torch._grouped_mm(x_ND, w3, offs=offsets_E)
        return torch._grouped_mm(h_NF, w2, offs=offsets_E)

    def reset_parameters(self, std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=std)


def sequence_balance_loss(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss, eqs. (17)-(20) of the DeepSeek-V3 report.

    L = alpha * sum_i f_i P_i per sequence, averaged over sequences, with f_i = E / (K S) * (tokens of the
    sequence routed to i) and P_i the sequence mean of the normalised affinity s_i / sum_j s_j.
    """
    n_experts, top_k = scores_TE.shape[-1], topk_idx_TK.shape[-1]
    scores_BSE = scores_TE.view(batch, -1, n_experts)
    seqlen = scores_BSE.shape[1]
    probs_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
    hits_BE = torch.zeros_like(probs_BE).scatter_add_(
        1, topk_idx_TK.view(batch, -1), torch.ones_like(topk_idx_TK, dtype=probs_BE.dtype).view(batch, -1)
    )
    f_BE = hits_BE * (n_experts / (top_k * seqlen))
    return alpha * (f_BE * probs_BE).sum(dim=-1).mean()


def is_recomputing() -> bool:
    """Whether the current forward runs inside a backward pass: an activation-checkpoint recompute.

    Counting there would double the loads, so ``MoE`` (and the callbacks' gate hooks) skip it.
    """
    # A compiled block recomputes inside its compiled backward graph, which never replays the buffer update (and
    # the graph-task query would break the graph).
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


_pending = threading.local()  # .call: the shared experts of the MoE forward this thread is in (see run_shared_experts)


class _SharedExpertsCall:
    """The shared experts of one MoE forward, run once: early through ``run_shared_experts``, else where the layer
    adds their output."""

    def __init__(self, module: nn.Module, x_TD: torch.Tensor) -> None:
        self.module, self.x_TD, self.out_TD = module, x_TD, None

    def __call__(self) -> torch.Tensor:
        if self.out_TD is None:
            self.out_TD = self.module(self.x_TD)
        return self.out_TD


@contextmanager
def _shared_experts_pending(call: _SharedExpertsCall) -> Iterator[None]:
    previous, _pending.call = getattr(_pending, "call", None), call
    try:
        yield
    finally:
        _pending.call = previous


def run_shared_experts() -> None:
    """Compute, now, the shared experts of the MoE layer whose routed experts this thread is running (once).

    A seam for what wraps ``GroupedExperts`` from outside: expert parallelism calls it after issuing its dispatch
    all-to-all and before waiting for it, so the shared experts' compute overlaps the communication (Megatron's
    shared-expert overlap). The output is the same; only the order of the work changes. Outside a MoE forward, or
    once they ran, it does nothing.
    """
    call = getattr(_pending, "call", None)
    if call is not None:
        call()


class _Dispatch(torch.autograd.Function):
    """``x_TD[order_TK // K]``: each token's K copies, sorted by expert. The backward gathers the copies' gradients
    back into (token, k) order and sums over k, where autograd's would scatter-add them into (T, D): atomic adds
    whose order (threads, CUDA blocks) makes the gradient, and hence the run, differ bitwise from run to run."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, order_TK: torch.Tensor, inverse_TK: torch.Tensor, top_k: int):  # noqa: ANN001
        ctx.save_for_backward(inverse_TK)
        ctx.top_k = top_k
        return x_TD[order_TK // top_k]

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):  # noqa: ANN001, ANN205
        (inverse_TK,) = ctx.saved_tensors
        grad_TKD = grad_ND[inverse_TK].view(-1, ctx.top_k, grad_ND.shape[-1])
        return grad_TKD.sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """``x[perm]`` for a permutation, whose backward is the gather ``grad[inverse]``, not an atomic scatter-add."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, perm_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(inverse_N)
        return x_ND[perm_N]

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (inverse_N,) = ctx.saved_tensors
        return grad_ND[inverse_N], None, None


def permute_rows(x_ND: torch.Tensor, perm_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:
    """``x_ND[perm_N]`` for a permutation with inverse ``inverse_N``; differentiable, its backward a gather too."""
    return _Permute.apply(x_ND, perm_N, inverse_N)


def _scatter_rows(x_MD: torch.Tensor, rows_M: torch.Tensor, n_rows: int) -> torch.Tensor:
    # Out of place: under torch 2.11's compile, an in-place op on the tensor an autograd.Function's forward returns
    # routes its gradient to the wrong slot (pytorch/pytorch#180642, fixed in 2.12): _PadGroups' input gradient
    # came out wrong on the H200 (benchmarks/fp8_compile_check.py).
    return x_MD.new_zeros(n_rows, x_MD.shape[1]).index_copy(0, rows_M, x_MD)


class _PadGroups(torch.autograd.Function):
    """Rows put at distinct ``rows`` of a zero (n_rows, D) tensor: the padded expert groups. Backward: a gather."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, rows_M: torch.Tensor, n_rows: int) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(rows_M)
        return _scatter_rows(x_MD, rows_M, n_rows)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (rows_M,) = ctx.saved_tensors
        return grad_ND[rows_M], None, None


class _UnpadGroups(torch.autograd.Function):
    """``x[rows]`` for distinct rows of the padded groups. Backward: the rows written back, zeros elsewhere."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, rows_M: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(rows_M)
        ctx.n_rows = x_ND.shape[0]
        return x_ND[rows_M]

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (rows_M,) = ctx.saved_tensors
        return _scatter_rows(grad_MD, rows_M, ctx.n_rows), None


def padded_rows(
    counts_E: torch.Tensor, expert_of_sorted_M: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each expert-sorted row goes when every expert's group starts at a multiple of ``align``; no host sync.

    Args:
        counts_E: (E,) rows per expert.
        expert_of_sorted_M: (M,) expert of each row, sorted (M = counts_E.sum()).
        align: Group alignment.

    Returns:
        (M,) destination rows, (E,) int32 padded group ends, and the padded row count: the static bound
        ``M + E * (align - 1)`` rounded up to ``align`` (rows past the last group are padding too).
    """
    padded_E = (counts_E + align - 1) // align * align
    ends_E = padded_E.cumsum(0, dtype=torch.int32)
    shift_E = (ends_E - padded_E) - (counts_E.cumsum(0) - counts_E)  # padded group start - unpadded start
    rows_M = torch.arange(expert_of_sorted_M.numel(), device=counts_E.device) + shift_E[expert_of_sorted_M]
    n_rows = -(-(expert_of_sorted_M.numel() + counts_E.numel() * (align - 1)) // align) * align
    return rows_M, ends_E, n_rows


class MoE(nn.Module):
    """Shared experts + routed experts with no token dropping.

    ``tokens_per_expert`` (float32, E) accumulates routed tokens during training forwards; the balancing
    and monitoring callbacks read, all-reduce and reset it. The model never syncs it.
    """

    def __init__(self, config: DeepSeekV3Config) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.seq_aux_alpha = config.seq_aux_alpha
        self.gate = Gate(config)
        self.experts = GroupedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0
            else None
        )
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mix x through the experts.

        Args:
            x: (B, S, D).

        Returns:
            (B, S, D) output and the sequence-wise balance loss (a scalar, or None when it is off).
        """
        bsz, seqlen, dim = x.shape
        x_TD = x.reshape(-1, dim)
        weights_TK, topk_idx_TK, scores_TE = self.gate(x_TD)
        counts_E = torch.zeros(self.n_experts, dtype=torch.int32, device=x.device).scatter_add_(
            0, topk_idx_TK.flatten(), torch.ones_like(topk_idx_TK.flatten(), dtype=torch.int32)
        )
        if self.training and not is_recomputing():
            with torch.no_grad():
                self.tokens_per_expert += counts_E
        if self.shared_experts is None or torch.compiler.is_compiling():
            y_TD = self.routed(x_TD, weights_TK, topk_idx_TK, counts_E)
            if self.shared_experts is not None:
                y_TD = y_TD + self.shared_experts(x_TD)
        else:  # the routed experts' wrapper may run the shared ones earlier (run_shared_experts), or they run here
            shared = _SharedExpertsCall(self.shared_experts, x_TD)
            with _shared_experts_pending(shared):
                y_TD = self.routed(x_TD, weights_TK, topk_idx_TK, counts_E)
            y_TD = y_TD + shared()
        aux = None
        if self.training and self.seq_aux_alpha > 0:
            aux = sequence_balance_loss(scores_TE, topk_idx_TK, bsz, self.seq_aux_alpha)
        return y_TD.view(bsz, seqlen, dim).type_as(x), aux

    def routed(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, topk_idx_TK: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """Permute token copies by expert, run the grouped GEMMs, un-permute and weight; no host sync.

        The combine gathers each token's K outputs back into (token, k) order and sums them in fp32, rather than
        scatter-adding into (T, D): bf16 atomic adds cost ~3.5 ms a layer at 32K tokens on an H200. Experts with a
        ``group_alignment`` (the FP8 kernels') get each group padded with zero rows to start at a multiple of it.
        """
        top_k = topk_idx_TK.shape[1]
        order_TK = topk_idx_TK.flatten().argsort(stable=True)  # (TK,) sorted position -> (token, k) pair
        arange_TK = torch.arange(order_TK.numel(), device=order_TK.device)
        inverse_TK = torch.empty_like(order_TK).scatter_(0, order_TK, arange_TK)  # pair -> sorted position
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)
        x_TKD = _Dispatch.apply(x_TD, order_TK, inverse_TK, top_k)  # rows sorted by expert
        align = self.experts.group_alignment
        if align > 1:
            rows_TK, offsets_E, n_rows = padded_rows(counts_E, topk_idx_TK.flatten()[order_TK], align)
            out_ND = self.experts(_PadGroups.apply(x_TKD, rows_TK, n_rows), offsets_E)
            out_TKD = _UnpadGroups.apply(out_ND, rows_TK[inverse_TK])  # rows in (token, k) order
        else:
            out_TKD = permute_rows(self.experts(x_TKD, offsets_E), inverse_TK, order_TK)  # (token, k) order
        y_TD = (out_TKD.view(-1, top_k, out_TKD.shape[-1]).float() * weights_TK.unsqueeze(-1)).sum(dim=1)
        return y_TD.to(out_TKD.dtype)

    def reset_parameters(self, std: float) -> None:
        self.gate.reset_parameters(std)
        self.experts.reset_parameters(std)
        self.tokens_per_expert.zero_()
