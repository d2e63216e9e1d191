"""Time and memory of save_hf_checkpoint / load_hf_checkpoint for a preset with random weights.

Save and load run in separate processes so that the load's peak RSS is its own:
    python benchmarks/hf_checkpoint_io.py save --preset bench-1gpu --dir /tmp/ckpt --dtype bfloat16
    python benchmarks/hf_checkpoint_io.py load --preset bench-1gpu --dir /tmp/ckpt --dtype bfloat16 --device cuda
``--set key=value ...`` overrides config fields (JSON values) in both.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from models import DeepSeekV3, DeepSeekV3Config, load_hf_checkpoint, save_hf_checkpoint


def _save(config: DeepSeekV3Config, args: argparse.Namespace, dtype: torch.dtype) -> None:
    with torch.device("meta"):
        model = DeepSeekV3(config)
    model.to_empty(device=args.device)
    model.init_weights()
    for param in model.parameters():  # not model.to(dtype): that would make the complex RoPE table real
        param.data = param.data.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    save_hf_checkpoint(model, args.dir, max_shard_size=args.max_shard_size)
    elapsed = time.perf_counter() - start
    print(f"{args.preset}: {n_params / 1e6:.0f}M params {args.dtype}, save {elapsed:.1f} s")


def _load(config: DeepSeekV3Config, args: argparse.Namespace, dtype: torch.dtype) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    model = load_hf_checkpoint(args.dir, device=args.device, dtype=dtype)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    line = f"load to {args.device}: {n_bytes / 2**30:.2f} GiB of parameters in {elapsed:.1f} s, "
    line += f"peak RSS {rss_before:.2f} -> {rss:.2f} GiB (+{rss - rss_before:.2f})"
    if args.device == "cuda":
        line += f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(line)
    tokens = torch.randint(0, config.vocab_size, (1, 128), device=args.device)
    with torch.no_grad():
        print("logits finite:", bool(model(tokens).logits.isfinite().all()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["save", "load"])
    parser.add_argument("--preset", default="bench-1gpu")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value (JSON values)")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = DeepSeekV3Config.from_preset(args.preset, **overrides)
    (_save if args.mode == "save" else _load)(config, args, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
