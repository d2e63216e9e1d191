"""Documents from any Hugging Face dataset, streamed, sharded over (rank, worker), optionally shuffled.

A *document stream* is the sequence of raw documents one (data-parallel rank, DataLoader worker) pair reads in one
pass (epoch) over a split. It is a pure function of the dataset, the shard index and the epoch, so a position in it
is just a count of documents, and resuming is skipping that many (read, not tokenized).
"""

import glob
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
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


def iter_documents(
    source: DocumentSource,
    dataset: IterableDataset,
    *,
    shard: int = 0,
    num_shards: int = 1,
    epoch: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 0,
) -> Iterator[str]:
    """Yield the raw documents (empty ones included) of one shard of ``dataset`` for one epoch.

    Shard ``rank * num_workers + worker`` of ``world_size * num_workers`` is what splitting by rank with
    ``split_dataset_by_node`` and then by worker gives (``datasets`` composes nested splits this way): whole files
    when their count is a multiple of the number of shards, otherwise every ``num_shards``-th document, so every
    document is read by exactly one shard either way. Iteration goes through ``IterableDataset.iter`` rather than
    ``__iter__``, which inside a DataLoader worker would split by worker a second time.

    Args:
        source: the dataset description (for the text column and error messages).
        dataset: ``source.load()``.
        shard: this stream's shard index.
        num_shards: the number of shards (data-parallel ranks x DataLoader workers).
        epoch: the pass over the data; with shuffling, each epoch has its own order.
        seed: the shuffle seed, shared by all shards so that they agree on one global order.
        shuffle_buffer: documents in ``datasets``' shuffle buffer (0: keep the dataset's order); it also shuffles
            the order of the files.

    Yields:
        Document texts, bytes decoded as UTF-8 with undecodable bytes replaced.
    """
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(seed=seed + epoch, buffer_size=shuffle_buffer)
    if num_shards > 1:
        dataset = split_dataset_by_node(dataset, rank=shard, world_size=num_shards)
    for table in dataset.with_format("arrow").iter(batch_size=_READ_BATCH):
        source.check_column(table.column_names)
        for value in table.column(source.text_column).to_pylist():
            yield as_text(value, source.text_column)


def skip_documents(documents: Iterator[str], count: int) -> Iterator[tuple[int, str]]:
    """Number the documents and drop the first ``count`` of them (read, never tokenized)."""
    return zip(itertools.count(count), itertools.islice(documents, count, None), strict=False)


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
