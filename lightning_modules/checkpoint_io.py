"""Crash-safe checkpoint writes: temp file in the same directory, fsync, then an atomic ``os.replace``.

A job killed mid-save (pre-emption, OOM killer, a full disk) leaves the previous ``last.ckpt`` intact and
at most a stray ``.tmp`` file, never a truncated checkpoint that the next ``--ckpt_path last`` would choke on.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (remote URLs fall back to Lightning's)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target, so os.replace is a rename within one filesystem (atomic on POSIX).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- sharded checkpoint directories
# A sharded (torch.distributed.checkpoint) checkpoint is a directory written by every rank, which no rename can
# replace atomically once it exists. So the name the user sees (``last.ckpt``) is a symlink to a version directory
# beside it (``last.ckpt.000250-1a2b3c4d``): a save writes a fresh version, then swaps the link with one
# ``os.replace``, and only then deletes the old version. A save killed at any point leaves the link on the previous
# complete version (and at most a stray version directory, removed by the next save of that name).


def new_checkpoint_dir(path: Path, step: int) -> Path:
    """A fresh version directory for checkpoint ``path`` (not created): ``<name>.<step>-<random hex>``."""
    return path.with_name(f"{path.name}.{step:06d}-{secrets.token_hex(4)}")


def commit_checkpoint_dir(path: Path, version: Path) -> None:
    """Point ``path`` at the complete ``version`` directory atomically, then delete what ``path`` pointed at before.

    Call it on one process, after every file of ``version`` is written and fsynced (DCP's writer fsyncs its files).
    """
    _fsync_dir(version)
    old = _versions(path)
    if path.is_dir() and not path.is_symlink():  # a plain directory written by another tool: keep it as a version
        aside = new_checkpoint_dir(path, 0)
        os.rename(path, aside)
        old.append(aside)
    link = path.with_name(f".{path.name}.{secrets.token_hex(4)}.link")
    os.symlink(version.name, link)
    os.replace(link, path)  # the commit: atomic on POSIX
    _fsync_dir(path.parent)
    for stale in old:
        if stale.name != version.name:
            _delete(stale)


def remove_checkpoint_dir(path: Path) -> None:
    """Delete checkpoint ``path``: the link and its version directory (or a plain file or directory)."""
    versions = _versions(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    for version in versions:
        _delete(version)


def _versions(path: Path) -> list[Path]:
    """Version directories of checkpoint ``path`` (its target and strays of interrupted saves) and stray links."""
    name = re.escape(path.name)
    pattern = re.compile(rf"{name}\.\d{{6,}}-[0-9a-f]{{8}}|\.{name}\.[0-9a-f]{{8}}\.link")
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
