"""``OptimizerStepTracker``: did an optimizer step happen since the last ``on_train_batch_end``?"""

from __future__ import annotations

from lightning.pytorch import Trainer


class OptimizerStepTracker:
    """Tells, in ``on_train_batch_end``, whether an optimizer step happened since the previous call.

    Lightning calls ``on_train_batch_end`` after every micro-batch; ``trainer.global_step`` only advances when
    the optimizer stepped, i.e. once per gradient-accumulation cycle.
    """

    def __init__(self) -> None:
        self.last_step: int | None = None

    def reset(self, trainer: Trainer) -> None:
        self.last_step = trainer.global_step

    def stepped(self, trainer: Trainer) -> bool:
        if self.last_step is None:
            self.last_step = trainer.global_step
            return False
        stepped = trainer.global_step != self.last_step
        self.last_step = trainer.global_step
        return stepped
