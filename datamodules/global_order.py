"""World-size-independent data order: every data-parallel rank reads the one global stream and keeps its rows.

With ``order="global"`` the datamodule builds the stream a single process would read with the global batch
``batch_size x R`` (R data-parallel ranks), and rank ``r`` keeps rows ``r*B : (r+1)*B`` of each global batch, as
Megatron's samplers slice a global sample index. The global batches, their order and the saved data position are
then the same at any R, so a run resumes exactly on another world size and its losses can be compared with a
single-process run. The cost is R x the reading and tokenisation (every rank encodes every document): for tests,
small runs and CPU jobs; large runs use the default ``order="sharded"``, where each rank reads its own documents.
"""

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

ORDERS = ("sharded", "global")


class RankRows(IterableDataset):
    """The rows ``start : start + rows`` of every batch of a training stream (other items pass through).

    Args:
        stream: an iterable dataset yielding ``(tokens, *position)`` with ``tokens`` of shape ``(R*B, S+1)``.
        start: the first row this rank keeps (``rank * B``).
        rows: rows per rank (B).
    """

    def __init__(self, stream: IterableDataset, start: int, rows: int) -> None:
        self.stream, self.start, self.rows = stream, start, rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for tokens, *position in self.stream:
            yield (rank_rows(tokens, self.start, self.rows), *position)


def rank_rows(batch: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """``batch[start : start + rows]`` as its own tensor (not a view keeping the global batch alive)."""
    return batch[start : start + rows].clone()
