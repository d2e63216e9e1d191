"""The parallel layout: how many ranks replicate, shard, hold experts and run pipeline stages, and its DeviceMesh.

The mesh has the dims ``("pp", "dp_replicate", "efsdp", "ep")`` (size-1 dims kept, ``ep`` innermost so that an
EP group is a block of consecutive ranks, i.e. of GPUs of as few nodes as possible), plus two flattened dims:

- ``dp_shard`` = efsdp x ep: dense parameters are FSDP-sharded over it (HSDP with ``dp_replicate`` when > 1);
- ``dp`` = dp_replicate x efsdp x ep: every data-parallel rank reads its own tokens, and losses, gradients and
  MoE load counts are averaged or summed over it.

Expert parallelism borrows data-parallel ranks (torchtitan's design): each of the ``ep`` ranks of an EP group
holds E / ep routed experts and receives the tokens routed to them from the whole group; the experts are then
FSDP-sharded over the remaining ``("dp_replicate", "efsdp")`` ranks.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from models.config import DeepSeekV3Config

MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of the parallel layout (``trainer.strategy.init_args`` in YAML).

    Attributes:
        dp_replicate: Replicas of the (sharded) model: HSDP's replicate dim, gradients all-reduced across.
        dp_shard: Ranks each replica is FSDP-sharded over; -1 = whatever the world size leaves.
        ep: Expert-parallel degree, a divisor of ``dp_shard`` and of ``n_routed_experts``.
        pp: Pipeline stages (the mesh carries the dim; ``parallelize`` shards within a stage).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    ep: int = 1
    pp: int = 1

    def resolve(self, world_size: int) -> ParallelDims:
        """Fill ``dp_shard=-1`` from the world size and check the layout; ``ValueError`` naming the field if bad."""
        for name in ("dp_replicate", "ep", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"dp_shard must be >= 1, or -1 to use the ranks left over, got {self.dp_shard}")
        dp_shard = self.dp_shard
        if dp_shard == -1:
            rest = self.dp_replicate * self.pp
            if world_size % rest:
                raise ValueError(
                    f"dp_shard=-1: the world size {world_size} is not a multiple of dp_replicate x pp = {rest}; "
                    "choose dp_replicate and pp that divide it"
                )
            dp_shard = world_size // rest
        dims = dataclasses.replace(self, dp_shard=dp_shard)
        if dims.world_size != world_size:
            raise ValueError(
                f"the world size {world_size} is not pp x dp_replicate x dp_shard = {self.pp} x {self.dp_replicate} "
                f"x {dp_shard} = {dims.world_size}; set dp_shard: -1 to use all ranks, or change the degrees"
            )
        if dp_shard % self.ep:
            raise ValueError(
                f"ep ({self.ep}) must divide dp_shard ({dp_shard}): expert parallelism borrows the ranks that shard "
                "the dense parameters; choose ep among the divisors of dp_shard"
            )
        return dims

    @property
    def efsdp(self) -> int:
        """Ranks each expert is FSDP-sharded over inside one replica: dp_shard / ep."""
        return self.dp_shard // self.ep

    @property
    def dp(self) -> int:
        """Data-parallel ranks (each reads its own tokens): dp_replicate x dp_shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Sizes of ``MESH_DIMS``."""
        return (self.pp, self.dp_replicate, self.efsdp, self.ep)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The ``("pp", "dp_replicate", "efsdp", "ep")`` DeviceMesh with ``dp_shard`` and ``dp`` flattened.

        Needs an initialised default process group whose world size is ``self.world_size`` (call ``resolve``).
        """
        if self.dp_shard < 1:
            raise ValueError("call ParallelDims.resolve(world_size) before build_mesh: dp_shard is still -1")
        mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        mesh["efsdp", "ep"]._flatten("dp_shard")
        mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")
        return mesh

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> ParallelDims:
        """The degrees of a mesh built by ``build_mesh``."""
        if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
            raise ValueError(f"expected a mesh with dims {MESH_DIMS} (ParallelDims.build_mesh), got {mesh}")
        pp, dp_replicate, efsdp, ep = mesh.shape
        return cls(dp_replicate=dp_replicate, dp_shard=efsdp * ep, ep=ep, pp=pp)

    def check_model(self, config: DeepSeekV3Config, ranks_per_node: int | None = None) -> None:
        """Check that ``config`` fits this layout: ep divides the experts; routing groups match EP ranks or nodes.

        Args:
            config: The model config.
            ranks_per_node: Ranks (GPUs) per node, for ``routing_groups: nodes``.
        """
        if self.ep > 1 and not config.has_moe:
            raise ValueError(f"ep={self.ep} but the model has no MoE layer; set ep: 1")
        if config.has_moe and config.n_routed_experts % self.ep:
            raise ValueError(
                f"ep ({self.ep}) must divide n_routed_experts ({config.n_routed_experts}): each EP rank holds "
                "n_routed_experts / ep experts"
            )
        if config.routing_groups == "ep_ranks" and config.n_group != self.ep:
            raise ValueError(
                f"routing_groups: ep_ranks needs n_group ({config.n_group}) == ep ({self.ep}), so that group g is the "
                "experts of EP rank g; set model.overrides.n_group to ep"
            )
        if config.routing_groups == "nodes":
            self._check_node_limited(config, ranks_per_node)

    def _check_node_limited(self, config: DeepSeekV3Config, ranks_per_node: int | None) -> None:
        # EP ranks are consecutive global ranks (ep is the innermost mesh dim), so with r ranks per node the EP group
        # covers ep / r whole nodes when r divides ep, and group g = the E / n_group experts of node g.
        if ranks_per_node is None or ranks_per_node < 1:
            raise ValueError("routing_groups: nodes needs ranks_per_node (GPUs per node) to place the groups")
        if self.ep % ranks_per_node and ranks_per_node % self.ep:
            raise ValueError(
                f"routing_groups: nodes needs ep ({self.ep}) to be a multiple or a divisor of the {ranks_per_node} "
                "ranks per node, so that EP groups cover whole nodes"
            )
        nodes = max(self.ep // ranks_per_node, 1)
        if config.topk_group > nodes:
            raise ValueError(
                f"node-limited routing: topk_group (M={config.topk_group}) exceeds the {nodes} node(s) the EP group "
                f"spans (ep={self.ep}, {ranks_per_node} ranks per node); lower topk_group or spread ep over more nodes"
            )
        if config.n_group != nodes:
            raise ValueError(
                f"routing_groups: nodes needs n_group ({config.n_group}) == the {nodes} node(s) the EP group spans "
                f"(ep={self.ep}, {ranks_per_node} ranks per node), so that group g is the experts on node g"
            )


def submesh(mesh: DeviceMesh, *names: str) -> DeviceMesh:
    """``mesh[names]``, also for the flattened dims ``dp_shard`` and ``dp`` (without torch's slicing warning).

    Torch warns that slicing a flattened dim from the root mesh will go away; until then it is the one way to get
    the 2-D ``("dp_replicate", "dp_shard")`` mesh of HSDP from the mesh ``build_mesh`` returns.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim", category=UserWarning)
        return mesh[names[0] if len(names) == 1 else names]


def new_ep_backward_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """A second process group over this rank's EP group (collective: every rank of the mesh must call it).

    For schedules that run a forward and a backward at once (DualPipe's overlap): expert parallelism then issues the
    exchanges of backward passes on this group, the forward ones on the ``ep`` mesh's.
    """
    ep = mesh.shape[MESH_DIMS.index("ep")]
    group, _ = dist.new_subgroups_by_enumeration(mesh.mesh.reshape(-1, ep).tolist())
    return group
