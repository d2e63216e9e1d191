"""Bad input and broken files give one line naming the field and the fix, and a non-zero exit (issue #11.6)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from lightning_modules.cli import main


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dsv3 ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--model.overrides.hidden_size=abc", "model.overrides: hidden_size='abc' must be an integer"),
        ("--model.overrides.hidden_size=64.5", "model.overrides: hidden_size=64.5 must be an integer"),
        ("--trainer.max_steps=-5", "`max_steps` must be a non-negative integer or -1"),
        ("--trainer.val_check_interval=0", "--trainer.val_check_interval=0: give a number of training batches >= 1"),
    ],
)
def test_bad_values(small, capsys, flag, message):
    assert main(["fit", *small(max_steps=1), flag]) == 2
    assert message in _error(capsys)


def test_unwritable_checkpoint_dir_fails_before_training(small, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    args = [*small(max_steps=1), f"--trainer.callbacks.init_args.dirpath={tmp_path}/file/ckpt"]
    assert main(["fit", *args]) == 2
    assert f"dirpath='{tmp_path}/file/ckpt' is not a writable directory (Not a directory)" in _error(capsys)
    assert not (tmp_path / "runs").exists()  # nothing was trained or logged


@pytest.mark.parametrize(
    "data_files,message",
    [
        ("empty.jsonl", "empty.jsonl' is empty: no documents to read"),
        ("missing*.jsonl", "missing*.jsonl' matches no files"),
        ("folder", "folder' is a directory; give its files, e.g. "),
    ],
)
def test_data_files_that_hold_no_documents(small, tmp_path, capsys, data_files, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text('{"text": "hello"}\n')
    args = [*small(max_steps=1), "--data.path=json", f"--data.data_files={tmp_path}/{data_files}"]
    assert main(["fit", *args, "--data.val_batches=0"]) == 2
    assert message in _error(capsys)


def test_hub_dataset_while_offline(small, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fit", *small(max_steps=1), "--data.path=HuggingFaceFW/fineweb-edu"]) == 2
    assert "data.path='HuggingFaceFW/fineweb-edu' is read from the Hugging Face Hub, which cannot be reached" in (
        _error(capsys)
    )


def test_truncated_last_checkpoint(small, trained_ckpt, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    last = tmp_path / "ckpt" / "last.ckpt"
    shutil.copy(trained_ckpt, last)
    os.truncate(last, last.stat().st_size // 2)
    assert main(["fit", *small(max_steps=3), "--ckpt_path", "last"]) == 2
    assert f"cannot read checkpoint {last} (truncated or not a torch checkpoint" in _error(capsys)


def test_corrupted_checkpoint_fails_its_checksum(small, trained_ckpt, tmp_path, capsys):
    path = tmp_path / "damaged.ckpt"
    shutil.copy(trained_ckpt, path)
    state = torch.load(path, weights_only=True)["state_dict"]
    embed = state["model.embed.weight"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    start = data.find(embed[:64])  # inside the embedding's bytes (a stored, uncompressed zip entry)
    data[start + 256 : start + 256 + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))
    assert main(["validate", *small(), "--ckpt_path", str(path)]) == 2
    err = _error(capsys)
    assert "damaged.ckpt is corrupted: 1 of " in err and "(state_dict/model.embed.weight)" in err


def test_shape_mismatch_with_last_offers_a_fix_that_works(small, trained_ckpt, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    shutil.copy(trained_ckpt, tmp_path / "ckpt" / "last.ckpt")
    assert main(["fit", *small(max_steps=3), "--model.overrides.hidden_size=48", "--ckpt_path", "last"]) == 2
    err = _error(capsys)
    assert "hidden_size: checkpoint 32, config 48" in err and "leave model.preset/overrides out" in err
    args = [a for a in small(max_steps=3) if not a.startswith("{")]  # the fix: no overrides on the command line
    args.remove("--model.overrides")
    assert main(["fit", *args, "--ckpt_path", "last"]) == 0  # the checkpoint's model, resumed
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_generate_on_a_device_this_build_lacks(trained_ckpt, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["generate", "--ckpt_path", str(trained_ckpt), "--device", "cuda"]) == 2
    assert "--device cuda: not usable here (Torch not compiled with CUDA enabled); use --device cpu" in (_error(capsys))
