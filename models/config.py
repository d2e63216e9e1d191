"""DeepSeek-V3 model configuration: one flat dataclass, named presets, parameter and FLOP counts.

Field names follow DeepSeek-V3's public ``config.json`` so that the paper, the released config and this
code can be read side by side. Training-side knobs (balance-loss alpha, MTP loss weight, init std) sit
beside them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ROUTING_GROUPS = ("experts", "ep_ranks", "nodes")


@dataclass
class DeepSeekV3Config:
    """Architecture and training-side hyperparameters of a DeepSeek-V3-style MoE transformer.

    Attributes:
        vocab_size: Vocabulary size of the embedding and output head.
        hidden_size: Model width D.
        intermediate_size: Hidden width of the dense SwiGLU MLP in the first ``first_k_dense_replace`` layers.
        moe_intermediate_size: Hidden width of each routed (and each shared) expert.
        num_hidden_layers: Number of transformer blocks (MTP blocks not included).
        first_k_dense_replace: The first k blocks use a dense MLP instead of MoE.
        num_attention_heads: Attention heads H.
        q_lora_rank: Rank of the low-rank query compression; ``None`` = direct query projection.
        kv_lora_rank: Rank of the joint key/value compression (the cached latent).
        qk_nope_head_dim: Per-head query/key dims without RoPE.
        qk_rope_head_dim: Dims of the decoupled RoPE query and of the RoPE key shared across heads (even).
        v_head_dim: Per-head value dims.
        n_routed_experts: Routed experts E per MoE layer.
        n_shared_experts: Shared experts per MoE layer (one fused MLP of width n_shared * moe_intermediate).
        num_experts_per_tok: Routed experts K chosen per token.
        n_group: Expert groups for group-limited routing.
        topk_group: Groups a token may route to.
        routing_groups: What a routing group stands for under expert parallelism. ``"experts"``: a block of
            n_routed_experts / n_group experts, nothing more. ``"ep_ranks"``: group g is the experts of EP rank g
            (n_group = ep), so each token's experts sit on at most topk_group GPUs (DeepSeek-V2's device-limited
            routing). ``"nodes"``: group g is the experts on node g (n_group = the nodes of an EP group), so each
            token reaches at most M = topk_group nodes: the node-limited routing of section 2.1.2 of the
            DeepSeek-V3 report. The routing math is the same in all three; ``parallelize`` checks the layout.
        routed_scaling_factor: Multiplier on the combine weights of the routed experts.
        norm_topk_prob: Normalise the chosen affinities to sum to one.
        scoring_func: Affinity function, ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"`` (DeepSeek-V2).
        rope_theta: RoPE base.
        rope_factor: YaRN context-extension factor; 1.0 disables YaRN.
        original_max_position_embeddings: Context length before YaRN extension.
        beta_fast: YaRN fast boundary (rotations).
        beta_slow: YaRN slow boundary (rotations).
        mscale: YaRN mscale (attention temperature numerator).
        mscale_all_dim: YaRN mscale applied to the whole softmax scale.
        max_position_embeddings: Longest sequence the RoPE tables cover.
        rms_norm_eps: RMSNorm epsilon.
        num_nextn_predict_layers: Multi-token-prediction depth D (0 disables MTP).
        tie_word_embeddings: Share the embedding matrix with the output head.
        seq_aux_alpha: Weight alpha of the complementary sequence-wise balance loss (report: 1e-4); 0 disables it.
        mtp_loss_weight: Weight lambda of the MTP loss (report: 0.3, then 0.1).
        init_std: Standard deviation of the normal weight initialisation (report: 0.006).
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routing_groups: str = "experts"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    seq_aux_alpha: float = 1e-4
    mtp_loss_weight: float = 0.3
    init_std: float = 0.006
    qk_head_dim: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values for any inconsistent setting."""
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "original_max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        non_negative = ["qk_nope_head_dim", "first_k_dense_replace", "num_nextn_predict_layers", "n_shared_experts"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(
                f"q_lora_rank must be a positive integer or None (direct projection), got {self.q_lora_rank}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs of dims), got {self.qk_rope_head_dim}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) must be <= num_hidden_layers "
                f"({self.num_hidden_layers})"
            )
        self._validate_moe()
        self._validate_rope()
        for name in ("seq_aux_alpha", "mtp_loss_weight", "rms_norm_eps", "init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def _validate_moe(self) -> None:
        if not self.has_moe:
            return
        if self.n_routed_experts <= 0:
            raise ValueError(f"n_routed_experts must be positive when MoE layers exist, got {self.n_routed_experts}")
        if self.n_group <= 0 or self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group}); "
                "choose n_group among its divisors"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2 and self.n_group > 1:
            raise ValueError(
                f"each group needs >= 2 experts (group score = sum of its top-2); n_routed_experts "
                f"{self.n_routed_experts} / n_group {self.n_group} = {per_group}"
            )
        reachable = per_group * self.topk_group
        if not 1 <= self.num_experts_per_tok <= reachable:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, {reachable}]: the experts in "
                f"topk_group={self.topk_group} groups of {per_group}"
            )
        if self.routing_groups not in ROUTING_GROUPS:
            raise ValueError(f"routing_groups must be one of {ROUTING_GROUPS}, got {self.routing_groups!r}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")

    def _validate_rope(self) -> None:
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_factor < 1.0:
            raise ValueError(f"rope_factor must be >= 1.0 (1.0 disables YaRN), got {self.rope_factor}")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast ({self.beta_fast}) must be > beta_slow ({self.beta_slow})")

    # ------------------------------------------------------------------ derived
    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0

    @property
    def use_yarn(self) -> bool:
        return self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """Attention softmax scale: 1/sqrt(qk_head_dim), times YaRN's mscale(all_dim)^2 when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.use_yarn and self.mscale_all_dim:
            m = yarn_get_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether block ``layer_id`` (MTP blocks numbered after the main ones) uses MoE."""
        return layer_id >= self.first_k_dense_replace

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of MLA cache per token over all main layers: only the latent and the shared RoPE key."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_value

    # ------------------------------------------------------------------ counts
    def _attn_matmul_params(self) -> int:
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = d * h * self.qk_head_dim
        else:
            q = d * self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def _block_matmul_params(self, layer_id: int, activated: bool) -> int:
        d = self.hidden_size
        if not self.is_moe_layer(layer_id):
            return self._attn_matmul_params() + 3 * d * self.intermediate_size
        routed = self.num_experts_per_tok if activated else self.n_routed_experts
        experts = (routed + self.n_shared_experts) * 3 * d * self.moe_intermediate_size
        return self._attn_matmul_params() + self.n_routed_experts * d + experts  # gate + experts

    def _block_norm_params(self) -> int:
        return 2 * self.hidden_size + self.kv_lora_rank + (self.q_lora_rank or 0)

    def num_params(self, activated: bool = False, include_mtp: bool = True, include_embedding: bool = True) -> int:
        """Parameter count.

        Args:
            activated: Count only what one token touches (K routed experts, not all E).
            include_mtp: Count the MTP modules (each: two input norms, eh_proj, one block, a final norm; they
                share the embedding and output head, so neither is counted twice).
            include_embedding: Count the input embedding table (a lookup, not a matmul). A tied table is
                counted once, as the head.
        """
        d, v = self.hidden_size, self.vocab_size
        layers = range(self.num_hidden_layers)
        total = sum(self._block_matmul_params(i, activated) + self._block_norm_params() for i in layers) + d
        total += v * d  # output head (or the tied table)
        if include_embedding and not self.tie_word_embeddings:
            total += v * d
        if include_mtp:
            for k in range(self.num_nextn_predict_layers):
                layer_id = self.num_hidden_layers + k
                total += 3 * d + 2 * d * d + self._block_matmul_params(layer_id, activated) + self._block_norm_params()
        return total

    def matmul_params_per_token(self, include_mtp: bool = True) -> int:
        """Weights one token multiplies in a forward pass: activated matmuls incl. the head and gates, no embedding."""
        d, v = self.hidden_size, self.vocab_size
        n = sum(self._block_matmul_params(i, activated=True) for i in range(self.num_hidden_layers)) + v * d
        if include_mtp:
            for k in range(self.num_nextn_predict_layers):
                n += 2 * d * d + self._block_matmul_params(self.num_hidden_layers + k, activated=True) + v * d
        return n

    def flops_per_token(self, seq_len: int, include_mtp: bool = True) -> float:
        """Training FLOPs per token: 6 x matmul params + causal attention (QK^T and AV, forward + backward).

        Causal attention averages seq_len / 2 keys per query: forward 2 * H * (Dqk + Dv) * S / 2 per layer, and
        backward twice that.
        """
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        attn = 3 * layers * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * seq_len
        return 6.0 * self.matmul_params_per_token(include_mtp) + attn

    # ------------------------------------------------------------------ presets / io
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DeepSeekV3Config:
        """Build a named preset (see ``PRESETS``), optionally overriding fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DeepSeekV3Config:
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DeepSeekV3Config fields {unknown}; valid fields: {sorted(known)}")
        return cls(**values)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature, eq. of Peng et al. (2023) as used by DeepSeek-V2/V3."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_NO_YARN = {"rope_factor": 1.0}

