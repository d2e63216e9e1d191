"""Checkpoints that are written whole or not at all, and that are checked when they are read back.

* Atomic: a temp file in the same directory, fsync, then ``os.replace``. A job killed mid-save (pre-emption, the
  OOM killer, a full disk) leaves the previous ``last.ckpt`` intact and at most a stray ``.tmp`` file, never a
  truncated checkpoint. A failed write is one ``CheckpointError`` line saying that the previous file is intact.
* Checksummed: ``add_checksums`` stores a CRC32 of every tensor's bytes and of every plain value (numbers, strings)
  under ``checkpoint["checksums"]``; ``verify_checksums`` recomputes them on load, so a checkpoint damaged on disk
  (a flipped page, a partial copy) is refused with the keys that changed instead of loading garbage weights.
  The table is keyed by the path of each value in the checkpoint dict, so sharded checkpoints can keep one
  table per shard file with the same two functions (``tensor_crc32`` for a local shard).
* Readable by others: the file gets the mode of any file the process creates (``0o666 & ~umask``), not
  ``mkstemp``'s private ``0o600``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

CHECKSUMS_KEY = "checksums"
_PLAIN = (bool, int, float, str, bytes, type(None))


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read (disk full, truncated, corrupted): reported as one line."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous file under that name is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, durable, checksummed local writes and verified loads.

    Remote URLs fall back to Lightning's implementation (still checksummed).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        checkpoint = add_checksums(checkpoint)
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        try:
            _atomic_save(checkpoint, path)
        except OSError as err:
            previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {err.strerror or err} ({previous}); free space in "
                f"{path.parent} or point the checkpoint dirpath elsewhere"
            ) from err

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            checkpoint = super().load_checkpoint(path, map_location, weights_only)
            verify_checksums(checkpoint, path)
            return checkpoint
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


def read_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    weights_only: bool | None = True,
    mmap: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """``torch.load`` a checkpoint and check its checksums (when it has them and ``verify``); the table is removed.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, truncated, or its content fails the checksums.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as err:  # a truncated or foreign file: torch says why in its first line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or not a torch checkpoint: {reason}); resume from another "
            "checkpoint"
        ) from err
    if isinstance(checkpoint, dict):
        if verify:
            verify_checksums(checkpoint, path)
        checkpoint.pop(CHECKSUMS_KEY, None)
    return checkpoint


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Create ``directory`` if needed and write a probe file into it, so a bad path fails now, not at the first save.

    Raises:
        CheckpointError: naming ``what`` (the config key) and the reason.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CheckpointError(
            f"{what}={str(directory)!r} is not a writable directory ({err.strerror or err}); pick a directory this "
            "user can write"
        ) from err


# ------------------------------------------------------------------------------------------------- checksums
def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's dtype, shape and bytes (any device; copied to the CPU when needed)."""
    tensor = tensor.detach()
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    if not tensor.numel():
        return zlib.crc32(header)
    data = tensor.reshape(-1).cpu().contiguous().view(torch.uint8)  # raw bytes of any dtype (bf16, fp8 included)
    return zlib.crc32(data.numpy(), zlib.crc32(header))


def checksums(checkpoint: dict[str, Any]) -> dict[str, int]:
    """``{path: crc32}`` for every tensor and plain value (number, string, bool, None, bytes) of the checkpoint.

    Paths join dict keys and sequence indices with ``/`` (``state_dict/model.embed.weight``,
    ``optimizer_states/0/state/3/exp_avg``); other objects are left out.
    """
    return {path: crc for path, crc in _leaf_crcs(checkpoint, "") if path.split("/", 1)[0] != CHECKSUMS_KEY}


def add_checksums(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` with its checksum table under ``CHECKSUMS_KEY``."""
    return {**checkpoint, CHECKSUMS_KEY: {"crc32": checksums(checkpoint)}}


def verify_checksums(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Check and remove the checksum table of a loaded checkpoint; one without a table (older) passes as it is.

    Raises:
        CheckpointError: naming the first values that differ from what was written, and how many.
    """
    table = checkpoint.pop(CHECKSUMS_KEY, None)
    if table is None:
        return
    expected, found = table["crc32"], checksums(checkpoint)
    bad = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"checkpoint {path} is corrupted: {len(bad)} of {len(expected)} values fail their checksum ({shown}); "
            "the file changed after it was written: resume from another checkpoint"
        )


def _leaf_crcs(obj: Any, path: str) -> Iterator[tuple[str, int]]:
    if isinstance(obj, torch.Tensor):
        yield path, tensor_crc32(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaf_crcs(value, f"{path}/{key}" if path else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _leaf_crcs(value, f"{path}/{i}")
    elif isinstance(obj, _PLAIN):
        yield path, zlib.crc32(f"{type(obj).__name__}:{obj!r}".encode())


# ------------------------------------------------------------------------------------------------- writing
def _atomic_save(checkpoint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so os.replace is a rename within one filesystem (atomic on POSIX).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            writer = _ErrorRecordingWriter(f)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError as err:  # torch's zip writer reports a failed write as "unexpected pos ..."
                if writer.error is None:
                    raise
                raise writer.error from err
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _ErrorRecordingWriter:
    """A binary file's ``write`` that keeps the ``OSError`` (ENOSPC, EDQUOT, EIO) torch's writer would hide."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _umask() -> int:
    mask = os.umask(0o077)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


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
