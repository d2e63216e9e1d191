"""Fill-in-Middle: PSM layout, rate, determinism, and losslessness of the rearrangement."""

import numpy as np
import pytest
from tokenizers import Tokenizer

from datamodules.encoding import DocumentEncoder
from datamodules.fim import fim_split, psm_tokens
from datamodules.tokenizer import fim_token_ids


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path)


def _encoder(tokenizer, rate, seed=0):
    return DocumentEncoder(
        tokenizer, tokenizer.token_to_id("<|endoftext|>"), rate, fim_token_ids(tokenizer, False), seed
    )


def test_fim_split_cuts_at_two_points_and_concatenates_back():
    rng = np.random.default_rng(0)
    for text in ["", "a", "hello world", "x" * 1000]:
        prefix, middle, suffix = fim_split(text, rng)
        assert prefix + middle + suffix == text


def test_psm_layout():
    assert psm_tokens([1, 2], [5], [3, 4], (100, 101, 102), 0) == [100, 1, 2, 101, 3, 4, 102, 5, 0]


def test_fim_documents_are_psm_and_hold_the_whole_text(tokenizer, documents):
    begin, hole, end = fim_token_ids(tokenizer, False)
    docs = [d for d in documents if d.strip()]
    for doc, ids in zip(docs, _encoder(tokenizer, 1.0).encode(docs), strict=True):
        ids = ids.tolist()
        assert ids[0] == begin and ids[-1] == tokenizer.token_to_id("<|endoftext|>")
        i, j = ids.index(hole), ids.index(end)
        prefix, suffix, middle = ids[1:i], ids[i + 1 : j], ids[j + 1 : -1]
        assert tokenizer.decode(prefix) + tokenizer.decode(middle) + tokenizer.decode(suffix) == doc


def test_fim_rate_is_respected(tokenizer):
    docs = [f"document number {i} with some text" for i in range(3000)]
    begin = fim_token_ids(tokenizer, False)[0]
    rate = np.mean([ids[0] == begin for ids in _encoder(tokenizer, 0.1).encode(docs)])
    assert 0.08 < rate < 0.12  # binomial sd ~0.0055


def test_fim_is_deterministic_per_document_and_epoch(tokenizer):
    docs = [f"document number {i} with some text" for i in range(200)]
    encoder = _encoder(tokenizer, 0.5)
    together = encoder.encode(docs)
    one_by_one = [encoder.encode([d])[0] for d in reversed(docs)][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(together, one_by_one, strict=True))
    other_epoch = encoder.encode(docs, epoch=1)
    assert any(not np.array_equal(a, b) for a, b in zip(together, other_epoch, strict=True))


def test_no_fim_is_tokens_plus_eos(tokenizer, documents):
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = _encoder(tokenizer, 0.0).encode(["hello world"])[0].tolist()
    assert ids == [*tokenizer.encode("hello world", add_special_tokens=False).ids, eos]
