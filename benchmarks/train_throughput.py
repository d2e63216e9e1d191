"""Training throughput of this codebase against torchtitan and transformers, same shapes, one process, one GPU.

A training step is forward + next-token cross-entropy + backward (x grad-accum micro-batches) + AdamW with fp32
master weights and bf16 compute, on random tokens. Each implementation runs ``--warmup`` steps, then
``--steps`` timed steps (CUDA events); the table reports the median. MFU counts the model FLOPs of
``DeepSeekV3Config.flops_per_token`` (6 x activated matmul params incl. head + causal attention) over the
measured step time, the same for every implementation, against two peaks: ``--peak-tflops`` (default: the
device's dense bf16 datasheet peak, 989.5 on an H100/H200 SXM, the torchtitan/Megatron convention) and
``--measured-peak-tflops`` (default: the bf16 matmul rate measured in this project on such a device, 791 on an
H200); both from ``callbacks.throughput_monitor``, as the training runs log them.

Implementations (``--impl``, comma-separated):
  ours            DeepSeekV3: bf16 params + fp32-master fused AdamW, fused chunked head+CE, cuDNN attention,
                  per-block torch.compile with --compile (``--precision autocast`` for fp32 params + autocast).
  ours-parallel   ours through models.parallel.parallelize() on a one-rank mesh (what the mesh strategy does at world
                  size 1: no fully_shard, bf16 parameters but fp32 gates, MasterWeightAdamW), compiled by parallelize.
  ours-lightning  what `dsv3 fit --config <--lightning-config>` builds (DSV3CLI's own parser: Trainer, precision,
                  clipping, DeepSeekV3LitModule, optimizer, callbacks; configs/bench-1gpu.yaml: MasterWeightAdamW,
                  clip 1.0), on random tokens, no validation, checkpointing or logger.
  torchtitan      torchtitan 0.2.2's DeepSeekV3Model built from the same preset, compiled per block as its
                  ``apply_compile`` does (and its compiled loss), bf16 autocast + fused AdamW as its trainer.
  transformers    transformers' DeepseekV3ForCausalLM (sdpa attention, its default experts), fp32 params +
                  bf16 autocast + fused AdamW.

Example (one H200):
  python benchmarks/train_throughput.py --preset bench-1gpu --micro-batch 4 --compile \
      --impl ours,torchtitan,transformers --out bench_out
CPU smoke run (seconds): python benchmarks/train_throughput.py --device cpu --preset tiny --seq-len 64 --steps 2 \
      --impl ours,ours-lightning

FP8 (``--fp8``, comma-separated, each measured; docs/fp8.md): ``none`` (bf16), a recipe (``tensorwise``, ``rowwise``,
``blockwise``: dense linears and routed experts in FP8) or a recipe with ``-dense`` (experts stay bf16). ours and
ours-lightning convert with ``models.parallel.fp8`` (``model.fp8``); torchtitan with its own float8 converters
(torchao's Float8Linear for tensorwise/rowwise, torchao's rowwise FP8 grouped GEMM for the experts; no blockwise).
  python benchmarks/train_throughput.py --compile --impl ours --fp8 none,tensorwise-dense,tensorwise,blockwise
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.throughput_monitor import datasheet_peak_flops, measured_peak_flops  # noqa: E402
from models import DeepSeekV3, DeepSeekV3Config  # noqa: E402
from models.parallel.compile import apply_activation_checkpointing, compile_blocks  # noqa: E402
from models.parallel.mesh import ParallelDims  # noqa: E402
from models.parallel.mixed_precision import MasterWeightAdamW, cast_parameters, main_params  # noqa: E402
from models.parallel.parallelize import init_weights, parallelize  # noqa: E402

ADAMW = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


@dataclass
class Variant:
    """One measured configuration."""

    impl: str
    micro_batch: int
    grad_accum: int
    compile: bool
    precision: str = "master"
    ac: str = "none"
    fp8: str = "none"

    @property
    def fp8_config(self):  # noqa: ANN201 - FP8Config or None
        from models.parallel.fp8 import FP8Config

        recipe = self.fp8.removesuffix("-dense")
        return None if recipe == "none" else FP8Config(recipe, experts=not self.fp8.endswith("-dense"))


@dataclass
class Result:
    """Measurements of one variant (times in ms)."""

    variant: Variant
    status: str = "ok"
    step_ms: float = float("nan")
    step_ms_all: list[float] = field(default_factory=list)
    tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    mfu_measured_peak: float = float("nan")
    peak_mem_gib: float = float("nan")
    setup_s: float = float("nan")
    loss: float = float("nan")


# ----------------------------------------------------------------------------------------------- builders
# Each builder returns step(tokens (B, S+1)) -> loss that runs forward + backward of ONE micro-batch, and an
# optimizer; the harness runs grad_accum micro-batches and then optimizer.step() + zero_grad().


def _autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def build_ours(config: DeepSeekV3Config, v: Variant, device: torch.device, parallel: bool = False):
    with torch.device("meta"):
        model = DeepSeekV3(config)
    if v.fp8_config is not None:
        from models.parallel.fp8 import convert_to_fp8

        convert_to_fp8(model, v.fp8_config, device=device)
    if parallel and v.precision != "master":
        raise ValueError("ours-parallel runs bf16 parameters with MasterWeightAdamW only: use --precision master")
    if parallel:
        # The mesh strategy's path at world size 1: parallelize on the meta model (AC and compile inside), which
        # shards nothing and casts the parameters but the gates' to bf16; MasterWeightAdamW keeps the fp32 masters.
        mesh = _one_rank_mesh(device)
        parallelize(model, mesh, param_dtype=torch.bfloat16, activation_checkpointing=v.ac, compile=v.compile)
        model.to_empty(device=device)
        init_weights(model, buffer_device=device)
    else:
        model.to_empty(device=device)
        model.init_weights(buffer_device=device)
    model.train()
    if v.precision == "master":  # what lightning_modules.MasterWeightPrecision does, then its optimizer
        cast_parameters(model, torch.bfloat16, keep_masters=True)
        optimizer = MasterWeightAdamW(model.parameters(), **ADAMW)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **ADAMW, fused=device.type == "cuda")
    if not parallel:
        apply_activation_checkpointing(model, v.ac)
        if v.compile:
            compile_blocks(model)
    scale = 1.0 / v.grad_accum

    def step(tokens: torch.Tensor) -> torch.Tensor:
        with _autocast(device, v.precision == "autocast"):
            out = model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
        (out.loss * scale).backward()
        return out.ce_loss

    return model, optimizer, step


def _torchtitan_args(config: DeepSeekV3Config, seq_len: int, device: torch.device):
    from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs
    from torchtitan.models.moe import MoEArgs

    moe = MoEArgs(
        num_experts=config.n_routed_experts,
        num_shared_experts=config.n_shared_experts,
        score_func=config.scoring_func,
        route_norm=config.norm_topk_prob,
        route_scale=config.routed_scaling_factor,
        score_before_experts=False,
        top_k=config.num_experts_per_tok,
        num_expert_groups=config.n_group,
        num_limited_groups=config.topk_group,
        use_grouped_mm=device.type == "cuda",  # torchtitan's default on SM90; its for-loop elsewhere
    )
    args = DeepSeekV3ModelArgs(
        max_seq_len=seq_len,
        vocab_size=config.vocab_size,
        dim=config.hidden_size,
        inter_dim=config.intermediate_size,
        moe_inter_dim=config.moe_intermediate_size,
        n_layers=config.num_hidden_layers,
        n_dense_layers=config.first_k_dense_replace,
        n_heads=config.num_attention_heads,
        norm_eps=config.rms_norm_eps,
        moe_args=moe,
        q_lora_rank=config.q_lora_rank or 0,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        attn_type="sdpa",
        attn_mask_type="causal",
        original_seq_len=config.original_max_position_embeddings,
        rope_theta=config.rope_theta,
        rope_factor=config.rope_factor,
        beta_fast=int(config.beta_fast),
        beta_slow=int(config.beta_slow),
        mscale=config.mscale,
    )
    args.moe_impl = "standard"  # set by update_from_config in torchtitan's trainer
    return args


def _one_rank_mesh(device: torch.device):
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tempfile.mkdtemp()}/rdzv", rank=0, world_size=1)
    return ParallelDims().resolve(1).build_mesh(device.type)


def _stub_triton_on_cpu(device: torch.device) -> None:
    # torchtitan.models.moe imports its Triton permutation kernels at import time; the CPU smoke mode runs its
    # for-loop experts, which never call them, on machines without Triton.
    import importlib.util
    from unittest import mock

    if device.type == "cpu" and importlib.util.find_spec("triton") is None:
        import torch._dynamo.testing  # noqa: F401 - let torch settle its own "no Triton" first
        import torch._inductor.codecache  # noqa: F401

        stub = mock.MagicMock(__version__="0.0.0")
        sys.modules["triton"], sys.modules["triton.language"] = stub, stub.language
        try:
            import torchtitan.models.moe  # noqa: F401
        finally:  # torch itself must keep seeing no Triton
            del sys.modules["triton"], sys.modules["triton.language"]


def build_torchtitan(config: DeepSeekV3Config, v: Variant, device: torch.device, seq_len: int):
    from types import SimpleNamespace

    _stub_triton_on_cpu(device)

    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model
    from torchtitan.models.llama4.infra.parallelize import apply_compile

    with torch.device("meta"):
        model = DeepSeekV3Model(_torchtitan_args(config, seq_len, device))
    if v.fp8_config is not None:
        _torchtitan_fp8(model, v, device)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    loss_fn = cross_entropy_loss
    if v.compile:  # torchtitan's defaults: compile.components = ["model", "loss"]
        apply_compile(model, SimpleNamespace(backend="inductor"), ep_enabled=False)
        loss_fn = torch.compile(cross_entropy_loss, backend="inductor")
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW, fused=device.type == "cuda")
    scale = 1.0 / v.grad_accum

    def step(tokens: torch.Tensor) -> torch.Tensor:
        labels = tokens[:, 1:]
        with _autocast(device):
            logits = model(tokens[:, :-1])
            loss = loss_fn(logits, labels) / labels.numel()
        (loss * scale).backward()
        return loss

    return model, optimizer, step


def _torchtitan_fp8(model: torch.nn.Module, v: Variant, device: torch.device) -> None:
    """torchtitan's Float8LinearConverter as its trainer applies it (filter_fqns ["output"]: the head stays bf16).

    Experts: torchtitan 0.2.2's Float8GroupedMMConverter imports ``MoETrainingConfig``, which torchao 0.18 renamed;
    the same conversion (16-row token groups, expert weights wrapped for torchao's rowwise FP8 grouped GEMM) is
    applied here with torchao 0.18's ``Float8TrainingOpConfig``.
    """
    from torchtitan.components.quantization.float8 import Float8LinearConverter
    from torchtitan.config.job_config import JobConfig
    from torchtitan.distributed import ParallelDims

    cfg = v.fp8_config
    if cfg.recipe == "blockwise":
        raise ValueError("torchtitan has no blockwise FP8 recipe")
    job = JobConfig()
    job.quantize.linear.float8.recipe_name = None if cfg.recipe == "tensorwise" else cfg.recipe
    job.quantize.linear.float8.filter_fqns = ["output"]
    job.quantize.linear.float8.emulate = device.type != "cuda"  # the CPU smoke run
    job.compile.enable, job.compile.components = v.compile, ["model", "loss"]
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    Float8LinearConverter(job, dims).convert(model)
    if cfg.experts:
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig
        from torchao.quantization.quant_api import quantize_
        from torchtitan.models.moe.utils import set_token_group_alignment_size_m

        set_token_group_alignment_size_m(16)
        quantize_(model, config=Float8TrainingOpConfig(), filter_fn=lambda _, fqn: "experts" in fqn)


def _transformers_config(config: DeepSeekV3Config):
    from transformers import DeepseekV3Config as HFConfig

    return HFConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        n_shared_experts=config.n_shared_experts,
        n_routed_experts=config.n_routed_experts,
        routed_scaling_factor=config.routed_scaling_factor,
        kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=config.q_lora_rank,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        qk_nope_head_dim=config.qk_nope_head_dim,
        n_group=config.n_group,
        topk_group=config.topk_group,
        num_experts_per_tok=config.num_experts_per_tok,
        first_k_dense_replace=config.first_k_dense_replace,
        norm_topk_prob=config.norm_topk_prob,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rope_interleave=True,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=False,
        num_mtp_layers=0,
    )


def build_transformers(config: DeepSeekV3Config, v: Variant, device: torch.device):
    from transformers import DeepseekV3ForCausalLM

    hf_config = _transformers_config(config)
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = DeepseekV3ForCausalLM(hf_config)
    model.train()
    if v.compile:
        for layer in model.model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW, fused=device.type == "cuda")
    scale = 1.0 / v.grad_accum

    def step(tokens: torch.Tensor) -> torch.Tensor:
        labels = tokens[:, 1:]
        with _autocast(device):
            logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        (loss * scale).backward()
        return loss

    return model, optimizer, step


class RandomTokens(LightningDataModule):
    """The benchmark's data under the config's ``data:`` keys: random (B, S+1) token rows, 4 x B of them cycled,
    as the other peers get (the corpus and tokenizer keys of ``PretrainDataModule`` are not read)."""

    def __init__(
        self,
        vocab_size: int = 32768,
        seq_len: int = 4096,
        batch_size: int = 4,
        num_workers: int = 0,
        val_batches: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        rows = torch.randint(0, self.vocab_size, (4 * self.batch_size, self.seq_len + 1), generator=gen)
        return DataLoader(_Cycle(rows), batch_size=self.batch_size, pin_memory=True)


class _Cycle(IterableDataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __iter__(self):  # noqa: ANN204
        return itertools.cycle(self.rows)


def lightning_cli_args(config: DeepSeekV3Config, v: Variant, args: argparse.Namespace, device: torch.device) -> list:
    """``dsv3 fit`` flags on top of ``--lightning-config``: the variant's shape and steps, no logger, no validation,
    the config's checkpoint and preemption callbacks are dropped before fit."""
    flags = {
        "model.preset": args.preset,
        "model.compile": v.compile,
        "model.activation_checkpointing": v.ac,
        "data.vocab_size": config.vocab_size,  # the preset's vocabulary, as the other peers
        "data.seq_len": args.seq_len,
        "data.batch_size": v.micro_batch,
        "trainer.accumulate_grad_batches": v.grad_accum,
        "trainer.max_steps": args.warmup + args.steps,
        "trainer.logger": False,
        "trainer.limit_val_batches": 0,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
    }
    if args.preset == "tiny":
        flags["model.overrides"] = json.dumps({"max_position_embeddings": args.seq_len})
    if v.fp8_config is not None:
        flags["model.fp8"] = json.dumps(asdict(v.fp8_config))
    if device.type != "cuda":
        flags.update({"trainer.accelerator": "cpu", "trainer.devices": 1})  # the YAML's precision, on the CPU
    return ["--config", args.lightning_config, *(f"--{k}={v}" for k, v in flags.items())]


def measure_lightning(config: DeepSeekV3Config, v: Variant, args: argparse.Namespace, device: torch.device) -> Result:
    """The user path: what ``dsv3 fit --config <--lightning-config>`` builds, through the CLI's own parser.

    Trainer (precision, gradient clipping), ``DeepSeekV3LitModule`` (optimizer, schedule, compile) and the config's
    callbacks come from ``DSV3CLI(run=False)``, with ``lightning_cli_args``' flags on top; the data are random
    tokens (``RandomTokens``). Step times are CUDA events at the start of each optimizer step's first micro-batch
    (the Trainer's own loop, callbacks, logging and clipping included).
    """
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks import Preemption
    from lightning_modules.cli import DSV3CLI

    result, timer = Result(v), _Timer(device)
    t0 = time.perf_counter()

    class StepTimer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx % v.grad_accum == 0:
                step = batch_idx // v.grad_accum
                if step == args.warmup:
                    _sync(device)
                    result.setup_s = time.perf_counter() - t0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                timer.mark()

        def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            timer.mark()

    cli = DSV3CLI(
        args=lightning_cli_args(config, v, args, device),
        run=False,
        datamodule_class=RandomTokens,
        trainer_defaults={"callbacks": [StepTimer()]},  # appended to the config's callbacks
        save_config_callback=None,  # no logger, so it would write config.yaml into the working directory
    )
    # The config's checkpoint callback (and Preemption, which saves through it) stay out: no checkpoints written.
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint | Preemption)]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    times = timer.intervals_ms()[args.warmup :]
    _fill(result, times, config, v, args, device)
    result.loss = float(cli.trainer.callback_metrics.get("train/loss", float("nan")))
    return result