# Moonlight-16B-A3B (moonshotai), the published DeepSeek-V3-architecture 16B/3B model.
_MOONLIGHT_16B_A3B: dict[str, Any] = {
    "vocab_size": 163840,
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.446,
    "rope_theta": 50000.0,
    "max_position_embeddings": 8192,
    "num_nextn_predict_layers": 0,
    **_NO_YARN,
}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the tiny pretraining run: a few M params.
    "tiny": {
        "vocab_size": 4096,
        "hidden_size": 128,
        "intermediate_size": 384,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "num_nextn_predict_layers": 1,
        **_NO_YARN,
    },
    # One-GPU benchmark shape (issue 6): Moonlight's layer widths, 8 layers, DeepSeek-V3's vocabulary and groups.
    "bench-1gpu": {
        **_MOONLIGHT_16B_A3B,
        "vocab_size": 129280,
        "num_hidden_layers": 8,
        "n_group": 8,
        "topk_group": 4,
        "max_position_embeddings": 4096,
    },
    # DeepSeek-V3's own layer widths, cut to fit one GPU.
    "bench-v3w": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 32,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "num_nextn_predict_layers": 0,
        **_NO_YARN,
    },
    "moonlight-16b-a3b": _MOONLIGHT_16B_A3B,
    # DeepSeek-V3 671B as released (config.json), with its one MTP module.
    "deepseek-v3-671b": {},
}
