"""Exact resume: the training iterable remembers the stream position of the last batch actually *consumed*.

Two things run ahead of the training step: DataLoader workers (``prefetch_factor`` batches each) and Lightning,
which fetches one batch early from a loader without ``__len__``. So the position is not read from the stream but
carried by each batch, and it becomes the saved state only when the consumer commits that batch (the datamodule
does so in ``on_before_batch_transfer``, called once per batch the training loop uses).
"""

import atexit
import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from datamodules.packing import StreamPosition
from datamodules.stream import PackedStream

log = logging.getLogger(__name__)

# Batches handed out but not yet consumed: Lightning's one plus slack; more means nobody commits.
_MAX_PENDING = 64


def _ignore_stop_signals(worker_id: int) -> None:
    """Leave SIGTERM/SIGUSR1 to the main process, which saves the current step and then ends its workers.

    Schedulers signal every process of a job, and a worker killed by one makes torch raise in the main process.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_left_at_exit() -> None:
    """SIGKILL the DataLoader workers still alive when the main process exits.

    multiprocessing's exit handler ends daemonic children with SIGTERM, which these workers ignore, and then joins
    them: a loader left unfinished by an exception (a too-small dataset, a bad batch) would hang the exit forever.
    Registered after multiprocessing's own handler, so it runs before it.
    """
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as worker failures
    for child in children:
        child.kill()


_exit_hook_registered = False


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_kill_workers_left_at_exit)
        _exit_hook_registered = True


@dataclass
class StreamState:
    """Where the training stream of one rank stands after its last consumed batch.

    Attributes:
        batches: batches consumed so far.
        next_stream: the logical stream (worker) the next batch comes from.
        positions: for each logical stream, where it continues.
    """

    positions: list[StreamPosition]
    batches: int = 0
    next_stream: int = 0

    @classmethod
    def fresh(cls, num_streams: int) -> "StreamState":
        """The state of a stream that has not started."""
        return cls([StreamPosition() for _ in range(num_streams)])

    def advance(self, stream: int, position: StreamPosition) -> None:
        """Record one consumed batch from ``stream``."""
        self.positions[stream] = StreamPosition(*position)
        self.next_stream = (stream + 1) % len(self.positions)
        self.batches += 1

    def to_dict(self) -> dict:
        """Plain ints and lists, loadable with ``torch.load(weights_only=True)``."""
        return {
            "batches": self.batches,
            "next_stream": self.next_stream,
            "positions": [list(p) for p in self.positions],
        }

    @classmethod
    def from_dict(cls, state: dict) -> "StreamState":
        """Inverse of ``to_dict``."""
        positions = [StreamPosition(*p) for p in state["positions"]]
        return cls(positions, batches=int(state["batches"]), next_stream=int(state["next_stream"]))

    def to_tensor(self) -> torch.Tensor:
        """Flat ``int64`` encoding, shape ``(2 + 4 * num_streams,)``, for gathering across ranks."""
        flat = [self.batches, self.next_stream, *(v for p in self.positions for v in p)]
        return torch.tensor(flat, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, flat: torch.Tensor) -> "StreamState":
        """Inverse of ``to_tensor``."""
        values = [int(v) for v in flat.tolist()]
        n = len(StreamPosition._fields)
        positions = [StreamPosition(*values[i : i + n]) for i in range(2, len(values), n)]
        return cls(positions, batches=values[0], next_stream=values[1])


@dataclass
class ResumableLoader:
    """The training iterable: batches of ``(B, S+1)`` tokens from per-worker streams, resumable exactly.

    Every ``iter()`` starts a fresh DataLoader at the committed ``state``, so iterating again (or in a new process
    after ``StreamState.from_dict``) continues right after the last consumed batch.

    Attributes:
        make_stream: builds the dataset for a start state (``starts`` and ``first_stream`` taken from it).
        num_workers: DataLoader worker processes; ``max(1, num_workers)`` logical streams.
        state: the committed state, changed in place by ``commit``.
        auto_commit: count a batch as consumed as soon as it is handed out (for plain loops without a trainer).
        pin_memory: pin batches for faster host-to-GPU copies.
        prefetch_factor: batches each worker prepares ahead.
    """

    make_stream: Callable[[StreamState], PackedStream]
    num_workers: int
    state: StreamState
    auto_commit: bool = True
    pin_memory: bool = False
    prefetch_factor: int = 4
    _pending: deque = field(default_factory=deque, init=False, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._pending.clear()
        workers = {"num_workers": self.num_workers}
        if self.num_workers > 0:
            _register_exit_hook()
            workers.update(prefetch_factor=self.prefetch_factor, worker_init_fn=_ignore_stop_signals)
        loader = DataLoader(self.make_stream(self.state), batch_size=None, pin_memory=self.pin_memory, **workers)
        for tokens, stream, position in loader:
            self._pending.append((tokens, stream, position))
            if self.auto_commit:
                self.commit(tokens)
            elif len(self._pending) > _MAX_PENDING:
                if not self._warned:
                    log.warning(
                        "Training batches are not being committed (is on_before_batch_transfer bypassed, e.g. by a "
                        "training_step taking dataloader_iter?); the saved data position will lag and not be exact."
                    )
                    self._warned = True
                self.commit()
            yield tokens

    def commit(self, batch: torch.Tensor | None = None) -> None:
        """Mark ``batch`` (and any handed out before it) as consumed; without ``batch``, the oldest pending one."""
        count = 1
        for i, (tokens, _, _) in enumerate(self._pending):
            if tokens is batch:
                count = i + 1
                break
        for _ in range(min(count, len(self._pending))):
            _, stream, position = self._pending.popleft()
            self.state.advance(stream, position)
