"""The training stream of one data-parallel rank: documents -> tokens -> packed ``(B, S+1)`` batches, per worker.

Each DataLoader worker owns one *logical stream* (shard ``rank * W + stream`` of ``world_size * W``) and produces
whole batches from it; the DataLoader hands them out round-robin over workers. Every batch travels with the
position its stream will continue from, which is what the resumable loader records once the batch is consumed.
"""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from datasets import IterableDataset as HFIterableDataset
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.documents import DocumentSource, is_held_out, iter_positioned
from datamodules.encoding import DocumentEncoder
from datamodules.packing import Packer, StreamPosition

# Tokenize documents in groups (one Rust call each) of at most this many characters or documents.
_ENCODE_CHARS = 1 << 18
_ENCODE_DOCS = 256


@dataclass(frozen=True)
class StreamSpec:
    """What fixes the training token stream of one data-parallel rank.

    Attributes:
        source: the dataset split to read.
        batch_size: windows per batch (B).
        seq_len: tokens per window minus one (S); windows have S + 1 tokens.
        rank: this data-parallel rank.
        world_size: the number of data-parallel ranks.
        num_streams: logical streams per rank, ``max(1, num_workers)``.
        seed: the shuffle and FIM seed.
        shuffle_buffer: the document shuffle buffer (0: no shuffling).
        val_fraction: documents held out for validation by content hash, skipped here.
    """

    source: DocumentSource
    batch_size: int
    seq_len: int
    rank: int = 0
    world_size: int = 1
    num_streams: int = 1
    seed: int = 0
    shuffle_buffer: int = 0
    val_fraction: float = 0.0


class PackedStream(IterableDataset):
    """Infinite training batches of one rank; in each DataLoader worker, one logical stream.

    Yields ``(tokens, stream, position)``: ``tokens`` is an ``int64`` tensor of shape ``(B, S+1)``, ``stream`` the
    logical stream it came from and ``position`` where that stream continues after it. Passes over the data repeat
    forever (a new shuffle order each epoch), so every rank always has a next batch.

    Args:
        spec: the stream's parameters.
        dataset: the loaded training split (``spec.source.load()``).
        encoder: turns documents into token ids.
        starts: for each logical stream, where to start.
        first_stream: the logical stream of DataLoader worker 0; the DataLoader's round-robin then continues the
            interleaving of an interrupted run exactly.
    """

    def __init__(
        self,
        spec: StreamSpec,
        dataset: HFIterableDataset,
        encoder: DocumentEncoder,
        starts: list[StreamPosition],
        first_stream: int = 0,
    ) -> None:
        assert len(starts) == spec.num_streams, "one start position per logical stream"
        self.spec = spec
        self.dataset = dataset
        self.encoder = encoder
        self.starts = starts
        self.first_stream = first_stream

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, tuple[int, int, int]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        assert workers == self.spec.num_streams, "the DataLoader must have one worker per logical stream"
        stream = (worker + self.first_stream) % workers
        for tokens, position in self.batches(stream):
            yield torch.from_numpy(tokens), stream, tuple(position)

    def batches(self, stream: int) -> Iterator[tuple[np.ndarray, StreamPosition]]:
        """Batches of one logical stream, shape ``(B, S+1)``, each with the position after it."""
        spec, start = self.spec, self.starts[stream]
        packer = Packer(spec.seq_len + 1)
        need = spec.batch_size * packer.window
        for epoch in itertools.count(start.epoch):
            first = start if epoch == start.epoch else StreamPosition(epoch)
            pass_tokens = 0
            for file, doc, tokens in self._encoded(stream, epoch, (first.file, first.doc)):
                offset = first.offset if (file, doc) == (first.file, first.doc) else 0
                packer.add(StreamPosition(epoch, file, doc, offset), tokens[offset:])
                pass_tokens += len(tokens)
                after_doc = StreamPosition(epoch, file, doc + 1)
                while len(packer) >= need:
                    batch = np.stack([packer.take() for _ in range(spec.batch_size)])  # (B, S+1)
                    yield batch, packer.head() or after_doc
            if (first.file, first.doc) == (0, 0) and pass_tokens < need:
                raise ValueError(self._too_small(stream, pass_tokens, need))

    def _encoded(self, stream: int, epoch: int, start: tuple[int, int]) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(file, document, token ids)`` of the non-empty training documents, from ``start`` on."""
        spec = self.spec
        documents = iter_positioned(
            spec.source,
            self.dataset,
            shard=spec.rank * spec.num_streams + stream,
            num_shards=spec.world_size * spec.num_streams,
            epoch=epoch,
            seed=spec.seed,
            shuffle_buffer=spec.shuffle_buffer,
            start=start,
        )
        group, chars = [], 0
        for file, doc, text in documents:
            if not text or text.isspace() or is_held_out(text, spec.val_fraction):
                continue
            group.append((file, doc, text))
            chars += len(text)
            if chars >= _ENCODE_CHARS or len(group) >= _ENCODE_DOCS:
                yield from self._encode_group(group, epoch)
                group, chars = [], 0
        yield from self._encode_group(group, epoch)

    def _encode_group(self, group: list[tuple[int, int, str]], epoch: int) -> Iterator[tuple[int, int, np.ndarray]]:
        if group:
            tokens = self.encoder.encode([text for *_, text in group], epoch)
            yield from ((file, doc, ids) for (file, doc, _), ids in zip(group, tokens, strict=True))

    def _too_small(self, stream: int, tokens: int, need: int) -> str:
        spec = self.spec
        where = ""
        if spec.world_size * spec.num_streams > 1:
            where = (
                f" (the share of rank {spec.rank} of {spec.world_size}, DataLoader worker {stream} of "
                f"{spec.num_streams}; fewer ranks or workers give each a larger share)"
            )
        return (
            f"The training data is too small for one batch: a full pass over {spec.source.path!r} split "
            f"{spec.source.split!r} gives {tokens} tokens{where}, but one batch needs batch_size={spec.batch_size} x "
            f"(seq_len={spec.seq_len} + 1) = {need} tokens. Use more data or a smaller batch_size/seq_len."
        )
