"""DeepSeekV3Strategy through the Trainer on gloo CPU processes, against one process at the same global batch.

Every run is the CLI's own config (configs/tiny.yaml shrunk by ``small_args``) with ``data.order: global``, so the
global batches are the same at every world size, and starts from one saved state dict, so the weights are too. One
process with batch 4 is the reference; 2 ranks with batch 2 and 4 ranks with batch 1 under FSDP2, EP and both must
give its losses (the mean over data-parallel ranks, fp32, 1e-5) and keep every rank's expert biases identical. The
4-rank run checkpoints at step 3; resuming that sharded checkpoint on 4 ranks gives bitwise the same losses, on 2
ranks the same losses to 1e-5; ``dsv3 convert`` turns the last one into a single file and an HF folder that one
process loads with the trained weights. The runs are shared by the tests of this file (module-scoped fixture).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from lightning_modules.cli import DSV3CLI, main
from models import DeepSeekV3
from tests.lightning_modules.conftest import small_args

STEPS, SAVE_AT, GLOBAL_BATCH = 6, 3, 4
STRATEGY = "lightning_modules.strategy.DeepSeekV3Strategy"

pytestmark = pytest.mark.distributed


class Record(Callback):
    """Start from ``init`` (a full state dict); record the data-parallel mean loss of every step, each rank's expert
    biases and the loss of a fixed probe batch at the end, into ``out``."""

    def __init__(self, init: Path, out: Path) -> None:
        self.init, self.out, self.losses = init, out, []

    def on_fit_start(self, trainer, pl_module) -> None:  # before a checkpoint is restored: resuming wins
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(pl_module.model, torch.load(self.init, weights_only=True), options=options)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if dist.is_initialized():
            group = trainer.strategy.data_parallel_group
            dist.all_reduce(loss, group=group)
            loss /= dist.get_world_size(group)
        self.losses.append(loss.item())

    def on_train_end(self, trainer, pl_module) -> None:
        model = pl_module.model
        biases = [moe.gate.e_score_correction_bias.clone() for moe in model.moe_layers()]
        probe = probe_batch(model.config.vocab_size)
        with torch.no_grad():
            model.eval()
            probe_loss = model(probe[:, :-1], labels=probe[:, 1:], return_logits=False).ce_loss.item()
            model.train()
        torch.save(
            {"losses": self.losses, "biases": biases, "probe": probe_loss}, self.out / f"rank{trainer.global_rank}.pt"
        )


def probe_batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))


def fit(
    root: Path, tag: str, devices: int = 1, ckpt_path: str | None = None, save: bool = False, **strategy: int
) -> list[dict]:
    """Train to step ``STEPS`` on ``devices`` ranks (one plain process without ``strategy``); ``save`` checkpoints
    every ``SAVE_AT`` steps as ``step{N}.ckpt``."""
    out = root / tag
    out.mkdir()
    args = small_args(out, max_steps=STEPS, devices=devices, deterministic=True)
    args += ["--data.order=global", f"--data.batch_size={GLOBAL_BATCH // devices}"]
    every = SAVE_AT if save else 10 * STEPS
    args += [f"--trainer.callbacks.init_args.{k}" for k in (f"every_n_train_steps={every}", "save_top_k=-1")]
    args += ["--trainer.callbacks.init_args.monitor=null", "--trainer.callbacks.init_args.filename=step{step:06d}"]
    args += ["--trainer.callbacks.init_args.last_every_n_train_steps=0"]  # last.ckpt at the end only
    if strategy:
        args += [f"--trainer.strategy={STRATEGY}", "--trainer.strategy.init_args.start_method=fork"]
        args += [f"--trainer.strategy.init_args.{k}={v}" for k, v in strategy.items()]
    cli = DSV3CLI(args=args, run=False)
    init = root / "init.pt"
    if not init.exists():
        torch.manual_seed(0)
        torch.save(DeepSeekV3(cli.model.config).state_dict(), init)
    cli.trainer.callbacks.append(Record(init, out))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    ranks[0]["logged"] = float(cli.trainer.callback_metrics["train/loss"])  # rank 0's logged last-step loss
    return ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("strategy")
    results = {"single": fit(root, "single", save=True)}
    results["fsdp"] = fit(root, "fsdp", devices=2, dp_shard=2)
    results["ep"] = fit(root, "ep", devices=2, dp_shard=2, ep=2)
    results["fsdp_ep"] = fit(root, "fsdp_ep", devices=4, save=True, dp_shard=4, ep=2)  # experts: 2 EP x 2 FSDP
    saved = str(checkpoint(root / "fsdp_ep", SAVE_AT))
    results["resumed"] = fit(root, "resumed", devices=4, ckpt_path=saved, dp_shard=4, ep=2)
    results["resumed2"] = fit(root, "resumed2", devices=2, ckpt_path=saved, dp_shard=2)
    results["resumed1"] = fit(root, "resumed1", devices=1, ckpt_path=saved, dp_shard=1)  # plain tensors, no FSDP
    one_file = str(checkpoint(root / "single", SAVE_AT))  # a one-device run's checkpoint, continued on 2 ranks
    results["from_single"] = fit(root, "from_single", devices=2, ckpt_path=one_file, dp_shard=2, ep=2)
    results["root"] = root
    return results


def checkpoint(run: Path, step: int) -> Path:
    (path,) = (run / "ckpt").glob(f"step{step:06d}*.ckpt")
    return path


def _check_like(results: list[dict], reference: dict, first_step: int = 0) -> None:
    """Every rank: the reference's losses from ``first_step`` on and its final biases, the same on all ranks."""
    assert any(bias.abs().sum() > 0 for bias in reference["biases"])  # the balancing moved them
    assert results[0]["logged"] == pytest.approx(reference["losses"][-1], rel=1e-5)  # train/loss: the dp mean
    for rank in results:
        torch.testing.assert_close(rank["losses"], reference["losses"][first_step:], rtol=1e-5, atol=1e-5)
        for bias, bias0, ref in zip(rank["biases"], results[0]["biases"], reference["biases"], strict=True):
            assert torch.equal(bias, bias0)  # every rank holds the same biases
            torch.testing.assert_close(bias, ref)


