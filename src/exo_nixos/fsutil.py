"""Crash-safe file writes: a reader sees the old content or the new one, never a mix."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_output(option: str, path: str | os.PathLike[str], data: str) -> None:
    """A command's ``--output`` file, written atomically; a path that cannot take it is one
    UserError line naming the option, the path and what to do."""
    from exo_nixos.errors import UserError

    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {target}: is a directory; name a file in it")
    if not target.parent.is_dir():
        raise UserError(f"{option} {target}: the directory {target.parent} does not exist")
    try:
        atomic_write(target, data)
    except OSError as exc:
        raise UserError(f"{option} {target}: cannot write: {exc.strerror or exc}") from None


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync, rename.

    The directory is fsynced too, so the rename survives a power loss.
    """
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
