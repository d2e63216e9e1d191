"""dsv3 generate and dsv3 convert, from a checkpoint written by dsv3 fit."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.cli import DSV3CLI, main
from lightning_modules.module import model_from_checkpoint, tokenizer_from_checkpoint
from models import generate
from tests.lightning_modules.conftest import small_args


@pytest.fixture
def trained(trained_ckpt):
    return trained_ckpt


def test_generate_prints_the_models_greedy_continuation(trained, capsys):
    assert main(["generate", "--ckpt_path", str(trained), "--prompt", "ROMEO:", "--max_new_tokens", "6",
                 "--temperature", "0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out.splitlines()[0]
    ckpt = torch.load(trained, weights_only=True)
    model, (tokenizer, eos) = model_from_checkpoint(ckpt).eval(), tokenizer_from_checkpoint(ckpt)
    ids = tokenizer.encode("ROMEO:").ids
    out = generate(model, torch.tensor([ids]), max_new_tokens=6, eos_token_id=eos)
    assert printed == ("ROMEO:" + tokenizer.decode(out[0, len(ids) :].tolist())).splitlines()[0]


def test_convert_roundtrip_keeps_weights_and_logits(trained, tmp_path):
    assert main(["convert", "--ckpt_path", str(trained), "--to_hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["convert", "--hf_path", str(tmp_path / "hf"), "--to_ckpt", str(tmp_path / "back.ckpt")]) == 0
    original = model_from_checkpoint(torch.load(trained, weights_only=True)).eval()
    back = model_from_checkpoint(torch.load(tmp_path / "back.ckpt", weights_only=True)).eval()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    tokens = torch.randint(0, original.config.vocab_size, (1, 12))
    torch.testing.assert_close(back(tokens).logits, original(tokens).logits)


def test_validate_runs_on_a_converted_checkpoint(trained, tmp_path):
    main(["convert", "--ckpt_path", str(trained), "--to_hf", str(tmp_path / "hf")])
    main(["convert", "--hf_path", str(tmp_path / "hf"), "--to_ckpt", str(tmp_path / "back.ckpt")])
    cli = DSV3CLI(args=["validate", *small_args(tmp_path), "--ckpt_path", str(tmp_path / "back.ckpt")])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_missing_paths_are_reported(tmp_path, capsys):
    assert main(["generate", "--ckpt_path", str(tmp_path / "x.ckpt")]) == 2
    assert "x.ckpt: no such file" in capsys.readouterr().err
    assert main(["convert", "--hf_path", str(tmp_path / "nohf"), "--to_ckpt", str(tmp_path / "y.ckpt")]) == 2
    assert "nohf: no such file" in capsys.readouterr().err
