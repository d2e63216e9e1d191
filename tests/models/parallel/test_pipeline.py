"""Pipeline parallelism on 2 gloo CPU processes against one process: losses, clipped gradients and their norm,
MoE counts over 5 steps.

Every schedule (DualPipeV with and without the F&B overlap, under each activation-checkpointing mode; ZBV;
Interleaved1F1B; 1F1B) must give the single-process losses and gradients at the same global batch, in fp32.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import DeepSeekV3, DeepSeekV3Config
from models.parallel.clip import clip_grad_norm_
from models.parallel.compile import apply_activation_checkpointing
from models.parallel.pipeline import (
    PipelineConfig,
    build_pipeline,
    prune_to_stages,
    stage_layer_ranges,
    stages_of_rank,
    validate,
)

STEPS, BATCH, SEQ = 5, 8, 16  # 5 SGD steps of a (8, 17) batch in 4 micro-batches
CASES = [  # (schedule, overlap, activation checkpointing, MTP depth)
    ("DualPipeV", True, "none", 1),
    ("DualPipeV", False, "none", 1),
    ("DualPipeV", True, "full", 1),
    ("DualPipeV", True, "selective", 1),
    ("ZBVZeroBubble", False, "none", 1),
    ("Interleaved1F1B", False, "none", 0),
    ("1F1B", False, "none", 0),
]


def _config(mtp: int = 1, **overrides) -> DeepSeekV3Config:
    base = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        max_position_embeddings=64,
        num_nextn_predict_layers=mtp,
        seq_aux_alpha=0.01,  # large enough that a lost balance-loss gradient shows above 1e-5
    )
    return DeepSeekV3Config.from_preset("tiny", **{**base, **overrides})


def _run_case(rank: int, schedule: str, overlap: bool, ac: str, mtp: int) -> None:
    config = _config(mtp)
    pp = dist.get_world_size()
    pipeline = PipelineConfig(schedule=schedule, n_microbatches=4, overlap=overlap)
    torch.manual_seed(0)
    reference = DeepSeekV3(config)
    with torch.device("meta"):
        model = DeepSeekV3(config)
    prune_to_stages(model, stage_layer_ranges(config, pipeline, pp), stages_of_rank(pipeline, pp, rank))
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if k in model.state_dict()})
    for m in (model, reference):
        apply_activation_checkpointing(m, ac)
    runner = build_pipeline(
        model, pipeline, dist.group.WORLD, BATCH // 4, SEQ, torch.device("cpu"), deferred_weight_grads=ac == "none"
    )
    ref_params = dict(reference.named_parameters())
    ref_moe = {n: m for n, m in reference.named_modules() if hasattr(m, "tokens_per_expert")}
    # SGD, not AdamW: Adam turns 1e-8 rounding differences of near-zero gradients into lr-sized steps, so the two
    # runs would drift apart by more than the pipeline's own error after a few steps.
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        tokens = torch.randint(config.vocab_size, (BATCH, SEQ + 1), generator=generator)
        out = reference(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
        out.loss.backward()
        losses = runner.step(tokens)
        where = f"{schedule} overlap={overlap} ac={ac} step {step} rank {rank}"
        for got, want in ((losses.loss, out.loss), (losses.ce_loss, out.ce_loss), (losses.mtp_loss, out.mtp_loss)):
            if want is None:
                assert got is None, where
            else:
                torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
        torch.testing.assert_close(losses.balance_loss, out.balance_loss.detach(), rtol=1e-5, atol=1e-7)
        want_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.05)
        norm = clip_grad_norm_(model.parameters(), 0.05, group=dist.group.WORLD)  # the norm over both pp ranks
        torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=1e-6, msg=lambda m, w=where: f"{w} norm: {m}")
        names = [n for n, _ in model.named_parameters()]
        assert names and set(names) <= set(ref_params), where
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name, w=where: f"{w} {n}: {m}"
            )
        for name, m in model.named_modules():
            if hasattr(m, "tokens_per_expert"):
                assert torch.equal(m.tokens_per_expert, ref_moe[name].tokens_per_expert), f"{where} {name}"
        for o in (opt, opt_ref):
            o.step()
            o.zero_grad()
    model.eval()
    reference.eval()
    with torch.no_grad():
        want = reference(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
    got = runner.evaluate(tokens)
    torch.testing.assert_close(got.ce_loss, want.ce_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert got.balance_loss is None or got.balance_loss == 0  # no balance loss in eval mode


def _worker(rank: int, world: int, rdzv: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        for case in CASES:
            start = time.perf_counter()
            _run_case(rank, *case)
            print(f"rank {rank} {case}: {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_pipeline_matches_one_process(tmp_path):
    """2 ranks x 2 stages (4 stages; 1 for 1F1B) give the single-process losses, gradients and expert counts."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(2, str(tmp_path / "rdzv")), nprocs=2, start_method="fork")


@pytest.mark.parametrize(
    ("kwargs", "pp", "batch", "field"),
    [
        (dict(schedule="DualPipeV", stages_per_rank=3), 2, None, "pipeline.stages_per_rank=3"),
        (dict(schedule="DualPipeV", n_microbatches=3), 2, None, "pipeline.n_microbatches=3"),
        (dict(schedule="DualPipeV", layers_per_stage=[1, 1, 1]), 2, None, "pipeline.layers_per_stage"),
        (dict(schedule="DualPipeV"), 3, None, "model num_hidden_layers=4"),
        (dict(schedule="DualPipeV", n_microbatches=4), 2, 6, "data.batch_size=6"),
        (dict(schedule="1F1B"), 2, None, "pipeline.schedule=1F1B"),
        (dict(schedule="Pipedream"), 2, None, "pipeline.schedule='Pipedream'"),
    ],
)
def test_bad_layouts_name_the_field(kwargs, pp, batch, field):
    with pytest.raises(ValueError, match="^" + field.replace("[", r"\[").replace(".", r"\.")) as info:
        validate(_config(), PipelineConfig(**kwargs), pp, batch)
    assert "\n" not in str(info.value)


def test_uneven_layers_per_stage():
    ranges = stage_layer_ranges(_config(), PipelineConfig(layers_per_stage=[2, 1, 1, 0]), 2)
    assert ranges == [range(0, 2), range(2, 3), range(3, 4), range(4, 4)]
    assert stages_of_rank(PipelineConfig(), 2, 0) == [0, 3]
    assert stages_of_rank(PipelineConfig(schedule="Interleaved1F1B"), 2, 1) == [1, 3]
