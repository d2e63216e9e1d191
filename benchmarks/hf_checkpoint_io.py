"""Time and memory of save_hf_checkpoint / load_hf_checkpoint for a preset (random weights).

Usage: python benchmarks/hf_checkpoint_io.py --preset bench-1gpu --dir /tmp/ckpt --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from models import DeepSeekV3, DeepSeekV3Config, load_hf_checkpoint, save_hf_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="bench-1gpu")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = DeepSeekV3Config.from_preset(args.preset)
    with torch.device("meta"):
        model = DeepSeekV3(config)
    model.to_empty(device=args.device)
    model.init_weights()
    model.to(dtype)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    start = time.perf_counter()
    save_hf_checkpoint(model, args.dir, max_shard_size=args.max_shard_size)
    print(f"{args.preset}: {n_bytes / 2**30:.2f} GiB of {args.dtype} params, save {time.perf_counter() - start:.1f} s")
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    loaded = load_hf_checkpoint(args.dir, device=args.device, dtype=dtype)
    if args.device == "cuda":
        torch.cuda.synchronize()
    line = f"load to {args.device} {time.perf_counter() - start:.1f} s, peak RSS {rss_before:.1f} -> "
    line += f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    if args.device == "cuda":
        line += f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(line)
    tokens = torch.randint(0, config.vocab_size, (1, 128), device=args.device)
    with torch.no_grad():
        print("logits finite:", bool(loaded(tokens).logits.isfinite().all()))


if __name__ == "__main__":
    main()