# ----------------------------------------------------------------------------------------------- harness
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Per-step wall time from CUDA events (host clock after a sync on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.events.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        _sync(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.events, self.events[1:], strict=False)]


def _builder(impl: str) -> Callable:
    builders = {
        "ours": lambda c, v, d, s: build_ours(c, v, d),
        "ours-parallel": lambda c, v, d, s: build_ours(c, v, d, parallel=True),
        "torchtitan": build_torchtitan,
        "transformers": lambda c, v, d, s: build_transformers(c, v, d),
    }
    if impl not in builders:
        raise ValueError(f"--impl {impl!r} unknown; choose from {sorted(builders)}")
    return builders[impl]


def measure(config: DeepSeekV3Config, v: Variant, args: argparse.Namespace, device: torch.device) -> Result:
    """Build one implementation, run warm-up and timed steps, return the median step."""
    if v.impl == "ours-lightning":
        return measure_lightning(config, v, args, device)
    result = Result(v)
    t0 = time.perf_counter()
    model, optimizer, step = _builder(v.impl)(config, v, device, args.seq_len)
    gen = torch.Generator(device="cpu").manual_seed(0)
    n_batches = 4  # a few distinct batches, so routing varies from step to step
    batches = [
        torch.randint(0, config.vocab_size, (v.micro_batch, args.seq_len + 1), generator=gen).to(device)
        for _ in range(n_batches)
    ]
    timer = _Timer(device)
    losses = []
    profiling = args.profile and v.impl.startswith("ours")
    prof = _profiler(args, v) if profiling else contextlib.nullcontext()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(device)
            result.setup_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        if i >= args.warmup:
            timer.mark()
        for j in range(v.grad_accum):
            losses.append(step(batches[(i * v.grad_accum + j) % n_batches]))
        if args.clip_grad_norm > 0:  # as torchtitan's trainer (max_norm 1.0) and the Lightning path do
            torch.nn.utils.clip_grad_norm_(main_params(optimizer), args.clip_grad_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i == args.warmup + args.steps - 3 and profiling:
            prof.__enter__()
    timer.mark()
    if profiling:
        prof.__exit__(None, None, None)
        _write_profile(prof, args, v)
    _fill(result, timer.intervals_ms(), config, v, args, device)
    result.loss = float(losses[-1].detach())
    del model, optimizer, step, batches, losses
    return result


def _fill(
    result: Result, times: list[float], config: DeepSeekV3Config, v: Variant, args: argparse.Namespace, device
) -> None:  # noqa: ANN001
    result.step_ms_all = [round(t, 3) for t in times]
    result.step_ms = statistics.median(times)
    tokens = v.micro_batch * v.grad_accum * args.seq_len
    result.tokens_per_s = tokens / (result.step_ms / 1e3)
    model_flops = config.flops_per_token(args.seq_len) * result.tokens_per_s
    result.mfu = model_flops / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan")
    if args.measured_peak_tflops:
        result.mfu_measured_peak = model_flops / (args.measured_peak_tflops * 1e12)
    if device.type == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30


def _profiler(args: argparse.Namespace, v: Variant):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def _write_profile(prof, args: argparse.Namespace, v: Variant) -> None:  # noqa: ANN001
    name = f"profile_{v.impl}_mb{v.micro_batch}_ga{v.grad_accum}_{v.precision}_{v.fp8}_{'c' if v.compile else 'e'}.txt"
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=150, max_name_column_width=110)
    (Path(args.out) / name).write_text(table)
    print(table[:6000], flush=True)


