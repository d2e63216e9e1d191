"""Document streams: every document read by exactly one (rank, worker) shard, columns, decoding, hold-out."""

import collections

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datamodules.documents as documents_module
from datamodules.documents import DocumentSource, is_held_out, iter_documents, iter_positioned, stream_files


def _source(files, column="text", path="json", **kwargs):
    return DocumentSource(path, None, "train", files, column, kwargs)


def _shards(source, num_shards, **kwargs):
    dataset = source.load()
    return [list(iter_documents(source, dataset, shard=i, num_shards=num_shards, **kwargs)) for i in range(num_shards)]


@pytest.mark.parametrize("n_files", [1, 3, 4])
@pytest.mark.parametrize("world_size,workers", [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)])
def test_shards_partition_the_documents(corpus, documents, n_files, world_size, workers):
    """Whole files when they divide evenly (4 files over 2 or 4 shards), else every n-th document; never a gap."""
    shards = _shards(_source(corpus[n_files]), world_size * workers)
    assert collections.Counter(doc for shard in shards for doc in shard) == collections.Counter(documents)


def test_shuffled_shards_partition_and_are_deterministic(corpus, documents):
    source = _source(corpus[3])
    shuffled = _shards(source, 4, shuffle_buffer=8, seed=1)
    assert collections.Counter(doc for shard in shuffled for doc in shard) == collections.Counter(documents)
    assert shuffled == _shards(source, 4, shuffle_buffer=8, seed=1)
    assert shuffled != _shards(source, 4)
    assert shuffled != _shards(source, 4, shuffle_buffer=8, seed=1, epoch=1)  # a new order every epoch


def test_missing_text_column_lists_the_columns(corpus):
    with pytest.raises(ValueError, match=r"text_column='body'.*\['text', 'id'\]"):
        _source(corpus[1], column="body").load()


def test_missing_column_found_while_streaming_lists_the_columns(corpus):
    source = _source(corpus[1], column="body")
    dataset = _source(corpus[1]).load()  # column names known only once data is read (as for some Hub datasets)
    with pytest.raises(ValueError, match=r"\['text', 'id'\]"):
        next(iter_documents(source, dataset))


def test_undecodable_bytes_are_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text \xff\xfe bad bytes\n")
    source = _source([str(path)], path="text", sample_by="document", encoding_errors="replace")
    assert list(iter_documents(source, source.load())) == ["good text \ufffd\ufffd bad bytes\n"]


def test_binary_text_column_is_decoded_with_replacement(tmp_path):
    path = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"content": pa.array([b"caf\xc3\xa9", b"\xffx", None], pa.binary())}), path)
    source = _source([str(path)], column="content", path="parquet")
    assert list(iter_documents(source, source.load())) == ["café", "\ufffdx", ""]


def test_held_out_fraction_is_by_content():
    docs = [f"document {i}" for i in range(20000)]
    held = [d for d in docs if is_held_out(d, 0.05)]
    assert 0.045 < len(held) / len(docs) < 0.055
    assert held == [d for d in docs if is_held_out(d, 0.05)]
    assert not any(is_held_out(d, 0.0) for d in docs)


@pytest.mark.parametrize("shuffle_buffer", [0, 3])
def test_resume_reads_from_the_position_on_only(corpus, monkeypatch, shuffle_buffer):
    """A (file, doc) position opens no earlier file and decodes at most one shuffle window of its own file again,
    so resuming costs the same at any position; the documents from there on are the uninterrupted pass's."""
    source = _source(corpus[4])
    dataset = source.load()
    full = list(iter_positioned(source, dataset, shuffle_buffer=shuffle_buffer, seed=1))
    opened, decoded, shard, as_text = [], [], type(dataset).shard, documents_module.as_text

    def recording_shard(self, num_shards, index, contiguous=True):
        opened.append(index)
        return shard(self, num_shards, index, contiguous)

    monkeypatch.setattr(type(dataset), "shard", recording_shard)
    monkeypatch.setattr(documents_module, "as_text", lambda value, column: decoded.append(1) or as_text(value, column))
    file, doc, _ = full[len(full) * 2 // 3 + 1]  # inside a file, past its first window
    resumed = list(iter_positioned(source, dataset, shuffle_buffer=shuffle_buffer, seed=1, start=(file, doc)))
    assert resumed == full[len(full) * 2 // 3 + 1 :]
    assert opened == stream_files(4, 0, 1, 0, 1, shuffle_buffer > 0)[0][file:]
    assert len(decoded) == len(resumed) + (doc % shuffle_buffer if shuffle_buffer else 0)


def test_fewer_files_than_shards_split_each_file_by_rows():
    assert stream_files(3, 1, 4, 0, 0, False) == ([0, 1, 2], 1, 4)  # every shard reads all, keeps rows 1, 5, 9...
    assert stream_files(8, 1, 4, 0, 0, False) == ([1, 5], 0, 1)  # whole files: every 4th
    shuffled = [stream_files(8, s, 4, 2, 7, True)[0] for s in range(4)]
    assert sorted(sum(shuffled, [])) == list(range(8)) and shuffled != [[0, 4], [1, 5], [2, 6], [3, 7]]
