"""MLA decode benchmark: the compressed latent cache with absorbed attention against a naive expanded K/V cache.

For each batch size, prefill a random prompt, then greedy-decode ``--new-tokens`` tokens one at a time with
``DeepSeekV3.decode``; report decode tokens/s, time per step, prefill time, cache bytes per token and the
whole cache's size. Random weights (``init_weights``) in the chosen dtype. "logits diff" compares the two
caches' last-step logits after decoding the same tokens (mean |latent - expanded| / mean |expanded|). Prints a
markdown table headed by the command, machine and date.

    python benchmarks/mla_decode.py                                   # tiny on CPU, bench-1gpu on a GPU
    python benchmarks/mla_decode.py --preset bench-1gpu --device cuda --dtype bfloat16 --prompt-len 2048
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import DeepSeekV3, DeepSeekV3Config, MLACache  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, bench-1gpu on CUDA)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--attention-iters", type=int, default=50, help="timed steps of the one-layer attention table")
    p.add_argument("--warmup-tokens", type=int, default=4, help="decode steps run (untimed) before each timing")
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("bench-1gpu" if on_cuda else "tiny")
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    if args.prompt_len < 1 or args.new_tokens < 1 or min(args.batch_sizes) < 1:
        p.error("--prompt-len, --new-tokens and --batch-sizes must be positive")
    return args


def build_model(config: DeepSeekV3Config, device: torch.device, dtype: torch.dtype) -> DeepSeekV3:
    """Random weights built on the meta device, materialised on ``device`` in ``dtype``."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters in dtype; the RoPE table stays complex64
    try:
        with torch.device("meta"):
            model = DeepSeekV3(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(
    model: DeepSeekV3, prompt: torch.Tensor, new_tokens: int, expanded: bool, warmup: int, forced: torch.Tensor | None
) -> dict:
    """Prefill + greedy decode with one cache kind; returns timings, cache sizes, the tokens and the last logits.

    With ``forced`` (B, new_tokens), those tokens are fed instead of the argmax (teacher forcing), so that two
    cache kinds see the same inputs and their logits can be compared; the work per step is the same.
    """
    device, (bsz, prompt_len) = prompt.device, prompt.shape
    cache = MLACache(
        model.config, bsz, prompt_len + new_tokens, expanded=expanded, device=device, dtype=model.embed.weight.dtype
    )
    # Untimed warm-up on the same cache (kernels, allocator), then rewind it.
    tok = model.decode(prompt, cache, last_only=True)[:, -1:].argmax(-1)
    for _ in range(min(warmup, new_tokens - 1)):
        tok = model.decode(tok, cache)[:, -1:].argmax(-1)
    cache.reset()
    _sync(device)
    start = time.perf_counter()
    logits = model.decode(prompt, cache, last_only=True)  # (B, 1, V)
    tok = logits[:, -1:].argmax(-1) if forced is None else forced[:, :1]  # (B, 1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    tokens = [tok]
    start = time.perf_counter()
    for i in range(1, new_tokens):
        logits = model.decode(tok, cache)
        tok = logits[:, -1:].argmax(-1) if forced is None else forced[:, i : i + 1]
        tokens.append(tok)
    _sync(device)
    decode_s = time.perf_counter() - start
    steps = max(new_tokens - 1, 1)
    return {
        "prefill_ms": prefill_s * 1e3,
        "step_ms": decode_s / steps * 1e3,
        "tokens_per_s": bsz * steps / decode_s,
        "bytes_per_token": cache.bytes_per_token(),
        "cache_mib": cache.nbytes / 2**20,
        "tokens": torch.cat(tokens, dim=1),
        "logits": logits[:, -1].float(),
    }


def time_attention_step(model: DeepSeekV3, bsz: int, context: int, expanded: bool, iters: int) -> float:
    """Microseconds for one MLA layer to decode one token per sequence over ``context`` cached tokens.

    Isolates what the cache kind changes (the whole-model step is dominated by kernel launches at small sizes):
    layer 0's attention, a one-layer cache of random entries, the same position written ``iters`` times.
    """
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    one_layer = dataclasses.replace(model.config, num_hidden_layers=1, first_k_dense_replace=1)
    cache = MLACache(one_layer, bsz, context + 1, expanded=expanded, device=device, dtype=dtype)
    for t in vars(cache.layers[0]).values():
        t.normal_()
    attn, (cos, sin) = model.layers[0].attn, model._rope(1, context)
    x = torch.randn(bsz, 1, model.config.hidden_size, device=device, dtype=dtype)
    for _ in range(3):
        attn(x, cos, sin, cache.layers[0], context)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        attn(x, cos, sin, cache.layers[0], context)
    _sync(device)
    return (time.perf_counter() - start) / iters * 1e6


def print_attention_table(model: DeepSeekV3, batch_sizes: list[int], context: int, iters: int) -> None:
    print(f"\nOne MLA layer, one decode step over {context} cached tokens ({iters} steps timed):\n")
    print("| batch | cache | us/step | cache bytes / time, GB/s | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for bsz in batch_sizes:
        times = {kind: time_attention_step(model, bsz, context, kind, iters) for kind in (True, False)}
        for kind, name in ((True, "expanded K/V"), (False, "latent (absorbed)")):
            cache = MLACache(model.config, 1, 1, expanded=kind, device="meta", dtype=model.embed.weight.dtype)
            per_layer = cache.bytes_per_token() // model.config.num_hidden_layers
            read = bsz * (context + 1) * per_layer / (times[kind] * 1e-6) / 1e9
            print(f"| {bsz} | {name} | {times[kind]:.0f} | {read:,.1f} | {times[True] / times[kind]:.2f}x |")


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = DeepSeekV3Config.from_preset(args.preset)
    if args.prompt_len + args.new_tokens > config.max_position_embeddings:
        raise SystemExit(
            f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the preset's "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    torch.manual_seed(0)
    model = build_model(config, device, dtype)
    h = config.num_attention_heads
    print(f"command: `python {shlex.join(sys.argv if argv is None else ['benchmarks/mla_decode.py', *argv])}`")
    print(f"machine: {machine_name(device)}; torch {torch.__version__}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    print(
        f"preset {args.preset} ({config.num_params(activated=True) / 1e6:.1f}M activated params), {args.dtype}, "
        f"{config.num_hidden_layers} layers, H={h}, C+R={config.kv_lora_rank}+{config.qk_rope_head_dim}, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy\n"
    )
    print("| batch | cache | B/token | cache MiB | prefill ms | ms/step | decode tok/s | speed-up | logits diff |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        for bsz in args.batch_sizes:
            prompt = torch.randint(0, config.vocab_size, (bsz, args.prompt_len), device=device)
            expanded = run_one(model, prompt, args.new_tokens, True, args.warmup_tokens, forced=None)
            latent = run_one(model, prompt, args.new_tokens, False, args.warmup_tokens, forced=expanded["tokens"])
            diff = (latent["logits"] - expanded["logits"]).abs().mean() / expanded["logits"].abs().mean()
            for name, r in (("expanded K/V", expanded), ("latent (absorbed)", latent)):
                speedup = r["tokens_per_s"] / expanded["tokens_per_s"]
                print(
                    f"| {bsz} | {name} | {r['bytes_per_token']:,} | {r['cache_mib']:.1f} | {r['prefill_ms']:.1f} | "
                    f"{r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | {speedup:.2f}x | "
                    f"{'' if r is expanded else f'{diff.item():.1e}'} |"
                )
            del prompt, expanded, latent
    with torch.inference_mode():
        print_attention_table(model, args.batch_sizes, args.prompt_len, args.attention_iters)
    print(
        f"\nbytes/token: over the {config.num_hidden_layers} main layers; the latent cache equals "
        f"config.kv_cache_bytes_per_token({dtype.itemsize}) = {config.kv_cache_bytes_per_token(dtype.itemsize):,}."
    )


if __name__ == "__main__":
    main()
