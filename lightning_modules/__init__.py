"""Lightning wiring: the DeepSeek-V3 LitModule, schedules, batch-size warm-up, precision, checkpoints, the CLI."""

from lightning_modules.batch_warmup import BatchSizeWarmup
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.module import DeepSeekV3LitModule
from lightning_modules.precision import MasterWeightPrecision
from lightning_modules.schedule import WarmupStableCosineLR

__all__ = [
    "AtomicCheckpointIO",
    "BatchSizeWarmup",
    "DeepSeekV3LitModule",
    "MasterWeightPrecision",
    "WarmupStableCosineLR",
]
