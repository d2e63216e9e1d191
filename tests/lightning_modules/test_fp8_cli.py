"""``dsv3 fit --model.fp8 ...`` on the CPU: every recipe emulated with one warning; a bad recipe is one line."""

from __future__ import annotations

import warnings

import pytest

from lightning_modules.cli import main
from models.parallel.fp8 import FP8_RECIPES


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
