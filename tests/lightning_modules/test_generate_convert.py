"""dsv3 generate and dsv3 convert, from a checkpoint written by dsv3 fit."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_modules.checkpoint_contents import model_from_checkpoint, tokenizer_from_checkpoint
from lightning_modules.cli import DSV3CLI, main
from models import DeepSeekV3Config, generate
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


def _greedy(ckpt_path, capsys) -> str:
    args = ["--ckpt_path", str(ckpt_path), "--prompt", "ROMEO:", "--max_new_tokens", "8", "--temperature", "0"]
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_convert_roundtrip_keeps_weights_logits_and_tokenizer(trained, tmp_path, capsys):
    from transformers import AutoTokenizer

    hf = tmp_path / "hf"
    assert main(["convert", "--ckpt_path", str(trained), "--to_hf", str(hf)]) == 0
    ckpt = torch.load(trained, weights_only=True)
    tokenizer, eos = tokenizer_from_checkpoint(ckpt)
    # The folder is a Hugging Face model folder with its tokenizer: transformers reads the same tokens and EOS.
    hf_tokenizer = AutoTokenizer.from_pretrained(hf)
    text = "ROMEO: What light through yonder window breaks?"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.eos_token_id == eos == json.loads((hf / "config.json").read_text())["eos_token_id"]
    assert hf_tokenizer.decode(tokenizer.encode(text).ids) == text
    assert main(["convert", "--hf_path", str(hf), "--to_ckpt", str(tmp_path / "back.ckpt")]) == 0
    capsys.readouterr()
    back_ckpt = torch.load(tmp_path / "back.ckpt", weights_only=True)
    original, back = model_from_checkpoint(ckpt).eval(), model_from_checkpoint(back_ckpt).eval()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    tokens = torch.randint(0, original.config.vocab_size, (1, 12))
    torch.testing.assert_close(back(tokens).logits, original(tokens).logits)
    # The converted-back checkpoint names its config as a preset plus changes, and samples as the original.
    hparams = back_ckpt["hyper_parameters"]
    assert hparams["preset"] == "tiny" and "vocab_size" not in hparams["overrides"]
    rebuilt = DeepSeekV3Config.from_preset("tiny", **hparams["overrides"], vocab_size=original.config.vocab_size)
    assert rebuilt == original.config
    assert _greedy(tmp_path / "back.ckpt", capsys) == _greedy(trained, capsys)


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
