"""The LitModule's steps under pipeline parallelism (``trainer.strategy.init_args.pp > 1``).

Lightning's automatic optimisation stays in charge of the optimizer, the LR scheduler, gradient clipping, the
callbacks and checkpoints; only the forward and backward change hands: ``training_step`` runs the pipeline schedule
(every micro-batch's forward and backward, gradients accumulated in ``.grad`` and averaged over the stages'
data-parallel ranks) and returns the step's loss for logging, so the module's ``backward`` and
``optimizer_zero_grad`` hooks do nothing (``train_step`` clears the gradients before the schedule fills them).
Validation runs the stages forward-only (``PipelineRunner.evaluate``). See docs/pipeline.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from models.model import DeepSeekV3
from models.parallel.mesh import ParallelDims, submesh
from models.parallel.pipeline import (
    PipelineConfig,
    PipelineLosses,
    PipelineRunner,
    build_pipeline,
    prune_to_stages,
    stage_layer_ranges,
    stages_of_rank,
    validate,
)


class PipelinedSteps:
    """This pp rank's stages and the schedules that drive them, one per batch shape (training, validation).

    Args:
        pipeline: The layout (``model.pipeline``).
        mesh: The strategy's full ``(pp, dp_replicate, efsdp, ep)`` mesh.
        activation_checkpointing: The module's AC mode: the weight-gradient pass is deferred only without AC.
    """

    def __init__(self, pipeline: PipelineConfig, mesh: DeviceMesh, activation_checkpointing: str) -> None:
        self.pipeline, self.mesh = pipeline, mesh
        self.pp_mesh = submesh(mesh, "pp")
        self.deferred_weight_grads = activation_checkpointing == "none"
        self.model: DeepSeekV3 | None = None
        self._runners: dict[tuple[int, int], PipelineRunner] = {}

    @property
    def group(self) -> dist.ProcessGroup:
        """The pipeline process group (the gradient norm sums over it)."""
        return self.pp_mesh.get_group()

    @property
    def ep_backward_group(self) -> bool:
        """Whether ``parallelize`` must give EP's backward exchanges their own group (DualPipeV's overlap with EP)."""
        overlapped = self.pipeline.schedule == "DualPipeV" and self.pipeline.overlap
        return overlapped and ParallelDims.from_mesh(self.mesh).ep > 1

    def prune(self, model: DeepSeekV3) -> DeepSeekV3:
        """Keep this rank's stages of the meta model (before any other transform)."""
        pp, rank = self.pp_mesh.size(), self.pp_mesh.get_local_rank()
        validate(model.config, self.pipeline, pp)
        ranges = stage_layer_ranges(model.config, self.pipeline, pp)
        self.model = prune_to_stages(model, ranges, stages_of_rank(self.pipeline, pp, rank))
        return self.model

    def _runner(self, batch: torch.Tensor) -> PipelineRunner:
        bsz, seq = batch.shape[0], batch.shape[1] - 1
        if (bsz, seq) not in self._runners:
            pp = self.pp_mesh.size()
            validate(self.model.config, self.pipeline, pp, batch_size=bsz)
            dtype = next(p.dtype for n, p in self.model.named_parameters() if ".gate." not in n)  # the compute dtype
            self._runners[bsz, seq] = build_pipeline(
                self.model,
                self.pipeline,
                self.group,
                bsz // self.pipeline.microbatches(pp),
                seq,
                batch.device,
                dtype=dtype,
                deferred_weight_grads=self.deferred_weight_grads,
                mesh=self.mesh,
            )
        return self._runners[bsz, seq]

    def train_step(self, batch: torch.Tensor, mtp_loss_weight: float | None = None) -> PipelineLosses:
        """Forward and backward of this dp rank's (B, S+1) batch; the global batch's mean losses on every rank."""
        for p in self.model.parameters():
            p.grad = None
        return self._runner(batch).step(batch, mtp_loss_weight=mtp_loss_weight)

    @torch.no_grad()
    def eval_step(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE of the batch over the dp ranks (the same on every rank)."""
        return self._runner(batch).evaluate(batch).ce_loss


def check_pipeline(
    config,  # noqa: ANN001
    pipeline: PipelineConfig | None,
    pp: int,
    batch_size: int | None = None,
    param_dtype: torch.dtype = torch.float32,
) -> None:
    """The layout fits the model, the batch and the precision, else a one-line ``ValueError`` (the CLI calls it
    before any process starts, ``configure_model`` again)."""
    if pp <= 1:
        return
    if param_dtype != torch.float32:
        # The stages are not FSDP2-sharded: their parameters would be cast to bf16 with no fp32 master weights
        # (MasterWeightAdamW's accumulation and zeroing are not wired to the schedule's micro-batches).
        raise ValueError(
            f"trainer.precision gives {param_dtype} parameters, which pipeline parallelism (pp={pp}) does not support "
            "yet (no fp32 master weights for the stages); use trainer.precision: 32-true"
        )
    validate(config, pipeline or PipelineConfig(), pp, batch_size=batch_size)
