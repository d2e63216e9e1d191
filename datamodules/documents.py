"""Documents from any Hugging Face dataset, streamed, sharded over (rank, worker), optionally shuffled.

A *document stream* is the sequence of raw documents one (data-parallel rank, DataLoader worker) pair reads in one
pass (epoch) over a split. It is a pure function of the dataset, the shard index and the epoch, and a position in
it is ``(file, document within the file)``: resuming opens that file and drops the rows before the position, so it
costs the same at the millionth document as at the first (the datasets library's own ``state_dict`` keeps the
shard and offset too, but not the shuffle buffer, so its resume is not exact with shuffling).
"""

import glob
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import IterableDataset, load_dataset
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

_READ_BATCH = 64  # documents per Arrow batch read from the dataset


@dataclass(frozen=True)
class DocumentSource:
    """One split of a dataset, as ``load_dataset(path, name, split=split, data_files=..., streaming=True)`` sees it.

    Attributes:
        path: a Hub id (``HuggingFaceFW/fineweb-edu``) or a builder name (``text``, ``json``, ``parquet``).
        name: the dataset configuration (``sample-10BT``), if any.
        split: the split to read.
        data_files: files for a builder, as ``load_dataset`` takes them.
        text_column: the column holding the document text.
        load_kwargs: further keyword arguments for ``load_dataset`` (``sample_by``, ``encoding_errors``, ...).
    """

    path: str
    name: str | None
    split: str
    data_files: Any
    text_column: str
    load_kwargs: dict = field(default_factory=dict)

    def load(self) -> IterableDataset:
        """Open the split as a streaming dataset; fails early, naming the field, when the files or the column are bad.

        Raises:
            ValueError: a local ``data_files`` entry is missing, a directory, a glob matching nothing or empty; the
                files hold no documents; the Hub cannot be reached (offline) for a Hub dataset id.
        """
        if self.path in _PACKAGED_DATASETS_MODULES:  # a builder (json, parquet, text, ...): files are local paths
            check_local_files(self.data_files)
        try:
            dataset = load_dataset(
                self.path, self.name, split=self.split, data_files=self.data_files, streaming=True, **self.load_kwargs
            )
        except StopIteration as err:  # datasets' builders infer the schema from the first record
            raise ValueError(f"data.data_files={self.data_files!r} holds no documents; give files with data") from err
        except ConnectionError as err:  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network
            raise ValueError(
                f"data.path={self.path!r} is read from the Hugging Face Hub, which cannot be reached ({err}); "
                "download it while online (it is cached), or give local files: data.path json/parquet/text with "
                "data.data_files"
            ) from err
        if dataset.column_names is not None:
            self.check_column(dataset.column_names)
        return dataset

    def check_column(self, columns: list[str]) -> None:
        """Raise a ``ValueError`` naming the available columns when the text column is not among them."""
        if self.text_column not in columns:
            raise ValueError(
                f"text_column={self.text_column!r} is not a column of {self.path!r} (split {self.split!r}); its "
                f"columns are {list(columns)}. Pass --data.text_column with one of them."
            )


def check_local_files(data_files: Any) -> None:
    """Raise a ``ValueError`` for a local ``data_files`` entry of a builder that cannot give documents (URLs pass).

    ``datasets`` reports these as "Unable to find" (for a directory that exists), "0 tokens" or a bare
    StopIteration; here each says what is wrong with which entry.
    """
    if isinstance(data_files, dict):
        entries = [f for files in data_files.values() for f in ([files] if isinstance(files, str) else files)]
    else:
        entries = [data_files] if isinstance(data_files, str) else list(data_files or [])
    for entry in map(str, entries):
        if "://" in entry:
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            raise ValueError(f"data.data_files={entry!r} is a directory; give its files, e.g. '{path}/*.jsonl'")
        matches = [Path(m) for m in glob.glob(str(path), recursive=True)] if glob.has_magic(entry) else [path]
        if not matches or not all(m.exists() for m in matches):
            what = "matches no files" if glob.has_magic(entry) else "does not exist"
            raise ValueError(f"data.data_files={entry!r} {what} (relative paths start at {Path.cwd()})")
        if all(m.is_file() and m.stat().st_size == 0 for m in matches):
            raise ValueError(f"data.data_files={entry!r} is empty: no documents to read")


