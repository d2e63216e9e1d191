"""The training stream end to end: each worker's batches are its documents' tokens, in order, packed."""

import itertools
import pickle

import numpy as np
import pytest
import torch

from datamodules.documents import iter_documents


def _expected_tokens(dm, shard, num_shards):
    """The token stream of one shard for one pass: non-empty documents, each followed by EOS."""
    dataset = dm.train_source.load()
    docs = [d for d in iter_documents(dm.train_source, dataset, shard=shard, num_shards=num_shards) if d.strip()]
    return np.concatenate([dm.encode(d) + [dm.eos_token_id] for d in docs]), len(docs)


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_each_stream_is_its_shard_packed_in_order_across_epochs(make_dm, world_size, workers):
    streams = max(1, workers)
    for rank in range(world_size):
        dm = make_dm(num_workers=workers, rank=rank, world_size=world_size)
        expected = [_expected_tokens(dm, rank * streams + s, world_size * streams)[0] for s in range(streams)]
        per_stream = max(len(e) for e in expected) * 3 // (2 * 34)  # 1.5 passes of the largest shard
        batches = list(itertools.islice(dm.train_dataloader(), per_stream * streams))
        assert all(b.dtype == torch.int64 and b.shape == (2, 17) for b in batches)
        for stream in range(streams):
            got = torch.cat([b.reshape(-1) for b in batches[stream::streams]]).numpy()
            assert len(got) > len(expected[stream])  # the check covers a wrap into the second epoch
            reps = -(-len(got) // len(expected[stream]))
            assert np.array_equal(got, np.tile(expected[stream], reps)[: len(got)])


def test_empty_documents_are_skipped(make_dm, documents):
    dm = make_dm(n_files=1)
    expected, n_docs = _expected_tokens(dm, 0, 1)
    assert n_docs == sum(1 for d in documents if d.strip()) < len(documents)
    assert (expected == dm.eos_token_id).sum() == n_docs


@pytest.mark.parametrize("workers", [0, 2])
def test_too_small_dataset_names_sizes_and_token_count(make_dm, workers):
    dm = make_dm(n_files=1, seq_len=4096, batch_size=4, num_workers=workers)
    with pytest.raises(ValueError, match=r"gives \d+ tokens.*batch_size=4 x \(seq_len=4096 \+ 1\) = 16388"):
        next(iter(dm.train_dataloader()))


def test_stream_pickles_for_spawned_workers(make_dm):
    """Workers started with ``spawn`` (macOS, Windows) receive the stream pickled."""
    loader = make_dm(shuffle_buffer=4, fim_rate=0.5).train_dataloader()
    stream = loader.make_stream(loader.state)
    copy = pickle.loads(pickle.dumps(stream))
    a, b = itertools.islice(stream.batches(0), 5), itertools.islice(copy.batches(0), 5)
    assert all(np.array_equal(x, y) and p == q for (x, p), (y, q) in zip(a, b, strict=True))
