"""``dsv3 fit`` under pipeline parallelism, through the Trainer, against one process at the same global batch.

The CLI's own config (configs/tiny.yaml shrunk by ``small_args``, 4 layers so that each of the 4 stages holds one),
the same initial weights and global batches (``data.order: global``), the MTP weight scheduled by tokens (0.3, then
0.1 from step 2) and gradient clipping at 1.0: DualPipeV over 2 gloo ranks (pp 2), and over 4 (pp 2 x ep 2, the
experts split over 2 ranks, the stages' 2 data-parallel replicas; pp 2 x dp 2 without EP) must give the single
process's training losses, validation losses, expert biases (ExpertBiasBalancing), ``tokens_seen`` and MoE metrics
(fp32, 1e-5). Resuming the pp 2 run's sharded step-2 checkpoint gives bitwise its losses; ``init_from`` gives every
stage its weights; a NaN gradient on one pp rank stops every rank at that step; bad layouts fail before launch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from lightning_modules.checkpoint_contents import model_from_checkpoint
from lightning_modules.cli import DSV3CLI, main
from models import DeepSeekV3
from tests.lightning_modules.conftest import SMALL_MODEL, small_args

STEPS, SAVE_AT, GLOBAL_BATCH, SEQ = 4, 2, 8, 32
STRATEGY = "lightning_modules.strategy.DeepSeekV3Strategy"
MODEL = {**SMALL_MODEL, "num_hidden_layers": 4}
MTP_SCHEDULE = {GLOBAL_BATCH * SEQ: 0.1}  # from step 2 on

pytestmark = pytest.mark.distributed


class Record(Callback):
    """Start from ``init`` (a full state dict, each rank keeping its stages' entries); record every step's loss, the
    validation losses, ``tokens_seen`` and this rank's expert biases by layer, into ``out``."""

    def __init__(self, init: Path | None, out: Path) -> None:
        self.init, self.out, self.losses, self.val, self.first_batch = init, out, [], [], None

    def on_fit_start(self, trainer, pl_module) -> None:  # before a checkpoint is restored: resuming wins
        if self.init is None:  # model.init_from's weights
            return
        own = pl_module.model.state_dict()
        full = {k: v for k, v in torch.load(self.init, weights_only=True).items() if k in own}
        set_model_state_dict(pl_module.model, full, options=StateDictOptions(full_state_dict=True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        if self.first_batch is None:
            self.first_batch = batch.clone()

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged val/loss
        self.val.append(trainer.callback_metrics["val/loss"].item())

    def on_train_end(self, trainer, pl_module) -> None:
        biases = {n: b.clone() for n, b in pl_module.model.named_buffers() if n.endswith("e_score_correction_bias")}
        record = {"losses": self.losses, "val": self.val, "biases": biases, "tokens": pl_module.tokens_seen}
        record["first_batch"] = self.first_batch
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


class NaNGradient(Callback):
    """Make one gradient of pp rank 1 NaN before optimizer step ``step`` (after the schedule, before clipping)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == 1:
            next(p for p in pl_module.model.parameters() if p.grad is not None).grad.fill_(float("nan"))


def args_for(out: Path, devices: int = 1, **strategy: int) -> list[str]:
    args = small_args(out, max_steps=STEPS, devices=devices, deterministic=True, val_check_interval=SAVE_AT)
    args += ["--trainer.log_every_n_steps=2"]
    dp = devices // strategy.get("pp", 1)
    args += ["--model.overrides", json.dumps(MODEL), "--data.order=global", f"--data.batch_size={GLOBAL_BATCH // dp}"]
    args += ["--model.mtp_loss_weight_after_tokens", json.dumps(MTP_SCHEDULE)]
    args += [f"--trainer.callbacks.init_args.{k}" for k in (f"every_n_train_steps={SAVE_AT}", "save_top_k=-1")]
    args += ["--trainer.callbacks.init_args.monitor=null", "--trainer.callbacks.init_args.filename=step{step:06d}"]
    if strategy:
        args += [f"--trainer.strategy={STRATEGY}", "--trainer.strategy.init_args.start_method=fork"]
        args += [f"--trainer.strategy.init_args.{k}={v}" for k, v in strategy.items()]
        args += ["--model.pipeline.schedule=DualPipeV", "--model.pipeline.n_microbatches=4"]
    return args


def fit(
    root: Path, tag: str, devices: int = 1, ckpt_path: str | None = None, extra: tuple[str, ...] = (), **strategy: int
) -> list[dict]:
    """Train on ``devices`` ranks (one plain process without ``strategy``), from the shared initial weights unless
    ``extra`` flags name ``model.init_from``; return each rank's ``Record``."""
    out = root / tag
    out.mkdir()
    cli = DSV3CLI(args=[*args_for(out, devices, **strategy), *extra], run=False)
    init = root / "init.pt"
    if not init.exists():
        torch.manual_seed(0)
        torch.save(DeepSeekV3(cli.model.config).state_dict(), init)
    from_source = any(flag.startswith("--model.init_from") for flag in extra)
    cli.trainer.callbacks.append(Record(None if from_source else init, out))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pipelined")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the forked ranks do; two OpenMP threads on a loaded 2-core box are 5-8x slower
    try:
        single = fit(root, "single")[0]
    finally:
        torch.set_num_threads(threads)
    results = {"root": root, "single": single, "pp": fit(root, "pp", devices=2, pp=2)}
    (saved,) = (root / "pp" / "ckpt").glob(f"step{SAVE_AT:06d}*.ckpt")
    results["resumed"] = fit(root, "resumed", devices=2, ckpt_path=str(saved), pp=2)
    results["pp_ep"] = fit(root, "pp_ep", devices=4, pp=2, dp_shard=2, ep=2)
    results["pp_dp"] = fit(root, "pp_dp", devices=4, pp=2, dp_shard=2)  # stages replicated, no EP
    return results


def _check_like(ranks: list[dict], single: dict) -> None:
    seen = set()
    for rank in ranks:
        torch.testing.assert_close(rank["losses"], single["losses"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["val"], single["val"], rtol=1e-5, atol=1e-5)
        assert rank["tokens"] == single["tokens"] == STEPS * GLOBAL_BATCH * SEQ
        for name, bias in rank["biases"].items():
            full = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
            torch.testing.assert_close(full, single["biases"][name])
            seen.add(name)
    assert seen == set(single["biases"])  # every MoE layer lives on one of the ranks


@pytest.mark.parametrize("layout", ["pp", "pp_ep", "pp_dp"])
def test_pipelined_fit_gives_the_single_process_losses_and_biases(runs, layout):
    single = runs["single"]
    assert len(single["losses"]) == STEPS and len(single["val"]) == STEPS // SAVE_AT
    assert any(b.abs().sum() > 0 for b in single["biases"].values())  # the balancing moved them
    _check_like(runs[layout], single)


def moe_scalars(run: Path) -> dict[str, list[float]]:
    """The ``moe/*`` scalars a run wrote to TensorBoard (rank 0 writes them), by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (run / "runs").glob("*/version_*")
    events = EventAccumulator(str(version))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("moe/")}


@pytest.mark.parametrize("layout", ["pp", "pp_ep"])
def test_moe_metrics_cover_the_layers_of_every_stage(runs, layout):
    single, pipelined = moe_scalars(runs["root"] / "single"), moe_scalars(runs["root"] / layout)
    layers = {f"moe/layer{i}/max_vio" for i in (1, 2, 3, 4)}  # layer 0 is dense; 4 is the MTP block
    assert layers <= set(single) and {f"moe/layer{i}/router_entropy" for i in (1, 2, 3, 4)} <= set(single)
    assert set(pipelined) == set(single)
    for tag, values in single.items():
        assert len(values) == STEPS // 2
        torch.testing.assert_close(pipelined[tag], values, rtol=1e-5, atol=1e-6, msg=tag)


def test_pipelined_resume_is_exact(runs):
    for rank, resumed in zip(runs["pp"], runs["resumed"], strict=True):
        assert resumed["losses"] == rank["losses"][SAVE_AT:]
        assert resumed["val"] == rank["val"][1:]
        assert resumed["tokens"] == rank["tokens"]


def single_checkpoint(runs: dict) -> Path:
    (path,) = (runs["root"] / "single" / "ckpt").glob(f"step{SAVE_AT:06d}*.ckpt")
    return path


def test_init_from_a_one_device_checkpoint_gives_every_stage_its_weights(runs):
    source = single_checkpoint(runs)
    flags = (f"--model.init_from={source}", "--trainer.max_steps=1")
    ranks = fit(runs["root"], "init_from", devices=2, extra=flags, pp=2)
    model = model_from_checkpoint(torch.load(source, weights_only=True))
    batch = ranks[0]["first_batch"]
    assert torch.equal(batch, runs["single"]["first_batch"])  # init_from starts the data from the beginning
    with torch.no_grad():  # tokens_seen starts at 0: the MTP weight is the config's 0.3
        want = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False).loss.item()
    for rank in ranks:
        assert rank["losses"][0] == pytest.approx(want, rel=1e-5)


def test_a_one_device_checkpoint_is_not_resumed_under_pp(runs):
    cli = DSV3CLI(args=args_for(runs["root"] / "nope", devices=2, pp=2), run=False)
    with pytest.raises(Exception, match=r"is a single-file checkpoint, which cannot be resumed under pipeline"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(single_checkpoint(runs)))


def test_a_nan_gradient_on_one_stage_stops_every_rank_at_its_step(tmp_path):
    cli = DSV3CLI(args=[*args_for(tmp_path, devices=2, pp=2), "--trainer.max_steps=2"], run=False)
    cli.trainer.callbacks.append(NaNGradient(step=2))
    with pytest.raises(Exception, match=r"training diverged: the loss or gradient norm was not finite at step 2 "):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model.pipeline.n_microbatches=2"], r"pipeline\.n_microbatches=2 is too few for DualPipeV over 4 stages"),
        (["--model.pipeline.n_microbatches=4", "--data.batch_size=6"], r"data\.batch_size=6 .* not divisible"),
        (["--model.pipeline.schedule=1F1B"], r"pipeline\.schedule=1F1B puts the first and last stages on different"),
        (["--trainer.precision=bf16-mixed"], r"trainer\.precision gives torch\.bfloat16 parameters, which pipeline"),
    ],
)
def test_bad_pipelines_fail_in_one_line_before_any_process_starts(tmp_path, capsys, flags, message):
    args = small_args(tmp_path, max_steps=1, devices=2) + ["--model.overrides", json.dumps(MODEL)]
    args += [f"--trainer.strategy={STRATEGY}", "--trainer.strategy.init_args.pp=2", *flags]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and re.search(message, err[0]), err
