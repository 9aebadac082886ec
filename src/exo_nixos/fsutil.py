"""Crash-safe file writes: a reader sees the old content or the new one, never a mix."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

# The most a host file this tool reads may hold. sysfs attributes are at most a page; the
# largest real file read is /proc/cpuinfo (about 1.5 KiB per CPU, so ~750 KiB at 512 CPUs).
HOST_FILE_LIMIT = 1 << 20


def os_reason(exc: BaseException) -> str:
    """Why a file could not be read or written, as a message can quote it: the OS's words
    (``Permission denied``), else the exception's text, else its type."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def read_bounded(
    path: str | os.PathLike[str], limit: int = HOST_FILE_LIMIT, *, streams: bool = False
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. A FIFO, device or socket (a
    captured tree can hold anything) is refused without blocking, as is a larger file: both
    as OSError with a ``strerror`` a warning can quote. With ``streams``, a FIFO or a
    character device (``<(...)``, ``/dev/stdin``) is read as well, up to the same limit."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if streams else os.O_NONBLOCK))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        readable = stat.S_ISREG(mode) or (streams and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)))
        if not readable:
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(65536, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_output(option: str, path: str | os.PathLike[str], data: str) -> None:
    """A command's ``--output`` file, written atomically; a path that cannot take it is one
    UserError line naming the option, the path and what to do.

    A regular file (or a new one) is replaced in one step; through a symbolic link, the file
    it points to is (the link stays). A device, FIFO or socket (``/dev/stdout``, a pipe) is
    written to as it is: replacing it would put a regular file where the device was."""
    from exo_nixos.errors import UserError

    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {target}: is a directory; name a file in it")
    try:
        kind = target.stat().st_mode
    except FileNotFoundError:
        kind = None
    except OSError as exc:
        raise UserError(f"{option} {target}: cannot write: {os_reason(exc)}") from None
    try:
        if kind is not None and not stat.S_ISREG(kind):
            with open(target, "w", encoding="utf-8") as stream:
                stream.write(data)
            return
        real = Path(os.path.realpath(target))
        if not real.parent.is_dir():
            raise UserError(f"{option} {target}: the directory {real.parent} does not exist")
        atomic_write(real, data)
    except OSError as exc:
        raise UserError(f"{option} {target}: cannot write: {os_reason(exc)}") from None


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
