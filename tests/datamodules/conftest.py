"""Fixtures for the data tests: offline HF, a tokenizer cache, a small synthetic corpus and its tokenizer."""

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The default corpus' BPE is keyed by content, so a cache kept in the (git-ignored) repo .cache/ is safe to reuse.
os.environ.setdefault("DSV3_CACHE_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "dsv3"))

import pytest  # noqa: E402

from datamodules import PretrainDataModule  # noqa: E402
from datamodules.tokenizer import train_bpe  # noqa: E402

WORDS = ["thou", "art", "more", "lovely", "and", "temperate", "rough", "winds", "do", "shake", "the", "buds", "of"]


def make_documents(n: int = 60, seed: int = 0) -> list[str]:
    """Unique documents (``doc<i> ...``) from a few tokens to several windows long, plus empty ones."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i % 17 == 5:
            docs.append("" if i % 2 else "   \n")
            continue
        length = rng.choice([0, 2, 8, 30, 90])
        docs.append(f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(length)))
    return docs


def write_jsonl(directory: Path, docs: list[str], n_files: int, column: str = "text") -> list[str]:
    """Split ``docs`` into ``n_files`` contiguous JSON-lines files; returns their paths in order."""
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(docs) // n_files)
    paths = []
    for j in range(n_files):
        path = directory / f"part{j}.jsonl"
        with path.open("w") as f:
            for doc in docs[j * per_file : (j + 1) * per_file]:
                f.write(json.dumps({column: doc, "id": len(paths)}) + "\n")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, documents) -> dict[int, list[str]]:
    """The synthetic corpus as 1, 3 and 4 JSON-lines files (keyed by file count)."""
    root = tmp_path_factory.mktemp("corpus")
    return {n: write_jsonl(root / f"files{n}", documents, n) for n in (1, 3, 4)}


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, documents) -> str:
    """A small byte-level BPE trained on the synthetic corpus, saved as tokenizer.json."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe([d for d in documents if d.strip()], vocab_size=320).save(str(path))
    return str(path)


@pytest.fixture
def make_dm(corpus, tokenizer_path):
    """Build a datamodule on the synthetic corpus: seq_len 16, batch_size 2, 3 files, unless overridden."""

    def make(n_files: int = 3, **kwargs) -> PretrainDataModule:
        args = {"path": "json", "data_files": corpus[n_files], "tokenizer": tokenizer_path, "seq_len": 16}
        args.update(batch_size=2, val_batches=0)
        return PretrainDataModule(**{**args, **kwargs})

    return make
