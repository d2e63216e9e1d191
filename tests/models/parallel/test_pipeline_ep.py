"""PP 2 x EP 2 on 4 gloo CPU processes: DualPipeV with the F&B overlap and expert parallelism inside its chunks,
against one process at the same global batch.

One process trains the model for 5 SGD steps on a global batch of 8 sequences (fp32, clipping at 0.05, the
expert-bias update after every step). Each of the 4 ranks then holds 2 of the 4 stages (pp coordinate) and half of
every MoE layer's experts (ep coordinate), and runs the schedule on its dp rank's 4 rows in 4 micro-batches. Every
step must match: loss, CE, MTP and balance losses, the clipped norm, every gradient (experts gathered over ep), the
global expert loads; at the end, the expert biases and the trained weights. The EP exchanges must have run in both
threads of the overlap, forward ones on the ep group and backward ones on the second group.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from callbacks.expert_bias_balancing import bias_update
from callbacks.moe_counts import MoECounts
from models import DeepSeekV3
from models.parallel import expert_parallel
from models.parallel.clip import clip_grad_norm_
from models.parallel.mesh import ParallelDims, submesh
from models.parallel.parallelize import init_weights, parallelize
from models.parallel.pipeline import PipelineConfig, build_pipeline, prune_to_stages, stage_layer_ranges, stages_of_rank
from tests.models.parallel.test_pipeline import _config

STEPS, GLOBAL_BATCH, SEQ, N_MB = 5, 8, 16, 4
LR, MAX_NORM, GAMMA = 0.5, 0.05, 1e-2
TOL = {"rtol": 1e-5, "atol": 1e-5}
CASES = ["none", "full"]  # activation checkpointing inside the overlapped chunks


@dataclass
class Reference:
    state: dict[str, torch.Tensor]
    batches: list[torch.Tensor]
    losses: list[tuple[torch.Tensor, ...]]  # loss, ce, mtp, balance
    grads: list[dict[str, torch.Tensor]]
    norms: list[torch.Tensor]
    loads: list[dict[int, torch.Tensor]]  # layer id -> (E,) global tokens per expert
    final: dict[str, torch.Tensor]


def _update_biases(model: DeepSeekV3, group, step: int) -> dict[int, torch.Tensor]:  # noqa: ANN001
    # What ExpertBiasBalancing does after each optimizer step (the counts summed over the data-parallel group).
    counts = MoECounts(model, group=group)
    counts_LE = counts.step_counts(step)
    with torch.no_grad():
        for moe, delta_E in zip(counts.layers, bias_update(counts_LE, GAMMA), strict=True):
            moe.gate.e_score_correction_bias += delta_E
    return dict(zip(counts.layer_ids, counts_LE, strict=True))


def _sgd(model: DeepSeekV3) -> torch.optim.Optimizer:
    # SGD, not AdamW: Adam turns 1e-8 rounding differences of near-zero gradients into lr-sized steps.
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _reference() -> Reference:
    config = _config()
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(config.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]
    optimizer = _sgd(model)
    losses, grads, norms, loads = [], [], [], []
    for step, batch in enumerate(batches):
        out = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        out.loss.backward()
        losses.append(tuple(t.detach() for t in (out.loss, out.ce_loss, out.mtp_loss, out.balance_loss)))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        optimizer.step()
        optimizer.zero_grad()
        loads.append(_update_biases(model, None, step))
    return Reference(state, batches, losses, grads, norms, loads, {k: v.clone() for k, v in model.state_dict().items()})


def _run_case(ref: Reference, mesh, ac: str) -> None:  # noqa: ANN001
    config = _config()
    pipeline = PipelineConfig(schedule="DualPipeV", n_microbatches=N_MB, overlap=True)
    pp_mesh, dp_mesh = submesh(mesh, "pp"), submesh(mesh, "dp")
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    with torch.device("meta"):
        model = DeepSeekV3(config)
    prune_to_stages(model, stage_layer_ranges(config, pipeline, pp), stages_of_rank(pipeline, pp, pp_rank))
    parallelize(model, mesh, param_dtype=torch.float32, activation_checkpointing=ac, ep_backward_group=True)
    model.to_empty(device="cpu")
    init_weights(model)  # also the non-persistent buffers (RoPE table, load counters)
    own = {k: v for k, v in ref.state.items() if k in model.state_dict()}
    set_model_state_dict(model, own, options=StateDictOptions(full_state_dict=True))
    assert any(isinstance(p, DTensor) for p in model.parameters()), "experts EP-sharded"
    runner = build_pipeline(
        model, pipeline, pp_mesh.get_group(), GLOBAL_BATCH // dp_mesh.size() // N_MB, SEQ, torch.device("cpu"),
        deferred_weight_grads=ac == "none", mesh=mesh,
    )  # fmt: skip
    optimizer = _sgd(model)
    where = f"AC {ac}, rank {dist.get_rank()}"
    for step, batch in enumerate(ref.batches):
        losses = runner.step(batch.chunk(dp_mesh.size())[dp_mesh.get_local_rank()])
        got = (losses.loss, losses.ce_loss, losses.mtp_loss, losses.balance_loss)
        for name, value, want in zip(("loss", "ce", "mtp", "balance"), got, ref.losses[step], strict=True):
            torch.testing.assert_close(value, want, **TOL, msg=f"{name}, step {step}, {where}")
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            torch.testing.assert_close(grad, ref.grads[step][name], **TOL, msg=f"{name}, step {step}, {where}")
        norm = clip_grad_norm_(model.parameters(), MAX_NORM, group=pp_mesh.get_group())
        torch.testing.assert_close(norm, ref.norms[step], **TOL, msg=f"norm, step {step}, {where}")
        optimizer.step()
        optimizer.zero_grad()
        loads = _update_biases(model, dp_mesh.get_group(), step)
        assert loads, where
        for layer, load in loads.items():
            assert torch.equal(load, ref.loads[step][layer]), f"loads of layer {layer}, step {step}, {where}"
    for name, value in model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        torch.testing.assert_close(value, ref.final[name], **TOL, msg=f"trained {name}, {where}")


def _check_overlap_needs_backward_group(mesh) -> None:  # noqa: ANN001
    # Without it the two chunks' exchanges interleave on one gloo group: measured, a rank aborts (SIGABRT).
    config, pipeline = _config(), PipelineConfig(schedule="DualPipeV", n_microbatches=N_MB, overlap=True)
    pp_mesh = submesh(mesh, "pp")
    with torch.device("meta"):
        model = DeepSeekV3(config)
    prune_to_stages(
        model, stage_layer_ranges(config, pipeline, 2), stages_of_rank(pipeline, 2, pp_mesh.get_local_rank())
    )
    parallelize(model, mesh, param_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^pipeline\.overlap=true with expert parallelism .*ep_backward_group=True"):
        build_pipeline(model, pipeline, pp_mesh.get_group(), 1, SEQ, torch.device("cpu"), mesh=mesh)


def _worker(rank: int, world_size: int, rdzv: str, ref: Reference) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size)
    calls = []

    def recording(x, out_splits, in_splits, group):  # noqa: ANN001, ANN202
        calls.append((threading.current_thread().name, torch._C._current_graph_task_id() != -1, group))
        return original(x, out_splits, in_splits, group)

    original, expert_parallel.all_to_all_single = expert_parallel.all_to_all_single, recording
    try:
        mesh = ParallelDims(pp=2, ep=2).resolve(world_size).build_mesh("cpu")
        for ac in CASES:
            calls.clear()
            _run_case(ref, mesh, ac)
            forward = {id(g) for _, in_backward, g in calls if not in_backward}
            backward = {id(g) for _, in_backward, g in calls if in_backward}
            assert len(forward) == len(backward) == 1 and forward != backward, "one EP group per direction"
            # The overlap ran EP exchanges in its worker thread (backward chunks) while the schedule's thread ran
            # forward chunks.
            worker = [in_backward for thread, in_backward, _ in calls if thread == "pp-overlap-backward"]
            assert worker and all(worker), "EP exchanges in the overlapped backward chunks"
        _check_overlap_needs_backward_group(mesh)
    finally:
        expert_parallel.all_to_all_single = original
        dist.destroy_process_group()


@pytest.mark.distributed
def test_pp2_x_ep2_dualpipev_overlap_matches_one_process(tmp_path):
    ref = _reference()
    # Meaningful only if the run clips and the biases (hence the routing) move.
    assert all(n > MAX_NORM for n in ref.norms)
    assert all(v.abs().sum() > 0 for k, v in ref.final.items() if k.endswith("e_score_correction_bias"))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # fork: the children inherit the reference run.
    mp.start_processes(_worker, args=(4, str(tmp_path / "rdzv"), ref), nprocs=4, start_method="fork")
