"""PretrainDataModule: the interface the model and CLI rely on, validation data, and bad input."""

import itertools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from tokenizers import Tokenizer

from datamodules import PretrainDataModule
from datamodules.corpus import VALIDATION_FILES
from datamodules.documents import is_held_out, iter_documents


@pytest.fixture(scope="module")
def default_dm() -> PretrainDataModule:
    return PretrainDataModule(seq_len=64, batch_size=4, val_batches=4)


def test_default_corpus_properties_right_after_init(default_dm):
    dm = default_dm
    assert isinstance(dm.tokenizer, Tokenizer)
    assert dm.vocab_size == 4096 and dm.seq_len == 64
    assert dm.tokenizer.id_to_token(dm.eos_token_id) == "<|endoftext|>"
    text = "To be, or not to be, that is the Question"
    assert dm.decode(dm.encode(text)) == text
    assert len(dm.encode(text)) < len(text) / 2  # a real BPE, not bytes


def test_default_corpus_holds_out_whole_works(default_dm):
    train_files = default_dm.train_source.data_files["train"]
    val_files = default_dm.val_source.data_files[default_dm.val_source.split]
    assert sorted(f.rsplit("/", 1)[1] for f in val_files) == sorted(VALIDATION_FILES)
    assert not {f.rsplit("/", 1)[1] for f in train_files} & set(VALIDATION_FILES)


def test_default_batches_train_and_val(default_dm):
    train = next(iter(default_dm.train_dataloader()))
    val = list(default_dm.val_dataloader())
    assert train.dtype == torch.int64 and train.shape == (4, 65)
    assert len(val) == 4 and all(b.dtype == torch.int64 and b.shape == (4, 65) for b in val)
    first_val_file = sorted(default_dm.val_source.data_files["validation"])[0]  # documents come in file order
    text = Path(first_val_file).read_text(encoding="utf-8", errors="replace")
    assert val[0][0].tolist() == default_dm.encode(text)[:65]
    assert int(train.max()) < default_dm.vocab_size


def test_validation_is_fixed_across_runs_workers_and_seeds(make_dm):
    a = list(make_dm(val_fraction=0.3, val_batches=4).val_dataloader())
    b = list(make_dm(val_fraction=0.3, val_batches=4, num_workers=2, seed=5, shuffle_buffer=8).val_dataloader())
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_validation_is_split_evenly_over_ranks(make_dm):
    whole = list(make_dm(val_fraction=0.3, val_batches=4).val_dataloader())
    ranks = [list(make_dm(val_fraction=0.3, val_batches=4, rank=r, world_size=2).val_dataloader()) for r in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2]
    interleaved = [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]]
    assert all(torch.equal(x, y) for x, y in zip(whole, interleaved, strict=True))


def test_held_out_fraction_is_in_validation_and_never_trained_on(make_dm, documents):
    dm = make_dm(n_files=1, val_fraction=0.3, val_batches=2)
    held = [d for d in documents if d.strip() and is_held_out(d, 0.3)]
    kept = [d for d in documents if d.strip() and not is_held_out(d, 0.3)]
    assert held and kept

    def tokens(docs):
        return np.concatenate([dm.encode(d) + [dm.eos_token_id] for d in docs])

    val = torch.cat(list(dm.val_dataloader())).reshape(-1).numpy()
    assert np.array_equal(val, tokens(held)[: len(val)])
    train = torch.cat(list(itertools.islice(dm.train_dataloader(), 10))).reshape(-1).numpy()
    assert np.array_equal(train, tokens(kept)[: len(train)])


def test_no_validation_without_a_split_or_fraction(make_dm):
    assert len(make_dm(val_batches=8).val_dataloader()) == 0


def test_validation_split_by_name(make_dm, corpus):
    dm = make_dm(data_files={"train": corpus[3][:2], "test": corpus[3][2:]}, val_split="test", val_batches=1)
    first_val_doc = next(iter_documents(dm.val_source, dm.val_source.load()))
    assert next(iter(dm.val_dataloader()))[0, :4].tolist() == dm.encode(first_val_doc)[:4]


def test_too_small_validation_says_so(make_dm):
    with pytest.raises(ValueError, match=r"validation data is too small.*batch_size=2 x \(seq_len=512 \+ 1\)"):
        make_dm(val_fraction=0.05, val_batches=2, seq_len=512).val_dataloader()


def test_missing_text_column_lists_columns(make_dm):
    with pytest.raises(ValueError, match=r"text_column='body'.*\['text', 'id'\]"):
        make_dm(text_column="body").setup("fit")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"shuffle_buffer": -1}, "shuffle_buffer"),
        ({"fim_rate": 1.5}, "fim_rate"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_batches": -1}, "val_batches"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"val_split": "test", "val_fraction": 0.1}, "val_fraction"),
        ({"rank": 1}, "rank"),
        ({"rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_bad_arguments_name_the_field(make_dm, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        make_dm(**kwargs)


class _Model(L.LightningModule):
    def __init__(self, vocab_size: int = 1, seq_len: int = 1) -> None:
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len


class _CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.seq_len", apply_on="instantiate")


def test_lightning_cli_builds_it_and_links_vocab_size(corpus, tokenizer_path):
    files = f"--data.data_files=[{corpus[3][0]}, {corpus[3][1]}]"
    args = ["--data.path=json", files, f"--data.tokenizer={tokenizer_path}"]
    cli = _CLI(_Model, PretrainDataModule, run=False, args=[*args, "--data.seq_len=32", "--data.fim_rate=0.1"])
    assert isinstance(cli.datamodule, PretrainDataModule)
    assert cli.datamodule.train_source.data_files == corpus[3][:2]
    assert (cli.model.vocab_size, cli.model.seq_len) == (cli.datamodule.vocab_size, 32)
