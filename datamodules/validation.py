"""The held-out validation set: a fixed list of batches, the same in every run and for every worker count.

Validation documents are read in dataset order (no shuffle, no FIM), packed like training data, and the first
``val_batches`` batches are kept (rounded up to a multiple of the number of ranks, so every rank runs the same number
of steps, which sharded models need). Rank ``r`` takes global batches ``r, r + R, ...``; with ``R`` dividing
``val_batches`` the union over ranks is the same set whatever ``R`` is, so ``val/loss`` is comparable across runs.
"""

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch

from datamodules.encoding import DocumentEncoder
from datamodules.packing import Packer, StreamPosition

log = logging.getLogger(__name__)


def validation_batches(
    documents: Iterable[str],
    encoder: DocumentEncoder,
    *,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[torch.Tensor]:
    """This rank's validation batches, each an ``int64`` tensor of shape ``(B, S+1)``.

    Args:
        documents: the held-out documents, in a fixed order.
        encoder: the tokenizer wrapper (without FIM).
        batch_size: windows per batch (B).
        seq_len: S; windows have S + 1 tokens.
        num_batches: batches wanted over all ranks (rounded up to a multiple of ``world_size``).
        rank: this data-parallel rank.
        world_size: the number of data-parallel ranks.

    Raises:
        ValueError: the held-out data cannot fill one batch per rank.
    """
    if num_batches <= 0:
        return []
    total = math.ceil(num_batches / world_size) * world_size
    packer = Packer(seq_len + 1)
    need = batch_size * packer.window
    batches: list[np.ndarray] = []
    tokens = 0
    for text in documents:
        if not text or text.isspace():
            continue
        (ids,) = encoder.encode([text])
        packer.add(StreamPosition(), ids)
        tokens += len(ids)
        while len(packer) >= need and len(batches) < total:
            batches.append(np.stack([packer.take() for _ in range(batch_size)]))  # (B, S+1)
        if len(batches) == total:
            break
    usable = len(batches) // world_size * world_size
    if usable == 0:
        raise ValueError(
            f"The validation data is too small for one batch per rank: it holds {tokens} tokens, but "
            f"world_size={world_size} batches of batch_size={batch_size} x (seq_len={seq_len} + 1) need "
            f"{world_size * need}. Hold out more data (val_fraction, val_split) or lower batch_size/seq_len."
        )
    if usable < total:
        log.warning(
            "The validation data fills %d batches of the %d asked for (val_batches); using %d.", usable, total, usable
        )
    return [torch.from_numpy(b) for b in batches[rank:usable:world_size]]


class FixedBatches:
    """A sized iterable over precomputed batches (not a DataLoader, so Lightning adds no sampler of its own)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)
