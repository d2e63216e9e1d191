"""Checkpoint files: atomic writes (a process killed mid-save leaves the previous checkpoint whole), checksums,
one-line errors for a full disk, a truncated file or an unwritable directory, and the umask's file mode."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_modules.checkpoint_io import (
    CHECKSUMS_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointWriteError,
    check_writable_dir,
    read_checkpoint,
)


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
    with pytest.raises(CheckpointWriteError, match="last.ckpt: disk full .the previous last.ckpt is intact"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _root():
    import pathlib

    return pathlib.Path(__file__).resolve().parents[2]


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode) == 0o644  # mkstemp alone gives 0o600


def _big_checkpoint() -> dict:
    weights = torch.arange(1_000_000, dtype=torch.float32)
    return {"state_dict": {"w": weights, "b": weights[:10].to(torch.bfloat16)}, "global_step": 7, "name": "x"}


def test_checksums_catch_a_damaged_page(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_big_checkpoint(), path)
    loaded = io.load_checkpoint(path)
    assert CHECKSUMS_KEY not in loaded and loaded["global_step"] == 7
    assert torch.equal(loaded["state_dict"]["b"], _big_checkpoint()["state_dict"]["b"])
    with open(path, "r+b") as f:  # 4 KB of garbage in the middle of the file, inside the 4 MB tensor
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(4096))
    assert torch.load(path, weights_only=True)["global_step"] == 7  # torch alone does not notice
    with pytest.raises(CheckpointError, match=r"last.ckpt is corrupted: 1 of 4 values fail .*state_dict/w"):
        io.load_checkpoint(path)


def test_a_changed_number_is_caught(tmp_path):
    path = tmp_path / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 7, "lr": 0.5}, path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["global_step"] = 8
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="global_step"):
        read_checkpoint(path)


def test_truncated_file_is_one_clear_error(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_big_checkpoint(), path)
    os.truncate(path, path.stat().st_size // 3)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*last.ckpt \(truncated"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_checkpoints_without_a_table_still_load(tmp_path):
    torch.save({"global_step": 3}, tmp_path / "old.ckpt")  # written before checksums existed
    assert read_checkpoint(tmp_path / "old.ckpt")["global_step"] == 3


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path):
    """A real write error from the OS (a file-size limit: EFBIG) in a child process, mid-save."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        from lightning_modules.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            AtomicCheckpointIO().save_checkpoint({{"global_step": 2, "w": torch.zeros(1 << 20)}}, {str(path)!r})
        except CheckpointWriteError as err:
            print(err)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(_root()), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"cannot write checkpoint {path}: File too large (the previous last.ckpt is intact)" in proc.stdout
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_unwritable_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=r"dirpath='.*file/ckpt' is not a writable directory \(Not a directory"):
        check_writable_dir(tmp_path / "file" / "ckpt", "dirpath")
    check_writable_dir(tmp_path / "new" / "ckpt", "dirpath")  # creates it
    assert list((tmp_path / "new" / "ckpt").iterdir()) == []  # and leaves no probe behind