@pytest.mark.parametrize("layout", ["fsdp", "ep", "fsdp_ep"])
def test_ranks_give_the_single_process_losses_and_biases(runs, layout):
    assert len(runs["single"][0]["losses"]) == STEPS
    _check_like(runs[layout], runs["single"][0])


def test_resume_is_exact_and_works_on_another_world_size(runs):
    straight = runs["fsdp_ep"][0]["losses"]
    assert runs["resumed"][0]["losses"] == straight[SAVE_AT:]  # bitwise: a deterministic run
    _check_like(runs["resumed2"], runs["fsdp_ep"][0], first_step=SAVE_AT)  # 4 ranks -> 2, EP off
    _check_like(runs["resumed1"], runs["fsdp_ep"][0], first_step=SAVE_AT)  # 4 ranks -> 1 process


def test_a_one_device_checkpoint_continues_sharded(runs):
    _check_like(runs["from_single"], runs["single"][0], first_step=SAVE_AT)


@pytest.mark.parametrize(
    ("devices", "layout", "overrides", "message"),
    [
        (2, {"dp_shard": 3}, {}, "the world size 2 is not pp x dp_replicate x dp_shard"),
        (3, {"ep": 3}, {}, r"ep \(3\) must divide n_routed_experts \(8\)"),
        (2, {"ep": 2}, {"routing_groups": "nodes", "topk_group": 2}, r"topk_group \(M=2\) exceeds the 1 node"),
    ],
)
def test_bad_layouts_fail_in_one_line_before_any_process_starts(tmp_path, capsys, devices, layout, overrides, message):
    args = small_args(tmp_path, max_steps=1, devices=devices)
    args += [f"--trainer.strategy={STRATEGY}", *(f"--trainer.strategy.init_args.{k}={v}" for k, v in layout.items())]
    args += [f"--model.overrides.{k}={v}" for k, v in overrides.items()]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and re.search(message, err[0]), err  # the message, then the DSV3_TRACEBACK hint


def test_an_optimizer_that_cannot_step_dtensors_is_refused(tmp_path):
    args = small_args(tmp_path, max_steps=1, devices=2)
    args += [f"--trainer.strategy={STRATEGY}", "--trainer.strategy.init_args.start_method=fork"]
    args += ["--model.optimizer=models.parallel.MasterWeightAdamW"]
    cli = DSV3CLI(args=args, run=False)
    with pytest.raises(Exception, match="model.optimizer=MasterWeightAdamW cannot step the sharded"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_sharded_checkpoint_converts_to_one_file_and_hf(runs, tmp_path):
    from lightning_modules.checkpoint_contents import model_from_checkpoint
    from models import load_hf_checkpoint

    sharded = checkpoint(runs["root"] / "fsdp_ep", STEPS)
    assert sharded.is_symlink() and sharded.resolve().is_dir()
    out = tmp_path / "one.ckpt"
    assert main(["convert", "--ckpt_path", str(sharded), "--to_ckpt", str(out), "--to_hf", str(tmp_path / "hf")]) == 0
    one_file = torch.load(out, weights_only=True)
    assert one_file["global_step"] == STEPS and "optimizer_states" not in one_file
    for model in (model_from_checkpoint(one_file), load_hf_checkpoint(tmp_path / "hf")):
        probe = probe_batch(model.config.vocab_size)
        with torch.no_grad():
            loss = model.eval()(probe[:, :-1], labels=probe[:, 1:], return_logits=False).ce_loss.item()
        assert loss == pytest.approx(runs["fsdp_ep"][0]["probe"], rel=1e-5)


def test_a_sharded_checkpoint_without_the_strategy_is_one_line(runs, tmp_path, capsys):
    sharded = checkpoint(runs["root"] / "fsdp_ep", STEPS)
    assert main(["validate", *small_args(tmp_path), "--ckpt_path", str(sharded)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is a sharded checkpoint: load it with --trainer.strategy" in err[0], err


@pytest.mark.slow
def test_torchrun_launch_and_resume_from_last(tmp_path):
    """The multi-node path on one machine: torchrun starts the processes, Lightning starts none; --ckpt_path last
    finds the link to the newest sharded checkpoint."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for steps, resume in ((3, []), (5, ["--ckpt_path", "last"])):
        args = small_args(tmp_path, max_steps=steps, devices=2, val_check_interval=3)
        args += [f"--trainer.strategy={STRATEGY}", "--trainer.strategy.init_args.ep=2", *resume]
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29613"]
        run += ["-m", "lightning_modules.cli", "fit", *args]
        proc = subprocess.run(run, cwd=root, env=env, capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name.startswith("last.ckpt.000005-")
    assert b"Restored all states from the checkpoint" in proc.stderr + proc.stdout
