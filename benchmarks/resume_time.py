"""Time to the first training batch after a resume, against how far the stream had got (documents consumed).

Writes a local parquet corpus (``--files`` files of ``--docs-per-file`` short documents), streams it through
``PretrainDataModule`` (auto-commit, no trainer), snapshots ``state_dict()`` once ``--positions`` documents have
been consumed (counted by the EOS tokens of the batches), and for each snapshot times a fresh datamodule's
``load_state_dict`` + first batch. Resuming by re-reading every consumed document grows with the position; resuming
from a (file, document) position does not.

    python benchmarks/resume_time.py                          # 1M documents consumed, 100 files x 20k documents
    python benchmarks/resume_time.py --positions 10000 100000 1000000 --workers 0
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datamodules import PretrainDataModule

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
]


def write_corpus(root: Path, files: int, docs_per_file: int) -> list[str]:
    """``files`` parquet files of short unique documents (``"d<i> w w w ..."``, 3 to 8 words); reused if present."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"part-{i:05d}.parquet" for i in range(files)]
    rng = random.Random(0)
    for i, path in enumerate(paths):
        if path.exists():
            continue
        docs = [
            f"d{i * docs_per_file + j} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
            for j in range(docs_per_file)
        ]
        pq.write_table(pa.table({"text": docs}), path, row_group_size=1000)
    return [str(p) for p in paths]


def datamodule(files: list[str], args) -> PretrainDataModule:
    return PretrainDataModule(
        path="parquet",
        data_files=files,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        val_batches=0,
    )


def snapshots(files: list[str], args) -> dict[int, dict]:
    """``state_dict()`` after at least each of ``args.positions`` documents were consumed."""
    dm = datamodule(files, args)
    eos, wanted, states, consumed = dm.eos_token_id, sorted(args.positions), {}, 0
    start = time.perf_counter()
    for batch in dm.train_dataloader():
        consumed += int((batch == eos).sum())
        while wanted and consumed >= wanted[0]:
            states[wanted.pop(0)] = dm.state_dict()
            print(f"  {consumed:,} documents consumed after {time.perf_counter() - start:.1f} s", flush=True)
        if not wanted:
            return states
    raise RuntimeError("the stream ended")  # it is endless


def resume_seconds(files: list[str], args, state: dict) -> float:
    dm = datamodule(files, args)
    start = time.perf_counter()
    dm.load_state_dict(state)
    next(iter(dm.train_dataloader()))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".cache/resume_benchmark", help="where the corpus is written (kept)")
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--docs-per-file", type=int, default=20_000)
    parser.add_argument("--positions", type=int, nargs="+", default=[0, 10_000, 100_000, 1_000_000])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="resumes timed per position (the median is shown)")
    args = parser.parse_args()
    files = write_corpus(Path(args.root), args.files, args.docs_per_file)
    print(
        f"{args.files} files x {args.docs_per_file:,} documents, workers {args.workers}, shuffle {args.shuffle_buffer}"
    )
    states = snapshots(files, args)
    print("| documents consumed | resume to first batch (s), median | runs |")
    print("| ---: | ---: | --- |")
    for position, state in states.items():
        runs = sorted(resume_seconds(files, args, state) for _ in range(args.repeats))
        print(f"| {position:,} | {runs[len(runs) // 2]:.2f} | {', '.join(f'{r:.2f}' for r in runs)} |", flush=True)


if __name__ == "__main__":
    main()
