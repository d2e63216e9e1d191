"""ParallelDims: resolving the layout, one-line errors for bad ones, the mesh it builds, node-limited routing checks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models import DeepSeekV3Config
from models.parallel.mesh import MESH_DIMS, ParallelDims, submesh


def _config(**overrides) -> DeepSeekV3Config:
    # The report's routing: 256 experts in 8 groups, top-8 of the experts in the best 4 groups.
    return DeepSeekV3Config.from_preset("deepseek-v3-671b", **overrides)


@pytest.mark.parametrize(
    ("dims", "world", "expected"),
    [
        (ParallelDims(), 8, ParallelDims(dp_shard=8)),
        (ParallelDims(dp_replicate=2, ep=2), 8, ParallelDims(dp_replicate=2, dp_shard=4, ep=2)),
        (ParallelDims(dp_shard=4, ep=4, pp=2), 8, ParallelDims(dp_shard=4, ep=4, pp=2)),
        (ParallelDims(), 1, ParallelDims(dp_shard=1)),
    ],
)
def test_resolve_fills_dp_shard(dims, world, expected):
    resolved = dims.resolve(world)
    assert resolved == expected and resolved.world_size == world
    assert resolved.dp == resolved.dp_replicate * resolved.dp_shard
    assert resolved.efsdp * resolved.ep == resolved.dp_shard


@pytest.mark.parametrize(
    ("dims", "world", "field"),
    [
        (ParallelDims(dp_shard=2), 8, "world size 8 is not"),
        (ParallelDims(dp_replicate=3), 8, "dp_shard=-1: the world size 8"),
        (ParallelDims(dp_shard=4, ep=3), 4, r"ep \(3\) must divide dp_shard \(4\)"),
        (ParallelDims(ep=0), 4, "ep must be >= 1"),
        (ParallelDims(dp_replicate=0), 4, "dp_replicate must be >= 1"),
        (ParallelDims(dp_shard=0), 4, "dp_shard must be >= 1"),
        (ParallelDims(pp=-2), 4, "pp must be >= 1"),
    ],
)
def test_bad_layouts_get_one_line_errors(dims, world, field):
    with pytest.raises(ValueError, match=field) as err:
        dims.resolve(world)
    assert "\n" not in str(err.value)


def test_ep_must_divide_the_experts():
    with pytest.raises(ValueError, match=r"ep \(3\) must divide n_routed_experts \(256\)"):
        ParallelDims(dp_shard=3, ep=3).check_model(_config())
    no_moe = DeepSeekV3Config.from_preset("tiny", first_k_dense_replace=4, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="no MoE layer"):
        ParallelDims(dp_shard=2, ep=2).check_model(no_moe)


def test_node_limited_routing_the_reports_layout():
    # 64-way EP over 8 nodes of 8 GPUs: group g = the 32 experts of node g, each token on at most 4 nodes.
    ParallelDims(dp_shard=64, ep=64).check_model(_config(routing_groups="nodes"), ranks_per_node=8)
    # Device-limited (DeepSeek-V2): 8 groups = 8 EP ranks.
    ParallelDims(dp_shard=8, ep=8).check_model(_config(routing_groups="ep_ranks"))


@pytest.mark.parametrize(
    ("dims", "ranks_per_node", "overrides", "message"),
    [
        (ParallelDims(dp_shard=16, ep=16), 8, {}, r"topk_group \(M=4\) exceeds the 2 node"),
        (ParallelDims(dp_shard=8, ep=8), 8, {}, r"topk_group \(M=4\) exceeds the 1 node"),
        (ParallelDims(dp_shard=32, ep=32), 8, {}, r"n_group \(8\) == the 4 node"),
        (ParallelDims(dp_shard=16, ep=16), 6, {}, "multiple or a divisor"),
        (ParallelDims(dp_shard=64, ep=64), None, {}, "needs ranks_per_node"),
    ],
)
def test_node_limited_routing_errors(dims, ranks_per_node, overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        dims.check_model(_config(routing_groups="nodes", **overrides), ranks_per_node=ranks_per_node)
    assert "\n" not in str(err.value)


def test_device_limited_routing_needs_one_group_per_ep_rank():
    with pytest.raises(ValueError, match=r"n_group \(8\) == ep \(4\)"):
        ParallelDims(dp_shard=4, ep=4).check_model(_config(routing_groups="ep_ranks"))
    with pytest.raises(ValueError, match="routing_groups must be one of"):
        _config(routing_groups="racks")


def test_node_limited_groups_put_each_token_on_at_most_m_nodes():
    # Under the EP layout expert e lives on EP rank e // (E / ep); with routing_groups = nodes, node = rank // r.
    from models.moe import Gate

    config = DeepSeekV3Config.from_preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, routing_groups="nodes")
    dims, ranks_per_node = ParallelDims(dp_shard=8, ep=8), 2
    dims.check_model(config, ranks_per_node)
    gate = Gate(config)
    gate.reset_parameters(std=0.5)
    _, idx_TK, _ = gate(torch.randn(256, config.hidden_size))
    node_TK = idx_TK // (config.n_routed_experts // dims.ep) // ranks_per_node
    nodes_per_token = torch.tensor([len(set(row.tolist())) for row in node_TK])
    assert nodes_per_token.max() <= config.topk_group and nodes_per_token.max() == 2


def test_build_mesh_dims_and_flattened_groups(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    mesh = ParallelDims().resolve(1).build_mesh("cpu")
    assert mesh.mesh_dim_names == MESH_DIMS and mesh.shape == (1, 1, 1, 1)
    assert submesh(mesh, "dp").size() == submesh(mesh, "dp_shard").size() == 1
    assert ParallelDims.from_mesh(mesh) == ParallelDims(dp_shard=1)
    with pytest.raises(ValueError, match="call ParallelDims.resolve"):
        ParallelDims().build_mesh("cpu")
