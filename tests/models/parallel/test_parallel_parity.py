"""FSDP2, expert parallelism and both together on 2 and 4 gloo ranks give the one-process training run.

One process trains the tiny model for 5 steps on a global batch of 8 sequences (fp32, AdamW, clipping at 0.5, the
expert-bias update after each step). Each layout then loads the same initial state dict, every data-parallel rank
trains on its slice of the same global batches, and each step must match: the mean loss, every gradient (gathered
from its shards), the clipped total norm, the global expert loads; at the end the expert biases are identical on
every rank and equal to the one-process ones, and so are the trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from callbacks.expert_bias_balancing import bias_update
from callbacks.moe_counts import MoECounts
from lightning_modules.module import param_groups
from models import DeepSeekV3, DeepSeekV3Config
from models.parallel import expert_parallel
from models.parallel.clip import clip_grad_norm_
from models.parallel.mesh import ParallelDims, submesh
from models.parallel.parallelize import init_weights, parallelize

STEPS, GLOBAL_BATCH, SEQ = 5, 8, 16
LR, MAX_NORM, GAMMA = 1e-3, 0.5, 1e-2
TOL = {"rtol": 1e-5, "atol": 1e-5}


@dataclass
class Reference:
    """The one-process run: initial state, batches, and per step loss, gradients, norm and global loads."""

    config: DeepSeekV3Config
    state: dict[str, torch.Tensor]
    batches: list[torch.Tensor]
    losses: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]
    norms: list[torch.Tensor]
    loads: list[torch.Tensor]
    final: dict[str, torch.Tensor]


def _forward_backward(model: DeepSeekV3, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
    out.loss.backward()
    return out.loss.detach()


def _optimizer(model: DeepSeekV3) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model), lr=LR, weight_decay=0.1)


def _seeded_init(model: DeepSeekV3) -> None:
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    init_weights(model)


def _reference(config: DeepSeekV3Config) -> Reference:
    with torch.device("meta"):
        model = DeepSeekV3(config)
    _seeded_init(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]
    optimizer = _optimizer(model)
    losses, grads, norms, loads = [], [], [], []
    for batch in batches:
        losses.append(_forward_backward(model, batch))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        optimizer.step()
        optimizer.zero_grad()
        loads.append(_update_biases(model, group=None, step=len(loads)))
    return Reference(config, state, batches, losses, grads, norms, loads, _full_state(model))


@torch.no_grad()
def _update_biases(model: DeepSeekV3, group, step: int) -> torch.Tensor:  # noqa: ANN001
    # What ExpertBiasBalancing does after each optimizer step, with the reduction over the data-parallel group.
    counts = MoECounts(model, group=group)
    counts_LE = counts.step_counts(step)
    for moe, delta_E in zip(counts.layers, bias_update(counts_LE, GAMMA), strict=True):
        moe.gate.e_score_correction_bias += delta_E
    return counts_LE


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.clone() for k, v in state.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _run_layout(ref: Reference, dims: ParallelDims, activation_checkpointing: str, **kwargs) -> None:
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = DeepSeekV3(ref.config)
    parallelize(model, mesh, param_dtype=torch.float32, activation_checkpointing=activation_checkpointing, **kwargs)
    _seeded_init(model)
    for name, value in _full_state(model).items():  # the sharded init is the one-process init of the same seed
        assert torch.equal(value, ref.state[name]), f"init of {name} differs from one process, {dims}"
    # Parity below does not rest on that: both sides start from one state dict.
    set_model_state_dict(model, dict(ref.state), options=StateDictOptions(full_state_dict=True))  # it edits the dict
    _check_param_groups(model, ref.config)
    if dims.ep > 1:  # experts: FSDP over efsdp (along E, or along the hidden dim when efsdp > local experts), then EP
        w1 = model.layers[1].ffn.experts.w1
        fsdp_dim = 1 if dims.efsdp > ref.config.n_routed_experts // dims.ep else 0
        assert w1.device_mesh.mesh_dim_names[-1] == "ep" and w1.placements[-1] == Shard(0)
        assert dims.efsdp == 1 or w1.placements[-2].dim == fsdp_dim, w1.placements
    optimizer = _optimizer(model)
    dp = submesh(mesh, "dp")
    where = f"{dims}, AC {activation_checkpointing}, {kwargs}"
    for step, batch in enumerate(ref.batches):
        loss = _forward_backward(model, batch.chunk(dp.size())[dp.get_local_rank()])
        dist.all_reduce(loss, group=dp.get_group())
        torch.testing.assert_close(loss / dp.size(), ref.losses[step], **TOL, msg=f"loss, step {step}, {where}")
        for name, p in model.named_parameters():
            torch.testing.assert_close(_full(p.grad), ref.grads[step][name], **TOL, msg=f"{name}, step {step}, {where}")
        norm = clip_grad_norm_(model.parameters(), MAX_NORM)
        torch.testing.assert_close(norm, ref.norms[step], **TOL, msg=f"grad norm, step {step}, {where}")
        optimizer.step()
        optimizer.zero_grad()
        loads = _update_biases(model, group=dp.get_group(), step=step)
        torch.testing.assert_close(loads, ref.loads[step], rtol=0, atol=0, msg=f"loads, step {step}, {where}")
    biases = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()])
    everyone = [torch.empty_like(biases) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, biases)
    for other in everyone:
        assert torch.equal(other, biases), f"expert biases differ across ranks, {where}"
    final = _full_state(model)
    for name, value in ref.final.items():
        torch.testing.assert_close(final[name], value, **TOL, msg=f"trained {name}, {where}")


def _check_param_groups(model: DeepSeekV3, config: DeepSeekV3Config) -> None:
    # Weight decay on matrices, none on 1-D parameters, judged by the DTensors' global shapes, as on one process.
    with torch.device("meta"):
        plain = DeepSeekV3(config)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {id(p): n for n, p in plain.named_parameters()}
    got = [sorted(names[id(p)] for p in g["params"]) for g in param_groups(model)]
    expected = [sorted(plain_names[id(p)] for p in g["params"]) for g in param_groups(plain)]
    assert got == expected and got[1] and all("norm" in n for n in got[1])
    assert any(isinstance(p, DTensor) for p in model.parameters())


def _worker(rank: int, world_size: int, rdzv: str, ref: Reference, layouts: list[tuple]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world_size)
    try:
        for dims, ac, *kwargs in layouts:
            if kwargs and kwargs[0].get("ep_backward_group"):
                _run_with_backward_group(ref, ParallelDims(**dims).resolve(world_size), ac)
            else:
                _run_layout(ref, ParallelDims(**dims).resolve(world_size), ac)
    finally:
        dist.destroy_process_group()


def _run_with_backward_group(ref: Reference, dims: ParallelDims, activation_checkpointing: str) -> None:
    # Same parity, and every exchange issued inside a backward pass (the all-to-alls' backward, AC's replay) runs on
    # the second group, every forward one on the ep group.
    calls = []

    def recording(x, out_splits, in_splits, group):  # noqa: ANN001, ANN202
        calls.append((torch._C._current_graph_task_id() != -1, group))
        return original(x, out_splits, in_splits, group)

    original, expert_parallel.all_to_all_single = expert_parallel.all_to_all_single, recording
    try:
        _run_layout(ref, dims, activation_checkpointing, ep_backward_group=True)
    finally:
        expert_parallel.all_to_all_single = original
    forward = {id(g) for in_backward, g in calls if not in_backward}
    backward = {id(g) for in_backward, g in calls if in_backward}
    assert len(forward) == len(backward) == 1 and forward != backward, "one group per direction"
    # Per step and MoE layer: forward = counts + dispatch + combine; backward = their reverse (2) + AC's replay (3;
    # under selective AC the replay's exchanges return the saved outputs, but the Python call is still made).
    n_moe = len(ref.loads[0])
    assert len(calls) == STEPS * n_moe * (3 + 2 + (3 if activation_checkpointing != "none" else 0))


def _spawn(tmp_path, world_size: int, layouts: list[tuple[dict, str]], config: DeepSeekV3Config) -> None:  # noqa: ANN001
    ref = _reference(config)
    # The parity is only meaningful if the run clips, moves the weights far beyond the tolerance, and moves the biases
    # (hence the routing).
    assert all(n > MAX_NORM for n in ref.norms)
    assert (ref.final["layers.1.ffn.experts.w1"] - ref.state["layers.1.ffn.experts.w1"]).abs().max() > 100 * TOL["atol"]
    if config.num_experts_per_tok < config.n_routed_experts:  # with a routing choice, the loads are uneven
        assert all(v.abs().sum() > 0 for k, v in ref.final.items() if k.endswith("e_score_correction_bias"))
    # fork, not spawn: the children inherit the imported modules and the reference run.
    args = (world_size, f"file://{tmp_path}/rdzv", ref, layouts)
    mp.start_processes(_worker, args=args, nprocs=world_size, join=True, start_method="fork")


@pytest.mark.distributed
def test_two_ranks_fsdp_and_ep_match_one_process(tmp_path, tiny_config, one_thread):
    layouts = [
        ({"dp_shard": 2}, "none"),
        ({"dp_shard": 2, "ep": 2}, "full"),
        ({"dp_shard": 2, "ep": 2}, "selective", {"ep_backward_group": True}),  # what DualPipe's overlap needs
    ]
    _spawn(tmp_path, 2, layouts, tiny_config)


@pytest.mark.distributed
def test_four_ranks_fsdp_x_ep_and_hsdp_match_one_process(tmp_path, tiny_config, one_thread):
    layouts = [
        ({"dp_shard": 4, "ep": 2}, "none"),  # experts: 2 EP ranks x 2 efsdp shards
        ({"dp_shard": 4, "ep": 4}, "none"),
        ({"dp_replicate": 2, "ep": 2}, "selective"),  # HSDP: 2 replicas of dp_shard 2 = ep 2
    ]
    _spawn(tmp_path, 4, layouts, tiny_config)


@pytest.mark.distributed
def test_four_ranks_experts_sharded_along_the_hidden_dim(tmp_path, tiny_config, one_thread):
    # 2 experts over ep 2: one per EP rank, fewer than its 2 efsdp ranks, so FSDP2 shards the experts' hidden dim.
    # Top-2 of 2: no routing choice a rounding difference could flip.
    config = DeepSeekV3Config.from_dict(
        {**tiny_config.to_dict(), "n_routed_experts": 2, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1}
    )
    _spawn(tmp_path, 4, [({"dp_shard": 4, "ep": 2}, "none")], config)