def stream_files(
    n_files: int, shard: int, num_shards: int, epoch: int, seed: int, shuffle: bool
) -> tuple[list[int], int, int]:
    """The files shard ``shard`` of ``num_shards`` reads in pass ``epoch``, in order, and which of their rows.

    With at least as many files as shards, a shard takes whole files: every ``num_shards``-th file of the epoch's
    file order. With fewer files, every shard reads all of them and keeps the rows ``r`` with
    ``r % num_shards == shard`` of each. Either way every document belongs to exactly one shard.

    Returns:
        ``(files, first, step)``: the file indices, and the kept rows ``first, first + step, ...`` of each file.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_files).tolist() if shuffle else list(range(n_files))
    if n_files >= num_shards:
        return order[shard::num_shards], 0, 1
    return order, shard, num_shards


def iter_positioned(
    source: DocumentSource,
    dataset: IterableDataset,
    *,
    shard: int = 0,
    num_shards: int = 1,
    epoch: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 0,
    start: tuple[int, int] = (0, 0),
) -> Iterator[tuple[int, int, str]]:
    """Yield ``(file, doc, text)`` for the raw documents (empty ones included) of one shard's pass, from ``start``.

    ``file`` indexes this shard's files of the epoch (``stream_files``) and ``doc`` the documents of that file in
    the order they are yielded, so ``(file, doc)`` is a position that costs the same to resume from anywhere:
    the files before ``file`` are not opened, and the rows of ``file`` before the position are read as Arrow
    batches and dropped (not decoded). With ``shuffle_buffer`` B > 0 the file order is shuffled per epoch and the
    documents of each file are shuffled in consecutive windows of B (seeded by seed, epoch, file and window), so a
    resume reads at most one window again. Files are ``dataset.n_shards`` (one per data file for the builders).
    Iteration goes through ``IterableDataset.iter``, which inside a DataLoader worker does not split by worker.

    Args:
        source: the dataset description (for the text column and error messages).
        dataset: ``source.load()``.
        shard: this stream's shard index (``rank * num_workers + worker``).
        num_shards: the number of shards (data-parallel ranks x DataLoader workers).
        epoch: the pass over the data; with shuffling, each epoch has its own order.
        seed: the shuffle seed, shared by all shards so that they agree on one partition.
        shuffle_buffer: documents per shuffle window within a file (0: the dataset's order).
        start: the ``(file, doc)`` to start from.

    Yields:
        ``(file, doc, text)``, texts decoded as UTF-8 with undecodable bytes replaced.
    """
    files, first, step = stream_files(dataset.n_shards, shard, num_shards, epoch, seed, shuffle_buffer > 0)
    window = max(1, shuffle_buffer)
    for slot in range(start[0], len(files)):
        skip = start[1] if slot == start[0] else 0
        one_file = dataset.shard(num_shards=dataset.n_shards, index=files[slot]) if dataset.n_shards > 1 else dataset
        texts = _file_texts(source, one_file, first + (skip // window) * window * step, step)
        for w in itertools.count(skip // window):
            chunk = list(itertools.islice(texts, window))
            if not chunk:
                break
            if shuffle_buffer > 0:
                order = np.random.default_rng([seed, epoch, files[slot], w]).permutation(len(chunk))
                chunk = [chunk[i] for i in order]
            for i in range(max(0, skip - w * window), len(chunk)):
                yield slot, w * window + i, chunk[i]


def iter_documents(source: DocumentSource, dataset: IterableDataset, **kwargs: Any) -> Iterator[str]:
    """The texts of ``iter_positioned`` (same arguments), from the start of the pass."""
    return (text for _, _, text in iter_positioned(source, dataset, **kwargs))


def _file_texts(source: DocumentSource, dataset: IterableDataset, first_row: int, step: int) -> Iterator[str]:
    """Texts of the rows ``first_row, first_row + step, ...`` of ``dataset``; earlier rows stay Arrow, undecoded."""
    row = 0  # index of the first row of ``table``
    for table in dataset.with_format("arrow").iter(batch_size=_READ_BATCH):
        source.check_column(table.column_names)
        end, begin = row + table.num_rows, max(first_row, row)
        begin += (first_row - begin) % step  # the first kept row at or after it
        if begin < end:
            column = table.column(source.text_column).slice(begin - row, end - begin)
            for value in column.to_pylist()[::step]:
                yield as_text(value, source.text_column)
        row = end


def as_text(value: Any, column: str) -> str:
    """A text-column value as ``str``: ``None`` is empty, bytes are decoded with ``errors="replace"``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    raise ValueError(
        f"text_column={column!r} holds {type(value).__name__} values, not text; pass --data.text_column naming a "
        "string column."
    )


def document_hash(text: str) -> bytes:
    """A 16-byte digest of a document: the same on every rank, worker and run."""
    return hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=16).digest()


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out validation fraction (decided by its content hash alone)."""
    return fraction > 0 and int.from_bytes(document_hash(text)[:8], "little") < fraction * 2**64
