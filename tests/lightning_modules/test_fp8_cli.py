"""``dsv3 fit --model.fp8 ...`` on the CPU: every recipe emulated with one warning; a bad recipe is one line; under
FSDP2 tensorwise weights are all-gathered in FP8, their scales precomputed after every step."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor

from lightning_modules.cli import main
from models.parallel.fp8 import FP8_RECIPES
from tests.lightning_modules.conftest import small_args


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fit_with_fp8_runs_emulated_on_the_cpu_with_one_warning(small, recipe):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(["fit", *small(max_steps=2, val_check_interval=2), "--model.fp8", recipe]) == 0
    emulated = [w for w in record if "emulated" in str(w.message)]
    assert len(emulated) == 1 and f"model.fp8={recipe} on the CPU" in str(emulated[0].message)


def test_fp8_mapping_from_the_command_line(small):
    from lightning_modules.cli import DSV3CLI

    cli = DSV3CLI(args=[*small(), "--model.fp8", "{recipe: rowwise, experts: false}"], run=False)
    assert cli.model.fp8.recipe == "rowwise" and cli.model.fp8.experts is False


def test_unknown_recipe_is_one_line(small, capsys):
    assert main(["fit", *small(), "--model.fp8", "fp4"]) == 2
    err = capsys.readouterr().err
    assert "model.fp8.recipe must be one of ('tensorwise', 'rowwise', 'blockwise')" in err
    assert "Traceback" not in err


class _CheckScales(Callback):
    """After every optimizer step: each FP8-all-gathered weight's precomputed scale is its current amax's."""

    def __init__(self, out) -> None:  # noqa: ANN001
        self.out, self.checked = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

        n = 0
        for p in pl_module.model.parameters():
            if isinstance(p, DTensor) and isinstance(p._local_tensor, WeightWithDynamicFloat8CastTensor):
                want = torch.finfo(torch.float8_e4m3fn).max / p.full_tensor().abs().amax().double().clamp(min=1e-12)
                torch.testing.assert_close(p._local_tensor._precomputed_scale, want.float())
                n += 1
        self.checked.append(n)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        torch.save(self.checked, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_fit_under_fsdp2_all_gathers_tensorwise_weights_in_fp8_with_scales_fresh_after_every_step(tmp_path):
    from lightning_modules.cli import DSV3CLI

    strategy = "lightning_modules.strategy.DeepSeekV3Strategy"
    args = small_args(tmp_path, max_steps=3, devices=2, val_check_interval=3)
    args += ["--model.fp8", "tensorwise", f"--trainer.strategy={strategy}"]
    args += ["--trainer.strategy.init_args.start_method=fork", "--trainer.strategy.init_args.dp_shard=2"]
    cli = DSV3CLI(args=args, run=False)
    cli.trainer.callbacks.append(_CheckScales(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for rank in range(2):
        checked = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(checked) == 3 and min(checked) > 10, checked  # every step, every dense linear but the head
