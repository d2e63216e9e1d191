"""Packing: back-to-back windows, no padding, and the exact position of the next window."""

import numpy as np

from datamodules.packing import Packer, StreamPosition


def _docs(lengths):
    start = 0
    for i, n in enumerate(lengths):
        yield i, np.arange(start, start + n, dtype=np.int64)
        start += n


def test_windows_are_consecutive_slices_of_the_stream_with_no_padding():
    lengths = [3, 0, 25, 1, 7, 40, 2]  # shorter and longer than a window, and an empty document
    packer, windows = Packer(window=9), []
    for doc, tokens in _docs(lengths):
        packer.add(StreamPosition(0, doc=doc), tokens)
        while len(packer) >= packer.window:
            windows.append(packer.take())
    stream = np.arange(sum(lengths))
    assert np.array_equal(np.concatenate(windows), stream[: len(windows) * 9])
    assert len(packer) == sum(lengths) - len(windows) * 9


def test_head_points_at_the_next_windows_first_token():
    lengths = [5, 12, 3, 20, 4, 9, 30]
    starts = np.cumsum([0, *lengths])  # token values are their stream index, so starts[doc] + offset is a value
    packer, expected, checked = Packer(window=7), None, 0
    for doc, tokens in _docs(lengths):
        packer.add(StreamPosition(2, doc=doc), tokens)
        while len(packer) >= packer.window:
            window = packer.take()
            if expected is not None:
                assert window[0] == expected
                checked += 1
            head = packer.head()
            expected = None if head is None else starts[head.doc] + head.offset
            assert head is None or head.epoch == 2
    assert checked >= 8


def test_head_tracks_token_offsets_within_documents():
    packer = Packer(window=4)
    packer.add(StreamPosition(0, doc=0), np.arange(6))
    packer.add(StreamPosition(0, doc=3, offset=2), np.arange(100, 105))  # resumed mid-document: tokens[0] is offset 2
    assert packer.head() == StreamPosition(0, doc=0, offset=0)
    assert packer.take().tolist() == [0, 1, 2, 3]
    assert packer.head() == StreamPosition(0, doc=0, offset=4)
    assert packer.take().tolist() == [4, 5, 100, 101]
    assert packer.head() == StreamPosition(0, doc=3, offset=4)
    assert len(packer) == 3
    packer.add(StreamPosition(0, doc=4), np.arange(200, 201))
    assert packer.take().tolist() == [102, 103, 104, 200]
    assert packer.head() is None and len(packer) == 0
