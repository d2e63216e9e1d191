"""Atomic checkpoint writes: a process killed mid-save leaves the previous checkpoint whole."""

import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_modules.checkpoint_io import AtomicCheckpointIO


def test_roundtrip(tmp_path):
    io = AtomicCheckpointIO()
    ckpt = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 3}
    io.save_checkpoint(ckpt, tmp_path / "sub" / "last.ckpt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "last.ckpt")
    torch.testing.assert_close(loaded["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["last.ckpt"]


def test_sigkill_mid_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    # A child process starts writing step 2 and is SIGKILLed halfway through pickling it.
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from lightning_modules.checkpoint_io import AtomicCheckpointIO

        class Crash:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        AtomicCheckpointIO().save_checkpoint(
            {{"global_step": 2, "w": torch.zeros(1_000_000), "crash": Crash()}}, {str(path)!r}
        )
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(_root()), capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # it died mid-write, in the temp file
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 1
    torch.testing.assert_close(ckpt["w"], torch.ones(1000))


def test_exception_mid_write_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def partial_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _root():
    import pathlib

    return pathlib.Path(__file__).resolve().parents[2]
