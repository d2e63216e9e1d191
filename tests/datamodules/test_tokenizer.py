"""Tokenizers: cached default BPE, loading from paths, EOS and FIM token resolution."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from datamodules import tokenizer as tok


@pytest.fixture
def text_files(tmp_path, documents):
    paths = []
    for i in range(3):
        path = tmp_path / f"t{i}.txt"
        path.write_text("\n".join(documents[i::3]))
        paths.append(path)
    return paths


def test_cached_bpe_trains_once_and_publishes_atomically(tmp_path, monkeypatch, text_files):
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    train = tok.train_bpe
    monkeypatch.setattr(tok, "train_bpe", lambda texts, size: calls.append(size) or train(texts, size))
    first = tok.cached_bpe(text_files, 300, name="test")
    second = tok.cached_bpe(text_files, 300, name="test")
    assert calls == [300]
    assert first.to_str() == second.to_str()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no temporary left
    tok.cached_bpe(text_files, 310, name="test")
    assert calls == [300, 310]  # the vocabulary size is part of the key
    assert first.get_vocab_size() == 300
    assert [first.token_to_id(t) for t in tok.SPECIAL_TOKENS] == [0, 1, 2, 3]


def test_byte_level_bpe_round_trips_any_text(tokenizer_path):
    tokenizer = Tokenizer.from_file(tokenizer_path)
    text = "Ünïcödé, emoji 🎭, tabs\tand\nnewlines — never seen in training."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_load_tokenizer_from_file_or_directory(tmp_path, tokenizer_path):
    reference = Tokenizer.from_file(tokenizer_path).to_str()
    assert tok.load_tokenizer(tokenizer_path).to_str() == reference
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_text(reference)
    assert tok.load_tokenizer(str(directory)).to_str() == reference


def test_load_tokenizer_explains_a_bad_spec():
    with pytest.raises(ValueError, match="tokenizer='no/such-tokenizer-here'"):
        tok.load_tokenizer("no/such-tokenizer-here")


def _vocab_tokenizer(tokens):
    vocab = {t: i for i, t in enumerate(["a", "b", *tokens])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_eos_from_tokenizer_config_then_known_spellings(tmp_path):
    tokenizer = _vocab_tokenizer(["</s>", "<my_eos>"])
    assert tok.eos_token_id(tokenizer, None, None) == 2  # "</s>" is a known spelling
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<my_eos>"}}))
    assert tok.eos_token_id(tokenizer, str(tmp_path), None) == 3
    assert tok.eos_token_id(tokenizer, None, "<my_eos>") == 3


def test_missing_eos_names_the_fix():
    with pytest.raises(ValueError, match="eos_token"):
        tok.eos_token_id(_vocab_tokenizer([]), None, None)


def test_fim_tokens_in_deepseek_spelling_are_found():
    tokenizer = _vocab_tokenizer(["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"])
    assert tok.fim_token_ids(tokenizer, add_missing=False) == (2, 3, 4)


def test_missing_fim_tokens_are_added_when_asked():
    tokenizer = _vocab_tokenizer([])
    assert tok.fim_token_ids(tokenizer, add_missing=False) is None
    ids = tok.fim_token_ids(tokenizer, add_missing=True)
    assert ids == (2, 3, 4) and tokenizer.get_vocab_size(with_added_tokens=True) == 5
