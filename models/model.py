"""DeepSeek-V3: embedding -> [RMSNorm -> MLA -> RMSNorm -> MLP | MoE] x L -> RMSNorm -> head, plus MTP modules.

Shapes: B batch, S sequence, D model dim, V vocabulary, k MTP depth (1..num_nextn_predict_layers).
Pure PyTorch: parallelism is applied from outside (``models/parallel``), never read here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import MLA, RMSNorm
from models.config import DeepSeekV3Config
from models.kv_cache import ExpandedLayerCache, LatentLayerCache, MLACache
from models.loss import linear_cross_entropy
from models.moe import MLP, MoE
from models.rope import rope_freqs_cis


@dataclass
class DeepSeekV3Output:
    """What a forward returns.

    Attributes:
        logits: (B, S, V) next-token logits (None when the caller asked for the loss only).
        loss: total training loss = ce_loss + mtp_loss_weight * mtp_loss + balance_loss (when labels given).
        ce_loss: next-token cross-entropy.
        mtp_loss: mean cross-entropy of the MTP depths (None without MTP).
        balance_loss: sum over MoE layers of the sequence-wise balance loss (None when off or in eval).
        mtp_logits: per depth k, (B, S-k, V) logits for token t+k+1 (when logits are returned).
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


class Block(nn.Module):
    """Pre-norm transformer block: h + MLA(norm(h)), then + FFN(norm(.)); FFN is a dense MLP or DeepSeekMoE."""

    def __init__(self, layer_id: int, config: DeepSeekV3Config) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLA(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = MoE(config) if config.is_moe_layer(layer_id) else MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentLayerCache | ExpandedLayerCache | None = None,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) -> (B, S, D), and this block's balance loss (None for dense blocks or when off).

        ``cache``/``start_pos`` are for inference (``DeepSeekV3.decode``); training passes neither.
        """
        h = h + self.attn(self.attn_norm(h), cos, sin, cache, start_pos)
        if isinstance(self.ffn, MoE):
            out, aux = self.ffn(self.ffn_norm(h))
            return h + out, aux
        return h + self.ffn(self.ffn_norm(h)), None


class MTPModule(nn.Module):
    """One multi-token-prediction depth, eq. (21)-(22) of the report; shares embedding and head with the model.

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i^{k-1})]), then one Block, then its own final RMSNorm
    before the shared head. The concatenation puts the embedding first, as DeepSeek's released MTP
    weights expect.
    """

    def __init__(self, layer_id: int, config: DeepSeekV3Config) -> None:
        super().__init__()
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(layer_id, config)
        self.norm = RMSNorm(d, config.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (B, S', D) previous depth's states, emb (B, S', D) embeddings of the tokens k ahead -> (B, S', D)."""
        h = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return self.block(h, cos, sin)


