"""Pipeline parallelism for DeepSeekV3: stages cut by layer ranges, torch.distributed.pipelining's schedules, and
DualPipe's overlapped forward/backward chunk (section 3.2.1 of the DeepSeek-V3 report).

A rank keeps ONE ``DeepSeekV3``, pruned to the modules of its stages (``prune_to_stages``): ``model.layers`` becomes
a ``ModuleDict`` keyed by the original layer index, so parameter names and state-dict keys are those of the full
model and a checkpoint is the union of the ranks' state dicts. Each stage is a ``Stage`` view that registers the
modules it runs (for ``PipelineStage``'s backward and weight passes) without copying them.

The V placement of DualPipeV / ZBV puts stage 0 (embedding) and stage N-1 (final norm, head, MTP) on rank 0, so the
MTP module uses the embedding and head it shares with the main model in place (the embedding is registered with
stage 0 only; the last stage then runs its backward unsplit). Loop placements (1F1B,
Interleaved1F1B, GPipe) would need a replicated embedding with its own gradient all-reduce: they are refused for
models with MTP or tied embeddings.

Losses. The last stage computes CE + MTP (+ the MTP blocks' balance loss) through ``DeepSeekV3.head_and_losses``,
divided by the number of micro-batches (the schedules run with ``scale_grads=False``: the embedding is shared by
two stages on rank 0, whose grads the schedule would otherwise scale twice). Every other stage's balance loss is
attached to its output activation by ``_AttachAuxLoss`` (Megatron's ``MoEAuxLossAutoScaler``), so its gradient
flows in that stage's own backward; the logged values are summed over the pipeline group.

Overlap. ``OVERLAP_F_B`` actions (DualPipeV's steady state: the forward of one micro-batch on one stage paired with
the backward of another on the other stage) run the backward in a second thread while this thread runs the forward
(``overlap_f_b``): ATen ops and gloo/NCCL waits release the GIL, so one chunk's communication proceeds while the
other computes, on CPU as on GPU (where the backward gets its own CUDA stream). There is no barrier between the two
threads, so activation checkpointing's recomputation (which replays forward code inside the backward) cannot
desynchronise them: every AC mode composes. The weight-gradient halves (``W``) are deferred wherever the schedule
emits ``I``/``W`` actions (DualPipeV's warm-up and cool-down, ZBV everywhere).

Data and expert parallelism (``StageDataParallel``). The stages' data-parallel ranks hold them whole, the experts
sharded over ``ep`` (``parallelize`` applies EP and no FSDP2 under ``pp > 1``): the report's PP x EP x DP layout.
Each dp rank runs the schedule on its own rows of the global batch; the EP all-to-alls inside the chunks are the
only collectives there (on two groups, one per direction, so the overlap's two threads never race on one), and the
gradients are averaged over the dp ranks once per step, after the schedule.

Shapes: B micro-batch, S sequence, D model dim.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import OVERLAP_F_B, _wait_batch_p2p
from torch.distributed.tensor import DTensor

from models.config import DeepSeekV3Config
from models.model import DeepSeekV3, run_blocks
from models.parallel.mesh import ParallelDims, submesh

SCHEDULES = {
    "DualPipeV": ScheduleDualPipeV,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "1F1B": Schedule1F1B,
    "GPipe": ScheduleGPipe,
}
V_SCHEDULES = ("DualPipeV", "ZBVZeroBubble")  # first and last stage on rank 0
SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")  # one stage per rank


@dataclass
class PipelineConfig:
    """How the model is pipelined over the ``pp`` mesh dimension.

    Attributes:
        schedule: One of ``SCHEDULES``: ``DualPipeV`` (the report's, with the F&B overlap), ``ZBVZeroBubble``,
            ``Interleaved1F1B``, ``1F1B``, ``GPipe``.
        n_microbatches: Micro-batches per step (the rank's batch is split along dim 0); None = number of stages.
        stages_per_rank: None = 2 for the V and interleaved schedules, 1 for 1F1B/GPipe.
        layers_per_stage: Main layers of each stage, in stage order (sum = num_hidden_layers; 0 allowed);
            None = an even split, which must then divide num_hidden_layers.
        overlap: Run DualPipeV's paired forward/backward chunks concurrently (``overlap_f_b``); False runs them
            one after the other (the reference order).
    """

    schedule: str = "DualPipeV"
    n_microbatches: int | None = None
    stages_per_rank: int | None = None
    layers_per_stage: list[int] | None = None
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"pipeline.schedule={self.schedule!r} is unknown; choose one of {sorted(SCHEDULES)}")
        if self.stages_per_rank is None:
            self.stages_per_rank = 1 if self.schedule in SINGLE_STAGE_SCHEDULES else 2
        if self.schedule in V_SCHEDULES and self.stages_per_rank != 2:
            raise ValueError(
                f"pipeline.stages_per_rank={self.stages_per_rank}: {self.schedule} needs exactly 2 stages per rank "
                "(the V); set pipeline.stages_per_rank: 2"
            )
        if self.schedule in SINGLE_STAGE_SCHEDULES and self.stages_per_rank != 1:
            raise ValueError(
                f"pipeline.stages_per_rank={self.stages_per_rank}: {self.schedule} runs one stage per rank; set it to "
                "1 or use Interleaved1F1B"
            )
        if self.stages_per_rank < 1:
            raise ValueError(f"pipeline.stages_per_rank={self.stages_per_rank} must be >= 1")

    def num_stages(self, pp: int) -> int:
        return pp * self.stages_per_rank

    def microbatches(self, pp: int) -> int:
        return self.n_microbatches if self.n_microbatches is not None else self.num_stages(pp)


def stage_layer_ranges(config: DeepSeekV3Config, pipeline: PipelineConfig, pp: int) -> list[range]:
    """The main layers of each stage, in stage order (one-line ``ValueError`` naming the field when they don't fit)."""
    n_stages, n_layers = pipeline.num_stages(pp), config.num_hidden_layers
    sizes = pipeline.layers_per_stage
    if sizes is None:
        if n_layers % n_stages:
            raise ValueError(
                f"model num_hidden_layers={n_layers} is not divisible by the {n_stages} pipeline stages (pp={pp} x "
                f"pipeline.stages_per_rank={pipeline.stages_per_rank}); change pp or set pipeline.layers_per_stage "
                f"to {n_stages} counts summing to {n_layers}"
            )
        sizes = [n_layers // n_stages] * n_stages
    elif len(sizes) != n_stages or sum(sizes) != n_layers or min(sizes) < 0:
        raise ValueError(
            f"pipeline.layers_per_stage={sizes} must hold {n_stages} non-negative counts (pp={pp} x stages_per_rank="
            f"{pipeline.stages_per_rank}) summing to num_hidden_layers={n_layers}"
        )
    starts = [sum(sizes[:i]) for i in range(n_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def stages_of_rank(pipeline: PipelineConfig, pp: int, rank: int) -> list[int]:
    """Stage indices held by pipeline rank ``rank``: V (r, 2pp-1-r), loop (r, r+pp, ...), or just r."""
    if pipeline.schedule in V_SCHEDULES:
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(pipeline.stages_per_rank)]


def validate(config: DeepSeekV3Config, pipeline: PipelineConfig, pp: int, batch_size: int | None = None) -> None:
    """Check a pipeline layout before anything is built; ``ValueError`` naming the field and the fix."""
    stage_layer_ranges(config, pipeline, pp)
    n_stages, n_mb = pipeline.num_stages(pp), pipeline.microbatches(pp)
    if n_mb < 1:
        raise ValueError(f"pipeline.n_microbatches={n_mb} must be >= 1")
    if pipeline.schedule in ("DualPipeV", "ZBVZeroBubble", "1F1B") and n_mb < n_stages:
        raise ValueError(
            f"pipeline.n_microbatches={n_mb} is too few for {pipeline.schedule} over {n_stages} stages: it needs at "
            f"least as many micro-batches as stages (>= {n_stages})"
        )
    if pipeline.schedule == "Interleaved1F1B" and n_mb % max(1, n_mb // pp):
        raise ValueError(f"pipeline.n_microbatches={n_mb}: Interleaved1F1B needs a multiple of pp={pp}")
    if batch_size is not None and batch_size % n_mb:
        raise ValueError(
            f"data.batch_size={batch_size} (per data-parallel rank) is not divisible by pipeline.n_microbatches="
            f"{n_mb}; the batch is split into equal micro-batches"
        )
    shares_embedding = config.num_nextn_predict_layers > 0 or config.tie_word_embeddings
    if pp > 1 and shares_embedding and pipeline.schedule not in V_SCHEDULES:
        raise ValueError(
            f"pipeline.schedule={pipeline.schedule} puts the first and last stages on different ranks, but the MTP "
            "module / tied head shares the embedding; use DualPipeV or ZBVZeroBubble (V placement), or set "
            "model num_nextn_predict_layers: 0 and tie_word_embeddings: false"
        )


def prune_to_stages(model: DeepSeekV3, layer_ranges: list[range], stage_ids: list[int]) -> DeepSeekV3:
    """Keep only the modules of ``stage_ids`` in ``model`` (in place, on meta before allocation), names unchanged.

    ``model.layers`` becomes a ``ModuleDict`` keyed by the original layer index; the embedding stays where stage 0
    is or where the last stage needs it (MTP, tied head); final norm, head and MTP stay with the last stage.
    """
    n_stages = len(layer_ranges)
    keep = [i for s in stage_ids for i in layer_ranges[s]]
    model.layers = nn.ModuleDict({str(i): model.layers[i] for i in sorted(keep)})
    has_first, has_last = 0 in stage_ids, n_stages - 1 in stage_ids
    needs_embed = has_first or (has_last and (len(model.mtp) > 0 or model.config.tie_word_embeddings))
    if not needs_embed:
        model.embed = None
    if not has_last:
        model.norm = model.head = None
        model.mtp = nn.ModuleList()
    return model


def make_stages(model: DeepSeekV3, pipeline: PipelineConfig, pp: int, rank: int) -> list[Stage]:
    """The ``Stage`` views of pp rank ``rank`` on its pruned model, in ``stages_of_rank`` order."""
    ranges = stage_layer_ranges(model.config, pipeline, pp)
    return [Stage(model, ranges[s], s == 0, s == len(ranges) - 1) for s in stages_of_rank(pipeline, pp, rank)]


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``h`` whose backward also sends ``scale`` into ``aux``: the stage's balance loss joins the step's
    loss without being an output of the stage (Megatron's ``MoEAuxLossAutoScaler``)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        ctx.scale = scale
        # A copy, not a view: the pipeline runtime detaches stage outputs in place after their backward.
        return h.clone()

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # noqa: ANN001
        shape, dtype, device = ctx.aux_meta
        return grad_h, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class Stage(nn.Module):
    """One pipeline stage: a view on the modules of a pruned ``DeepSeekV3`` (registered here, owned there).

    Forward: the first stage takes the (B, S+1) token batch and embeds ``tokens[:, :-1]``; every other stage takes
    the (B, S, D) states of the previous one. Each returns its (B, S, D) states, with its blocks' balance loss
    attached. ``loss`` (the schedule's loss function, on the last stage) runs norm, head, CE and MTP.
    """

    def __init__(self, model: DeepSeekV3, layer_ids: range, is_first: bool, is_last: bool):
        super().__init__()
        self.owner = (model,)  # a tuple: not registered, so the model's modules are not children twice
        self.is_first, self.is_last = is_first, is_last
        self.scale = 1.0  # 1 / micro-batches, set by build_pipeline
        self.mtp_loss_weight: float | None = None  # None: the config's; set per step by PipelineRunner.step
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        if is_first:
            # Registered with stage 0 only, even where the last stage (MTP) uses it too: one owner per parameter
            # (FSDP2 allows one root per module) and one weight-gradient pass; see build_pipeline.
            self.embed = model.embed
        if is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        # Detached per-micro-batch values for logging, read and cleared by PipelineRunner.step.
        self.balance_losses: list[torch.Tensor] = []
        self.head_losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x[:, :-1]) if self.is_first else x  # (B, S, D)
        cos, sin = self.owner[0]._rope(h.shape[1])
        h, aux_losses = run_blocks(self.layers.values(), h, cos, sin)
        if aux_losses:
            aux = torch.stack(aux_losses).sum()
            self.balance_losses.append(aux.detach())
            h = _AttachAuxLoss.apply(h, aux, self.scale)
        return h

    def loss(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """CE + MTP weight x MTP + the MTP blocks' balance loss of one micro-batch, divided by the micro-batches."""
        model = self.owner[0]
        cos, sin = model._rope(h.shape[1])
        out = model.head_and_losses(
            h, tokens[:, :-1], tokens[:, 1:], cos, sin, [], return_logits=False, mtp_loss_weight=self.mtp_loss_weight
        )
        zero = torch.zeros((), device=h.device)
        mtp = out.mtp_loss if out.mtp_loss is not None else zero
        balance = out.balance_loss if out.balance_loss is not None else zero
        self.head_losses.append(torch.stack([out.ce_loss, mtp, balance]).detach().float())
        return out.loss * self.scale


class StageDataParallel:
    """Data parallelism of pipeline stages: average gradients and logged losses over the ``dp`` ranks.

    Every dp rank holds this pp rank's stages whole, the routed experts sharded over ``ep`` (rank r of an EP group
    holds experts r*El .. (r+1)*El - 1) and replicated over ``(dp_replicate, efsdp)``. After the schedule, dense
    gradients are all-reduced over ``dp`` and the experts' over their replicas, both divided by the dp size: an
    expert's gradient already sums the tokens of its whole EP group (the all-to-all's backward brings them), each dp
    rank's loss being the mean over its own rows. One all-reduce per group, on a flat fp32 buffer, in the schedule's
    thread after both chunks of every pair are done, so it never races with the EP exchanges.

    Args:
        mesh: The ``("pp", "dp_replicate", "efsdp", "ep")`` mesh of ``ParallelDims.build_mesh``.
    """

    def __init__(self, mesh: DeviceMesh) -> None:
        dims = ParallelDims.from_mesh(mesh)
        self.size = dims.dp
        self.group = submesh(mesh, "dp").get_group()
        replicas = submesh(mesh, "dp_replicate", "efsdp")._flatten("dp_experts") if dims.dp > dims.ep else None
        self.expert_group = replicas.get_group() if replicas is not None else None

    @torch.no_grad()
    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Replace each gradient of ``params`` (this rank's) by its mean over the data-parallel ranks."""
        dense, experts = [], []
        for p in params:
            if not p.requires_grad:
                continue
            if p.grad is None:  # every dp rank must bring the same buffer; the model uses all its parameters
                p.grad = torch.zeros_like(p)
            (experts if isinstance(p.grad, DTensor) else dense).append(p.grad)
        _all_reduce_mean(dense, self.group, self.size)
        _all_reduce_mean([g.to_local() for g in experts], self.expert_group, self.size)

    def average(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, group=self.group)
        return values / self.size


def _all_reduce_mean(tensors: list[torch.Tensor], group: dist.ProcessGroup | None, size: int) -> None:
    """``t = sum over group / size`` in place, for all ``tensors`` at once (None group: this rank only)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat /= size
    for t, mean in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(mean.view_as(t))


@dataclass
class PipelineLosses:
    """One step's losses, means over the micro-batches (and the dp ranks), equal on every rank."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    balance_loss: torch.Tensor | None


@dataclass
class PipelineRunner:
    """This rank's stages and the schedule that drives them; ``step`` runs forward and backward of one batch."""

    model: DeepSeekV3
    stages: list[Stage]
    schedule: Any
    group: dist.ProcessGroup
    pipeline: PipelineConfig
    pipeline_stages: list[PipelineStage] = field(default_factory=list)
    dtype: torch.dtype = torch.float32  # of the states sent between stages
    data_parallel: StageDataParallel | None = None  # dp > 1: the stages' replicas to average with

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def step(self, tokens: torch.Tensor, mtp_loss_weight: float | None = None) -> PipelineLosses:
        """Forward and backward of a (B, S+1) batch (the rank's own: the same on every rank of its pp group).

        Gradients accumulate into ``.grad`` of this rank's parameters, scaled as the single-process mean loss of
        the global batch (all dp ranks' rows). ``mtp_loss_weight`` weighs the MTP loss in the loss and its gradient
        (None: ``config.mtp_loss_weight``), as ``DeepSeekV3.forward``'s argument does.
        """
        for stage in self.stages:
            stage.mtp_loss_weight = mtp_loss_weight
        args = (tokens,) if self.has_first else ()
        target = tokens if self.has_last else None
        self.schedule.step(*args, target=target)
        if self.data_parallel is not None:
            self.data_parallel.average_grads(list(self.model.parameters()))
        return self.reduce_losses(tokens.device, mtp_loss_weight)

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor) -> PipelineLosses:
        """Forward-only pass of a (B, S+1) batch, stage after stage (no schedule: the V schedules' ``eval`` would
        still run their backward actions). The losses, means over the micro-batches, on every pp rank."""
        pp, rank = self.group.size(), self.group.rank()
        owner = {s: r for r in range(pp) for s in stages_of_rank(self.pipeline, pp, r)}
        mine = {s: stage for s, stage in zip(stages_of_rank(self.pipeline, pp, rank), self.stages, strict=True)}
        last = len(owner) - 1
        for mb in tokens.tensor_split(self.pipeline.microbatches(pp)):
            x = mb
            for s in range(last + 1):
                if owner[s] != rank:
                    continue
                if s > 0 and owner[s - 1] != rank:  # the previous stage's states, from its rank
                    shape = (mb.shape[0], mb.shape[1] - 1, self.model.config.hidden_size)
                    x = torch.empty(shape, dtype=self.dtype, device=mb.device)
                    dist.recv(x, group=self.group, group_src=owner[s - 1])
                x = mine[s](x)
                if s == last:
                    mine[s].loss(x, mb)
                elif owner[s + 1] != rank:
                    dist.send(x.contiguous(), group=self.group, group_dst=owner[s + 1])
        return self.reduce_losses(tokens.device)

    def reduce_losses(self, device: torch.device, mtp_loss_weight: float | None = None) -> PipelineLosses:
        """The step's mean losses from the values the stages recorded (one all-reduce over the pp group)."""
        # One all-reduce for [ce, mtp, mtp balance, main balance]: every rank logs the same values.
        n_mb = self.pipeline.microbatches(self.group.size())
        totals = torch.zeros(4, device=device)
        for stage in self.stages:
            for head in stage.head_losses:
                totals[:3] += head
            for aux in stage.balance_losses:
                totals[3] += aux.float()
            stage.head_losses.clear()
            stage.balance_losses.clear()
        dist.all_reduce(totals, group=self.group)
        totals /= n_mb
        if self.data_parallel is not None:  # the global batch's means
            totals = self.data_parallel.average(totals)
        config = self.model.config
        mtp = totals[1] if config.num_nextn_predict_layers > 0 else None
        moe = any(config.is_moe_layer(i) for i in range(config.num_hidden_layers + config.num_nextn_predict_layers))
        balance = totals[2] + totals[3] if moe and config.seq_aux_alpha > 0 else None
        weight = config.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
        loss = totals[0] + (weight * mtp if mtp is not None else 0) + (balance if balance is not None else 0)
        return PipelineLosses(loss=loss, ce_loss=totals[0], mtp_loss=mtp, balance_loss=balance)


def build_pipeline(
    model: DeepSeekV3,
    pipeline: PipelineConfig,
    group: dist.ProcessGroup,
    microbatch_size: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    deferred_weight_grads: bool = True,
    stages: list[Stage] | None = None,
    mesh: DeviceMesh | None = None,
) -> PipelineRunner:
    """Stages and schedule for a model already pruned by ``prune_to_stages`` and materialised on ``device``.

    Args:
        model: This rank's pruned ``DeepSeekV3`` (parallelised, initialised).
        pipeline: The layout (validated here too).
        group: The pipeline process group (``mesh["pp"].get_group()``).
        microbatch_size: Sequences per micro-batch B.
        seq_len: S (the batch holds S+1 tokens per sequence).
        device: Where activations live.
        dtype: Dtype of the activations sent between stages (the compute dtype).
        deferred_weight_grads: Let the schedule's ``I`` actions compute input grads only and its ``W`` actions the
            weight grads later. False computes both in ``I`` (``W`` does nothing): needed under activation
            checkpointing, whose selective mode allows one backward per region and whose full mode would
            recompute each block a second time for ``W``.
        stages: This rank's ``make_stages`` views, when they were made before ``parallelize``; None makes them here.
        mesh: The full mesh (``ParallelDims.build_mesh``) when the stages also have data-parallel ranks (dp > 1,
            EP included): gradients and losses are then averaged over them (``StageDataParallel``).

    Returns:
        PipelineRunner.
    """
    pp, rank = group.size(), group.rank()
    validate(model.config, pipeline, pp)
    if pipeline.schedule == "DualPipeV" and pipeline.overlap and _ep_without_backward_group(model):
        raise ValueError(
            "pipeline.overlap=true with expert parallelism needs the backward passes' EP exchanges on their own "
            "process group (the two overlapped chunks would interleave theirs on one group): call parallelize(..., "
            "ep_backward_group=True), or set pipeline.overlap: false"
        )
    ranges = stage_layer_ranges(model.config, pipeline, pp)
    n_stages, n_mb = len(ranges), pipeline.microbatches(pp)
    stages = stages if stages is not None else make_stages(model, pipeline, pp, rank)
    pipeline_stages = []
    # The last stage's MTP uses the embedding it does not register: a split I/W backward there would leave that
    # embedding gradient out of the W pass, so its I actions compute input and weight gradients together.
    shares = model.config.num_nextn_predict_layers > 0 or model.config.tie_word_embeddings
    for s, stage in zip(stages_of_rank(pipeline, pp, rank), stages, strict=True):
        stage.scale = 1.0 / n_mb
        shape = (microbatch_size, seq_len, model.config.hidden_size)
        hidden = torch.empty(shape, dtype=dtype, device="meta", requires_grad=True)
        tokens = torch.empty(microbatch_size, seq_len + 1, dtype=torch.long, device="meta")
        # Static shapes: torch's runtime shape inference would run a forward that counts routed tokens twice.
        pipeline_stages.append(
            PipelineStage(
                stage,
                s,
                n_stages,
                device,
                input_args=tokens if s == 0 else hidden,
                output_args=hidden,
                group=group,
                dw_builder=None if deferred_weight_grads and not (s == n_stages - 1 and shares) else _no_weight_pass,
            )
        )
    last = next((s for s in stages if s.is_last), None)

    def loss_fn(h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # Every rank passes one (a schedule without loss_fn runs no backward); only the last stage calls it.
        return last.loss(h, tokens)

    schedule_cls = SCHEDULES[pipeline.schedule]
    if pipeline.schedule in SINGLE_STAGE_SCHEDULES:
        schedule = schedule_cls(pipeline_stages[0], n_mb, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = schedule_cls(pipeline_stages, n_mb, loss_fn=loss_fn, scale_grads=False)
    if pipeline.schedule == "DualPipeV" and pipeline.overlap:
        schedule.register_custom_function(OVERLAP_F_B, overlap_f_b)
    data_parallel = StageDataParallel(mesh) if mesh is not None and ParallelDims.from_mesh(mesh).dp > 1 else None
    return PipelineRunner(model, stages, schedule, group, pipeline, pipeline_stages, dtype, data_parallel)


def _ep_without_backward_group(model: nn.Module) -> bool:
    wrappers = [getattr(m, "expert_parallel", None) for m in model.modules()]
    return any(ep is not None and ep.backward_group is None for ep in wrappers)


def _no_weight_pass() -> Callable[[], None]:
    # PipelineStage with a dw_builder runs the full backward in I and calls the built function for W.
    return lambda: None


# ---------------------------------------------------------------------------------------------- the F&B overlap
def _run_forward(schedule: Any, stages: dict[int, Any], action: Any, ctx: Any) -> None:
    """One F sub-action, as the schedule's runtime does it: wait for the input, forward, loss, hand over locally."""
    stage, mb = stages[action.stage_index], action.microbatch_index
    schedule._assert_unsharded(stage)
    if not stage.is_first and action.stage_index - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((action.stage_index, mb)))
    output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb])
    schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
    if action.stage_index + 1 in stages:  # the V's turn: the next stage is on this rank
        stages[action.stage_index + 1].set_local_fwd_input(output, mb)


def _run_backward(schedule: Any, stages: dict[int, Any], action: Any) -> None:
    """One full-B sub-action: wait for the output grads, backward (input and weight grads), hand over locally."""
    stage, mb = stages[action.stage_index], action.microbatch_index
    schedule._assert_unsharded(stage)
    if not stage.is_last and action.stage_index + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((action.stage_index, mb)))
    schedule.backward_counter[action.stage_index] += 1
    last = schedule.backward_counter[action.stage_index] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=schedule._maybe_get_loss(stage, mb), full_backward=True, last_backward=last)
    if action.stage_index - 1 in stages:
        stages[action.stage_index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


def overlap_f_b(action: Any, ctx: Any) -> None:
    """``OVERLAP_F_B``: the forward of one (stage, micro-batch) and the backward of another, concurrently.

    The backward runs in a worker thread (on its own CUDA stream on GPU), the forward in this one; both are the
    schedule's own per-chunk calls, so results equal the sequential order bit for bit. Collectives inside the two
    chunks (EP all-to-all) must not share a process group across the threads: see docs/pipeline.md.
    """
    schedule = ctx.schedule_ref
    stages = {stage.stage_index: stage for stage in schedule._stages}
    forward, backward = action.sub_actions
    device = schedule._stages[0].device
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))
    errors: list[BaseException] = []
    threads = torch.get_num_threads()

    def run_backward() -> None:
        torch.set_num_threads(threads)  # OpenMP's thread count is per thread: a new one would take every core
        try:
            if side is None:
                _run_backward(schedule, stages, backward)
                return
            with torch.cuda.stream(side):
                _run_backward(schedule, stages, backward)
        except BaseException as e:  # re-raised in the schedule's thread
            errors.append(e)

    worker = threading.Thread(target=run_backward, name="pp-overlap-backward")
    worker.start()
    try:
        _run_forward(schedule, stages, forward, ctx)
    finally:
        worker.join()
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    if errors:
        raise errors[0]
