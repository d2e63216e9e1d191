"""Atomic sharded-checkpoint directories: a save killed at any point leaves the previous checkpoint whole.

The protocol of ``DeepSeekV3Strategy.save_checkpoint`` (``lightning_modules.checkpoint_io``), run here in one process
with torch.distributed.checkpoint's own writer: the version directory is written, then the link is swapped.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lightning_modules.checkpoint_io import commit_checkpoint_dir, new_checkpoint_dir, remove_checkpoint_dir

ROOT = Path(__file__).resolve().parents[2]


def _save(path: Path, step: int, value: float) -> None:
    version = new_checkpoint_dir(path, step)
    dcp.save({"w": torch.full((1000,), value)}, checkpoint_id=version)
    commit_checkpoint_dir(path, version)


def _load(path: Path) -> torch.Tensor:
    state = {"w": torch.empty(1000)}
    dcp.load(state, checkpoint_id=path)
    return state["w"]


def test_overwrite_swaps_the_link_and_deletes_the_old_version(tmp_path):
    path = tmp_path / "last.ckpt"
    _save(path, 1, 1.0)
    _save(path, 2, 2.0)
    assert path.is_symlink() and path.resolve().name.startswith("last.ckpt.000002-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", path.resolve().name]
    assert torch.equal(_load(path), torch.full((1000,), 2.0))
    remove_checkpoint_dir(path)
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    _save(path, 1, 1.0)
    # A process starts saving step 2 and is SIGKILLed inside DCP's write (it pickles the non-tensor object).
    version = new_checkpoint_dir(path, 2)
    script = textwrap.dedent(
        f"""
        import os, signal
        import torch, torch.distributed.checkpoint as dcp

        class Crash:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        dcp.save({{"w": torch.zeros(1000), "crash": Crash()}}, checkpoint_id={str(version)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert len(list(tmp_path.iterdir())) == 3  # the link, its version, the interrupted version
    assert torch.equal(_load(path), torch.full((1000,), 1.0))
    _save(path, 3, 3.0)  # the next save of that name removes what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", path.resolve().name]


def test_a_plain_directory_becomes_a_linked_version(tmp_path):
    path = tmp_path / "step.ckpt"
    dcp.save({"w": torch.full((1000,), 1.0)}, checkpoint_id=path)  # written by another tool, in place
    _save(path, 2, 2.0)
    assert path.is_symlink() and torch.equal(_load(path), torch.full((1000,), 2.0))
    assert len(list(tmp_path.iterdir())) == 2