def _cleanup(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- report
def _fmt(x: float, spec: str) -> str:
    return "—" if x != x else format(x, spec)  # NaN -> dash


def markdown(results: list[Result], args: argparse.Namespace, device: torch.device, header: str) -> str:
    """The results table with ratios to each peer at the same micro-batch and grad-accum."""
    peers = {}  # (impl, micro-batch, grad-accum) -> tokens/s, the compiled run preferred
    for r in sorted(results, key=lambda r: r.variant.compile):
        if r.status == "ok" and r.variant.impl in ("torchtitan", "transformers"):
            peers[(r.variant.impl, r.variant.micro_batch, r.variant.grad_accum)] = r.tokens_per_s
    own_bf16 = {
        _same_but_fp8(r.variant): r.tokens_per_s for r in results if r.status == "ok" and r.variant.fp8 == "none"
    }
    lines = [
        header,
        "",
        "| impl | precision | fp8 | compile | AC | micro-batch | grad-accum | tokens/s | step ms | MFU "
        "| MFU of measured peak | peak GiB | x own bf16 | x torchtitan (compiled if run) | x transformers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        v = r.variant
        ratios = []
        for peer in ("torchtitan", "transformers"):
            ref = peers.get((peer, v.micro_batch, v.grad_accum))
            ratios.append(_fmt(r.tokens_per_s / ref, ".2f") if ref and r.status == "ok" else "—")
        bf16 = own_bf16.get(_same_but_fp8(v))
        vs_bf16 = _fmt(r.tokens_per_s / bf16, ".3f") if bf16 and r.status == "ok" and v.fp8 != "none" else "—"
        precision = v.precision if v.impl.startswith("ours") else "autocast"
        lines.append(
            f"| {v.impl} | {precision} | {v.fp8} | {'yes' if v.compile else 'no'} | {v.ac} | {v.micro_batch} "
            f"| {v.grad_accum} | {_fmt(r.tokens_per_s, ',.0f') if r.status == 'ok' else r.status} "
            f"| {_fmt(r.step_ms, '.1f')} | {_fmt(100 * r.mfu, '.1f')} % | {_fmt(100 * r.mfu_measured_peak, '.1f')} % "
            f"| {_fmt(r.peak_mem_gib, '.1f')} | {vs_bf16} | {ratios[0]} | {ratios[1]} |"
        )
    return "\n".join(lines)


def _same_but_fp8(v: Variant) -> tuple:
    """The key of the variant's bf16 twin: every field but ``fp8``."""
    return (v.impl, v.micro_batch, v.grad_accum, v.compile, v.precision, v.ac)


def _header(config: DeepSeekV3Config, args: argparse.Namespace, device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"`python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`\n\n"
        f"{gpu}, torch {torch.__version__}, {date}; preset {args.preset}, seq {args.seq_len}, "
        f"{config.num_params() / 1e9:.2f}B params, {config.flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token, "
        f"MFU of {args.peak_tflops or float('nan'):g} TFLOP/s (datasheet dense bf16) and of "
        f"{args.measured_peak_tflops or float('nan'):g} (measured); median of {args.steps} steps after {args.warmup} "
        "warm-up"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-1gpu")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", default="4", help="comma-separated list: each is measured")
    p.add_argument("--grad-accum", default="1", help="comma-separated list: each is measured")
    p.add_argument("--impl", default="ours,torchtitan,transformers", help="suffix -eager: no compile for that one")
    p.add_argument("--compile", action="store_true", help="per-block torch.compile (ours, torchtitan)")
    p.add_argument("--precision", default="master", help="ours: master (bf16 params) and/or autocast, comma list")
    p.add_argument("--ac", default="none", help="ours: activation checkpointing none|selective|full, comma list")
    p.add_argument(
        "--fp8", default="none", help="comma list of none|tensorwise|rowwise|blockwise, each optionally -dense"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="MFU peak of one device (default: its dense bf16 datasheet peak)")
    p.add_argument(
        "--measured-peak-tflops", type=float, help="second MFU peak (default: the bf16 matmul rate measured here)"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--lightning-config",
        default=str(Path(__file__).resolve().parents[1] / "configs" / "bench-1gpu.yaml"),
        help="ours-lightning: the dsv3 fit config to build (default: configs/bench-1gpu.yaml)",
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler table of the last 2 steps")
    p.add_argument(
        "--clip-grad-norm",
        type=float,
        default=0.0,
        help="clip the total grad norm (0 = off); ours-lightning clips as its YAML says",
    )
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def variants(args: argparse.Namespace) -> list[Variant]:
    out = []
    for name in args.impl.split(","):
        impl = name.removesuffix("-eager")
        if impl != "ours-lightning":
            _builder(impl)  # unknown names fail before anything runs
        compiled = args.compile and impl == name and impl != "transformers"  # transformers: eager, as it ships
        for mb in (int(x) for x in args.micro_batch.split(",")):
            for ga in (int(x) for x in args.grad_accum.split(",")):
                if not impl.startswith("ours"):
                    out.append(Variant(impl, mb, ga, compiled, "autocast", "none"))
                    continue
                if impl == "ours-lightning":  # precision and optimizer come from --lightning-config
                    out.extend(Variant(impl, mb, ga, compiled, "yaml", ac) for ac in args.ac.split(","))
                    continue
                for precision in args.precision.split(","):
                    for ac in args.ac.split(","):
                        out.append(Variant(impl, mb, ga, compiled, precision, ac))
    fp8s = args.fp8.split(",")
    for name in fp8s:
        Variant("ours", 1, 1, False, fp8=name).fp8_config  # noqa: B018 - an unknown recipe fails before anything runs
    return [replace(v, fp8=f) for v in out for f in fp8s if f == "none" or v.impl != "transformers"]


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    device = torch.device(args.device)
    for name, lookup in (("peak_tflops", datasheet_peak_flops), ("measured_peak_tflops", measured_peak_flops)):
        if getattr(args, name) is None and lookup(device) is not None:
            setattr(args, name, lookup(device) / 1e12)
    overrides = {"max_position_embeddings": max(args.seq_len, 1)} if args.preset == "tiny" else {}
    config = DeepSeekV3Config.from_preset(args.preset, **overrides)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    header = _header(config, args, device)
    results = []
    for v in variants(args):
        print(f"== {v}", flush=True)
        try:
            r = measure(config, v, args, device)
        except torch.OutOfMemoryError:
            r = Result(v, status="OOM")
        except Exception as e:  # noqa: BLE001 - one failing peer must not lose the others' numbers
            r = Result(v, status=f"error: {type(e).__name__}")
            print(f"   failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        _cleanup(device)
        results.append(r)
        print(
            f"   {r.status} {r.tokens_per_s:,.0f} tok/s, {r.step_ms:.1f} ms, MFU {100 * r.mfu:.1f} % "
            f"({100 * r.mfu_measured_peak:.1f} % of measured), "
            f"{r.peak_mem_gib:.1f} GiB, loss {r.loss:.3f}, setup {r.setup_s:.0f} s",
            flush=True,
        )
        name = f"{v.impl}_mb{v.micro_batch}_ga{v.grad_accum}_{v.precision}_{v.ac}_{v.fp8}_{'ce'[not v.compile]}.json"
        (Path(args.out) / name).write_text(json.dumps(asdict(r), indent=1))
    table = markdown(results, args, device, header)
    (Path(args.out) / "table.md").write_text(table + "\n")
    print("\n" + table)
    return results


if __name__ == "__main__":
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    main()
