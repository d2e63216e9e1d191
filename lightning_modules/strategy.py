"""``DeepSeekV3Strategy``: FSDP2 + expert parallelism inside Lightning, on one (pp, dp_replicate, efsdp, ep) mesh.

Lightning's ``ModelParallelStrategy`` already does what is generic: it starts the processes (``devices``,
``num_nodes``, torchrun, SLURM), initialises ``torch.distributed`` (NCCL on GPUs, gloo on the CPU) and calls the
LightningModule's ``configure_model`` for the parallelism to be applied there. Its mesh is only (data_parallel,
tensor_parallel), its checkpoint loading needs DTensor parameters and its optimizer states list the parameter groups
by position, so this subclass builds the DeepSeek-V3 layout (``models.parallel.mesh.ParallelDims``) and does its own
``torch.distributed.checkpoint`` (DCP) saving and loading:

* ``dp_replicate`` x ``dp_shard`` data-parallel ranks (HSDP when ``dp_replicate > 1``), of which ``ep`` consecutive
  ranks hold different routed experts (expert parallelism borrows data-parallel ranks, as in torchtitan), and ``pp``
  pipeline stages. Every data-parallel rank reads its own tokens: the datamodule gets the ``"dp"`` rank and size
  through ``distributed_sampler_kwargs``.
* precision from ``trainer.precision``, as FSDP2's ``MixedPrecisionPolicy`` (no autocast): ``bf16-mixed`` computes
  in bf16 over fp32 sharded parameters (the master weights) with fp32 gradient reduction; ``32-true`` is fp32.
* checkpoints are directories of DCP shards, written atomically (``lightning_modules.checkpoint_io``), loadable on
  another world size (a single process included); a single-file checkpoint loads too, each rank keeping its shards.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lightning_modules.checkpoint_io import (
    CheckpointError,
    commit_checkpoint_dir,
    new_checkpoint_dir,
    read_checkpoint,
    remove_checkpoint_dir,
)
from models import DeepSeekV3Config
from models.parallel.mesh import ParallelDims, submesh

# trainer.precision -> the dtype FSDP2 computes in; parameters, optimizer state and reductions stay fp32.
PARAM_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}


class FSDP2Precision(Precision):
    """``bf16-mixed`` or ``32-true`` as FSDP2 does it: no autocast, the cast is the ``MixedPrecisionPolicy``'s.

    ``parallelize`` gives every ``fully_shard`` unit ``param_dtype``: the fp32 sharded parameters are all-gathered
    in bf16 for compute, and gradients are reduced in fp32 into fp32 shards, so the optimizer (plain AdamW) updates
    fp32 master weights. Buffers (the expert biases and token counters) are never cast.
    """

    def __init__(self, precision: str) -> None:
        if precision not in PARAM_DTYPES:
            raise ValueError(
                f"trainer.precision={precision!r} is not supported by DeepSeekV3Strategy; use bf16-mixed (bf16 compute "
                "over fp32 sharded master weights, FSDP2's MixedPrecisionPolicy) or 32-true"
            )
        self.precision = precision
        self.param_dtype = PARAM_DTYPES[precision]


class DeepSeekV3Strategy(ModelParallelStrategy):
    """FSDP2 + expert (+ pipeline) parallelism for ``DeepSeekV3LitModule``, configured from the YAML.

    ``trainer.devices x trainer.num_nodes`` processes form the mesh ``(pp, dp_replicate, efsdp, ep)`` with
    ``efsdp = dp_shard / ep``; ``DeepSeekV3LitModule.configure_model`` applies ``models.parallel.parallelize`` to the
    meta-device model with it.

    Args:
        dp_replicate: Data-parallel replicas (HSDP's outer dimension, e.g. the number of nodes); 1 = plain FSDP.
        dp_shard: Ranks each parameter is sharded over (FSDP2); -1 = the world size / (dp_replicate x pp).
        ep: Expert-parallel degree: the routed experts are split over ``ep`` of the ``dp_shard`` ranks (it must
            divide ``dp_shard`` and ``n_routed_experts``).
        pp: Pipeline stages.
        start_method: How the local processes start when no launcher (torchrun, SLURM) did: ``popen`` re-runs the
            command once per extra device, as Lightning's DDP does; ``fork`` forks the current process (notebooks,
            tests; CPU only).
        process_group_backend: ``torch.distributed`` backend; default NCCL on GPUs, gloo on the CPU.
        timeout: Timeout of collectives.
    """

    strategy_name = "deepseek_v3"

    def __init__(
        self,
        dp_replicate: int = 1,
        dp_shard: int = -1,
        ep: int = 1,
        pp: int = 1,
        start_method: Literal["popen", "fork"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend, timeout=timeout)
        if start_method not in ("popen", "fork"):
            raise ValueError(f"trainer.strategy.init_args.start_method must be 'popen' or 'fork', got {start_method!r}")
        self.parallel_dims = ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep, pp=pp)
        self._start_method = start_method

    # ------------------------------------------------------------------ processes and mesh
    def _configure_launcher(self) -> None:
        # The world size is known here (devices x num_nodes): a bad layout fails before any process starts.
        self.parallel_dims.resolve(self.num_nodes * self.num_processes)
        if self.cluster_environment.creates_processes_externally:
            return
        if self._start_method == "fork":
            self._launcher = _ForkLauncher(self)
        else:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup_environment(self) -> None:
        self._setup_distributed()  # the process group: gloo on the CPU, NCCL on GPUs
        self.parallel_dims = self.parallel_dims.resolve(self.world_size)
        self._device_mesh = self.parallel_dims.build_mesh(self.root_device.type)
        self.lightning_module._device_mesh = self._device_mesh

    def check_model(self, config: DeepSeekV3Config) -> None:
        """Raise a ``ValueError`` naming the field when ``config`` does not fit the layout (before any process
        starts, when called from the CLI): ep not dividing the experts, node-limited routing that does not fit."""
        dims = self.parallel_dims.resolve(self.num_nodes * self.num_processes)
        dims.check_model(config, ranks_per_node=self.num_processes)

    @property
    def device_mesh(self) -> DeviceMesh:
        """The (pp, dp_replicate, efsdp, ep) mesh, with the flattened ``dp_shard`` and ``dp`` dimensions."""
        return super().device_mesh

    @property
    def data_parallel_group(self) -> torch.distributed.ProcessGroup:
        """The ranks that read different tokens (sum MoE counts, average losses over these)."""
        return submesh(self.device_mesh, "dp").get_group()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """The data-parallel rank and size: every ``dp`` rank reads its own tokens; pipeline stages share them."""
        dp = submesh(self.device_mesh, "dp")
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    # ------------------------------------------------------------------ precision
    @property
    def precision_plugin(self) -> FSDP2Precision:
        return self._precision_plugin if self._precision_plugin is not None else FSDP2Precision("32-true")

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # Lightning hands over the plugin of trainer.precision (autocast for bf16-mixed); FSDP2 does the casting.
        self._precision_plugin = None if plugin is None else FSDP2Precision(plugin.precision)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype FSDP2 all-gathers parameters in for compute (``trainer.precision``)."""
        return self.precision_plugin.param_dtype

    # ------------------------------------------------------------------ optimizers
    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            _check_optimizer(optimizer)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Write ``filepath`` as a directory of DCP shards plus ``meta.pt``, atomically (see ``checkpoint_io``).

        Every rank writes its shards of the model and optimizer states; rank 0 writes the rest (loops, callbacks,
        data position, hyperparameters) to ``meta.pt`` and then commits the directory.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        from torch.distributed.checkpoint import save

        path = Path(self.broadcast(str(filepath)))
        version = Path(self.broadcast(str(new_checkpoint_dir(path, checkpoint.get("global_step", 0)))))
        version.mkdir(parents=True, exist_ok=True)
        sharded = {"state_dict": checkpoint.pop("state_dict")}
        for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
            sharded[f"optimizer_{i}"] = state
        save(sharded, checkpoint_id=version)  # collective; rank 0 writes .metadata once every shard is written
        if self.is_global_zero:
            _save_durably(checkpoint, version / _METADATA_FILENAME)
            commit_checkpoint_dir(path, version)
        self.barrier("DeepSeekV3Strategy.save_checkpoint")

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """This rank's optimizer state, keyed by parameter name (pipeline stages hold different parameters)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
        return get_optimizer_state_dict(self.model, optimizer, options=_flat(cpu_offload=True))

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Load weights and optimizer states into this rank's shards, whatever layout wrote them; return the rest.

        A sharded checkpoint (directory) is read by DCP, which reshards to the current layout; a single file (a
        one-device run, ``dsv3 convert``) holds full tensors, of which each rank keeps its shards.
        """
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        module, strict = self.lightning_module, self.lightning_module.strict_loading
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        if is_sharded_checkpoint(path):
            state = {"state_dict": get_model_state_dict(module)}
            for i, optimizer in enumerate(optimizers):
                state[f"optimizer_{i}"] = get_optimizer_state_dict(module, optimizer, options=_flat())
            load(state, checkpoint_id=path)
            set_model_state_dict(module, state.pop("state_dict"), options=StateDictOptions(strict=strict))
            for i, optimizer in enumerate(optimizers):
                set_optimizer_state_dict(module, optimizer, state[f"optimizer_{i}"], options=_flat())
            return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=weights_only)
        if self.parallel_dims.pp > 1:  # its optimizer state lists the parameters of the whole model by position
            raise ValueError(
                f"--ckpt_path {path} is a single-file checkpoint, which cannot be resumed under pipeline parallelism "
                f"(trainer.strategy.init_args.pp={self.parallel_dims.pp}); start from its weights with "
                "--model.init_from (a fresh optimizer), or resume it without pp"
            )
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        full = StateDictOptions(full_state_dict=True, strict=strict)
        set_model_state_dict(module, checkpoint.pop("state_dict"), options=full)
        for optimizer, saved in zip(optimizers, checkpoint.pop("optimizer_states", []), strict=False):
            set_optimizer_state_dict(module, optimizer, _by_name(saved, module, optimizer), options=full)
        return checkpoint

    def remove_checkpoint(self, filepath: str | os.PathLike) -> None:
        if self.is_global_zero:
            remove_checkpoint_dir(Path(filepath))


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory written by ``DeepSeekV3Strategy`` (DCP shards + ``meta.pt``)."""
    return Path(path).is_dir() and (Path(path) / _METADATA_FILENAME).is_file()


def read_any_checkpoint(path: str | os.PathLike, weights: bool = True) -> dict[str, Any]:
    """A single-file checkpoint (its checksums verified when ``weights``), or a sharded one read into the same form.

    Raises:
        CheckpointError: the file or directory cannot be read.
    """
    if is_sharded_checkpoint(path):
        try:
            return read_sharded_checkpoint(path, weights=weights)
        except Exception as err:  # a partial or foreign directory
            raise CheckpointError(f"cannot read sharded checkpoint {path}: {err}") from err
    return read_checkpoint(path, mmap=True, verify=weights)


def read_sharded_checkpoint(path: str | os.PathLike, weights: bool = True) -> dict[str, Any]:
    """A sharded checkpoint as one process sees a single-file one: ``meta.pt`` plus the full ``state_dict``.

    The weights are read by DCP into a model built from the saved ``model_config`` (no process group needed, and
    whatever world size wrote them); the optimizer shards are not read.

    Args:
        path: The checkpoint directory (or the ``last.ckpt`` link to it).
        weights: Read the model weights too (else only the metadata: hyperparameters, loops, data position, ...).
    """
    from torch.distributed.checkpoint import load

    from models import DeepSeekV3

    checkpoint = torch.load(Path(path) / _METADATA_FILENAME, map_location="cpu", weights_only=True)
    if not weights:
        return checkpoint
    if "model_config" not in checkpoint:
        raise ValueError(f"{path} is a sharded checkpoint without 'model_config': was it written by dsv3 fit?")
    with torch.device("meta"):
        model = DeepSeekV3(DeepSeekV3Config.from_dict(checkpoint["model_config"]))
    model.to_empty(device="cpu")
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    load(state, checkpoint_id=Path(path))  # reassembles each tensor from the shards of every rank
    return {**checkpoint, "state_dict": state["state_dict"]}


def _flat(cpu_offload: bool = False) -> StateDictOptions:
    # Keyed by parameter name, hyperparameters included ("param_groups.<name>.lr"): each rank saves and finds its
    # own parameters' entries. The nested format's param_groups list has the same keys on every rank, which ranks
    # holding different parameters (pipeline stages) would overwrite.
    return StateDictOptions(flatten_optimizer_state_dict=True, cpu_offload=cpu_offload)


def _by_name(saved: dict[str, Any], module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A one-device optimizer state (keyed by the position of each parameter in the optimizer's groups) keyed by
    parameter name instead, for ``set_optimizer_state_dict``. The groups are built the same way (``param_groups``),
    so position i is the same parameter."""
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if sum(len(g["params"]) for g in saved["param_groups"]) != len(order):
        raise ValueError("the checkpoint's optimizer has other parameter groups than this model's; it cannot be loaded")
    return {
        "state": {order[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before the first step, an optimizer that does not fit the parameters ``parallelize`` made.

    Sharded (DTensor) parameters are fp32 masters already: MasterWeightAdamW cannot step them (its kernel reads raw
    storage). With one rank nothing is sharded and bf16 parameters need an fp32 master copy: MasterWeightAdamW.
    """
    from models.parallel.mixed_precision import MasterWeightAdamW

    params = [p for group in optimizer.param_groups for p in group["params"]]
    master = isinstance(optimizer, MasterWeightAdamW)
    if master and any(isinstance(p, DTensor) for p in params):
        raise ValueError(
            "model.optimizer=MasterWeightAdamW cannot step the sharded (DTensor) parameters of DeepSeekV3Strategy, "
            "which are the fp32 master weights already (bf16 compute with trainer.precision=bf16-mixed); use "
            "torch.optim.AdamW"
        )
    if not master and any(not isinstance(p, DTensor) and p.dtype == torch.bfloat16 for p in params):
        raise ValueError(
            f"model.optimizer={type(optimizer).__name__} would update bf16 parameters in bf16: with one rank and "
            "trainer.precision=bf16-mixed nothing is sharded and the parameters are bf16; use "
            "models.parallel.MasterWeightAdamW (fp32 master weights) or trainer.precision=32-true"
        )


def _save_durably(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class _ForkLauncher(_MultiProcessingLauncher):
    """Lightning's fork launcher, with one intra-op thread per process and no weights sent back to the parent.

    One thread: GNU OpenMP's thread pool does not survive a fork, so a forked process that runs a parallel region
    after its parent did hangs (measured: the first multi-threaded AdamW step of a 1-process fork). No weights: the
    parent never configured the model; results come back through ``trainer.callback_metrics`` and the checkpoint
    callback, as with ``ddp_fork``.
    """

    def __init__(self, strategy: DeepSeekV3Strategy) -> None:
        super().__init__(strategy, start_method="fork")

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        os.environ["OMP_NUM_THREADS"] = "1"  # read by Lightning's _set_num_threads_if_needed in the worker
        torch.set_num_threads(1)
        super()._wrapping_function(*args, **kwargs)

    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> _WorkerOutput | None:
        if self._strategy.local_rank != 0:
            return None
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None)
        return _WorkerOutput(best, None, trainer.state, results, self.get_extra_results(trainer))