class DeepSeekV3(nn.Module):
    """The DeepSeek-V3 language model.

    Build on the meta device for large configs, then ``to_empty`` + ``init_weights()`` (or let FSDP
    materialise shards): ``__init__`` allocates nothing that ``init_weights`` does not overwrite.
    """

    def __init__(self, config: DeepSeekV3Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(i, config) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(
            MTPModule(config.num_hidden_layers + k, config) for k in range(config.num_nextn_predict_layers)
        )
        # complex64, so that casting the model to bf16 leaves the RoPE tables in full precision.
        self.register_buffer("freqs_cis", rope_freqs_cis(config), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Normal(0, init_std) weights (the report's 0.006), unit norms, zero expert biases and counts, RoPE table.

        Args:
            buffer_device: Where to build the RoPE table (default: where it is now).
        """
        if self.config.tie_word_embeddings:  # to_empty() (meta init) gives each module a new Parameter: re-tie
            self.head.weight = self.embed.weight
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, MoE):
                module.reset_parameters(std)
        self.freqs_cis = rope_freqs_cis(self.config, buffer_device or self.freqs_cis.device)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(bf16) would cast the complex RoPE table to a real one (dropping sin): rebuild it in complex64.
        super()._apply(fn, recurse)
        if not self.freqs_cis.is_complex():
            self.freqs_cis = rope_freqs_cis(self.config, self.freqs_cis.device)
        return self

    def moe_layers(self) -> list[MoE]:
        """Every MoE module, main blocks first, then MTP blocks."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def _rope(self, seqlen: int, start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if start_pos + seqlen > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {start_pos + seqlen} positions exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; raise it in the model config"
            )
        freqs = self.freqs_cis[start_pos : start_pos + seqlen]
        return freqs.real, freqs.imag

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        mtp_loss_weight: float | None = None,
    ) -> DeepSeekV3Output:
        """Run the model.

        Args:
            input_ids: (B, S) token ids.
            labels: (B, S) next-token targets (input_ids shifted by one); -100 is ignored. With labels the
                output carries the losses, and the MTP depths are run.
            return_logits: Return the (B, S, V) logits; set False to save memory when only the loss is needed.
            mtp_loss_weight: Weight of the MTP loss in ``loss`` (None: ``config.mtp_loss_weight``); the training
                loop passes its schedule's value (the report: 0.3, then 0.1).

        Returns:
            DeepSeekV3Output.
        """
        cos, sin = self._rope(input_ids.shape[1])
        h, aux_losses = run_blocks(self.layers, self.embed(input_ids), cos, sin)
        return self.head_and_losses(h, input_ids, labels, cos, sin, aux_losses, return_logits, mtp_loss_weight)

    def head_and_losses(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        aux_losses: list[torch.Tensor],
        return_logits: bool = True,
        mtp_loss_weight: float | None = None,
    ) -> DeepSeekV3Output:
        """The part of ``forward`` after the main blocks: final norm, head, CE, the MTP depths and the total loss.

        Args:
            h: (B, S, D) output of the last main block.
            input_ids, labels, return_logits, mtp_loss_weight: As in ``forward``.
            cos, sin: RoPE tables of the S positions.
            aux_losses: Balance losses of the main blocks (summed into ``balance_loss``; the MTP blocks' are added).

        Returns:
            DeepSeekV3Output.
        """
        out = DeepSeekV3Output()
        if labels is not None and not return_logits:
            # Training path: head + CE fused and chunked, the (B, S, V) logits never materialised.
            out.ce_loss = linear_cross_entropy(self.norm(h), self.head.weight, labels)
        else:
            out.logits = self.head(self.norm(h))  # (B, S, V)
        if labels is None:
            return out
        if out.ce_loss is None:
            out.ce_loss = _cross_entropy(out.logits, labels)
        out.loss = out.ce_loss
        if len(self.mtp) > 0:
            mtp_losses = self._mtp_forward(h, input_ids, labels, cos, sin, aux_losses, out, return_logits)
            out.mtp_loss = torch.stack(mtp_losses).mean()
            weight = self.config.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
            out.loss = out.loss + weight * out.mtp_loss
        if aux_losses:
            out.balance_loss = torch.stack(aux_losses).sum()
            out.loss = out.loss + out.balance_loss
        return out

    def decode(self, input_ids: torch.Tensor, cache: MLACache, last_only: bool = False) -> torch.Tensor:
        """Cached forward for inference: the tokens continue the cached sequence at position ``cache.seq_len``.

        Their cache entries are written and ``cache.seq_len`` advances by S. Prefill with the whole prompt,
        then feed one token at a time. The MTP modules are not run. Call it in eval mode (training mode would
        count the routed tokens in ``tokens_per_expert``) and under ``torch.inference_mode()``.

        Args:
            input_ids: (B, S) token ids, B = cache.batch_size.
            cache: An ``MLACache`` built for this model's config.
            last_only: Return the logits of the last position only, (B, 1, V).

        Returns:
            (B, S, V) logits (float in the model's dtype).
        """
        bsz, seqlen = input_ids.shape
        start_pos = cache.seq_len
        if bsz != cache.batch_size or len(cache.layers) != len(self.layers):
            raise ValueError(
                f"cache built for batch {cache.batch_size} and {len(cache.layers)} layers, got batch {bsz} and a "
                f"{len(self.layers)}-layer model; build MLACache(model.config, batch_size={bsz}, ...)"
            )
        if start_pos + seqlen > cache.max_len:
            raise ValueError(
                f"cache max_len={cache.max_len} is too short for {start_pos} cached + {seqlen} new tokens; enlarge it"
            )
        cos, sin = self._rope(seqlen, start_pos)
        h = self.embed(input_ids)  # (B, S, D)
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            h, _ = layer(h, cos, sin, layer_cache, start_pos)
        cache.seq_len = start_pos + seqlen
        if last_only:
            h = h[:, -1:]
        return self.head(self.norm(h))  # (B, S, V)

    def _mtp_forward(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        aux_losses: list[torch.Tensor],
        out: DeepSeekV3Output,
        return_logits: bool,
    ) -> list[torch.Tensor]:
        """Depth k predicts labels[:, k:] (token t+k+1) from depth k-1's states and the embedding of t+k."""
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            seqlen = input_ids.shape[1] - k
            if seqlen <= 0:
                raise ValueError(f"sequence length {input_ids.shape[1]} too short for MTP depth {k}")
            h, aux = module(h[:, :seqlen], self.embed(input_ids[:, k:]), cos[:seqlen], sin[:seqlen])
            if aux is not None:
                aux_losses.append(aux)
            if not return_logits:
                losses.append(linear_cross_entropy(module.norm(h), self.head.weight, labels[:, k:]))
                continue
            logits = self.head(module.norm(h))  # (B, S-k, V)
            losses.append(_cross_entropy(logits, labels[:, k:]))
            out.mtp_logits.append(logits)
        return losses


def run_blocks(
    blocks: Iterable[nn.Module], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run main blocks in order on (B, S, D) states: the output states and the blocks' balance losses."""
    aux_losses = []
    for block in blocks:
        h, aux = block(h, cos, sin)
        if aux is not None:
            aux_losses.append(aux)
    return h, aux_losses


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
