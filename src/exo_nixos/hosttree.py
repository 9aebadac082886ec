"""Reading a host's /sys, /proc and /dev under a root prefix, and capturing what was read.

Detection, ``net`` and the pre-flight read the live machine (root ``/``) or a tree captured
from another one, through one reader, :class:`Tree`. A file that is missing, unreadable or
garbled never raises: each reader returns ``None`` (or an empty result) and, where the file
was expected, records one warning line naming it.

Inside :func:`recording`, every path a Tree reads is noted with how it was used, and
:func:`write_capture` copies exactly those into a new tree; so a capture holds what the
readers read, by construction, and reading the copy gives what reading the original gave.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from exo_nixos.fsutil import os_reason, read_bounded

# path -> how it was used: "file" (its content), "link" (its target) or "exists"
Record = dict[Path, str]
_RECORDING: ContextVar[Record | None] = ContextVar("exo_nixos_host_tree_record", default=None)


@contextmanager
def recording() -> Iterator[Record]:
    """Note every path the Trees read while the block runs (for :func:`write_capture`)."""
    record: Record = {}
    token = _RECORDING.set(record)
    try:
        yield record
    finally:
        _RECORDING.reset(token)


class Tree:
    """A filesystem root (``/`` or a captured tree) plus the warnings met while reading it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.warnings: list[str] = []
        # True when the tree is this machine's own root, so live queries make sense
        self.is_live = self.root.resolve() == Path("/")

    def path(self, absolute: str | Path) -> Path:
        return self.root / str(absolute).lstrip("/")

    def _used(self, absolute: str, kind: str) -> Path:
        path = self.path(absolute)
        record = _RECORDING.get()
        if record is not None:
            record.setdefault(path, kind)
        return path

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def shown(self, absolute: str) -> str:
        """The path as a user should see it in a warning."""
        return absolute if self.is_live else str(self.path(absolute))

    def exists(self, absolute: str) -> bool:
        """The entry exists, even as a link whose target a captured tree does not hold."""
        return os.path.lexists(self._used(absolute, "exists"))

    def is_dir(self, absolute: str) -> bool:
        return self._used(absolute, "exists").is_dir()

    def text(self, absolute: str, *, expected: bool = False) -> str | None:
        """The file's text; ``None`` when missing (a warning if ``expected``) or unreadable."""
        try:
            return read_bounded(self._used(absolute, "file")).decode("utf-8")
        except FileNotFoundError:
            if expected:
                self.warn(f"{self.shown(absolute)}: missing")
            return None
        except UnicodeDecodeError:
            self.warn(f"{self.shown(absolute)}: not text (garbled); ignored")
            return None
        except OSError as exc:
            self.warn(f"{self.shown(absolute)}: unreadable ({os_reason(exc)}); ignored")
            return None

    def line(self, absolute: str, *, expected: bool = False) -> str | None:
        text = self.text(absolute, expected=expected)
        return None if text is None else text.strip()

    def hex_id(self, absolute: str, digits: int = 4, *, expected: bool = True) -> str | None:
        """A sysfs id such as ``0x10de`` as lower-case hex without the prefix (``"10de"``)."""
        value = self.line(absolute, expected=expected)
        if value is None:
            return None
        try:
            number = int(value, 16)
        except ValueError:
            self.warn(f"{self.shown(absolute)}: {value[:40]!r} is not a hex number; ignored")
            return None
        if number < 0 or number >= 16**digits:
            self.warn(f"{self.shown(absolute)}: {value[:40]!r} is out of range; ignored")
            return None
        return f"{number:0{digits}x}"

    def integer(self, absolute: str, *, expected: bool = False, base: int = 10) -> int | None:
        value = self.line(absolute, expected=expected)
        if value is None:
            return None
        try:
            return int(value, base)
        except ValueError:
            self.warn(f"{self.shown(absolute)}: {value[:40]!r} is not a number; ignored")
            return None

    def link_name(self, absolute: str) -> str | None:
        """The last component of a symlink's target (a bound driver's name), or ``None``."""
        path = self._used(absolute, "link")
        try:
            target = os.readlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not path.exists():
                return None
            self.warn(f"{self.shown(absolute)}: not a readable symlink ({os_reason(exc)}); ignored")
            return None
        name = os.path.basename(target.rstrip("/"))
        return name or None

    def listdir(self, absolute: str, *, expected: bool = False, prefix: str = "") -> list[str]:
        """The entries (those starting with ``prefix``), sorted; sysfs and procfs have no dot
        entries, a capture may (``.keep``, see :func:`write_capture`), so those are left out."""
        path = self._used(absolute, "exists")
        try:
            names = sorted(
                n for n in os.listdir(path) if n.startswith(prefix) and not n.startswith(".")
            )
        except FileNotFoundError:
            if expected:
                self.warn(f"{self.shown(absolute)}: missing")
            return []
        except OSError as exc:
            self.warn(f"{self.shown(absolute)}: cannot list ({os_reason(exc)}); ignored")
            return []
        for name in names:
            self._used(f"{absolute.rstrip('/')}/{name}", "exists")
        return names


def write_capture(record: Record, root: Path, dest: Path) -> int:
    """Copy what ``record`` noted below ``root`` into ``dest``; the number of entries written.

    Links keep their targets (which need not resolve in the copy); directories a link leads
    into become real directories; device nodes, FIFOs and sockets become empty files (only
    their presence is read); unreadable files are left out, as the readers treat both alike;
    empty directories get a ``.keep`` file so the tree survives a git commit.
    """
    relative = {
        path: path.relative_to(root)
        for path in record
        if path.is_relative_to(root) and os.path.lexists(path)
    }
    containers = {parent for rel in relative.values() for parent in rel.parents}
    written = 0
    for path, rel in sorted(relative.items(), key=lambda item: item[1]):
        target = dest / rel
        if rel in containers:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(path) and record[path] != "file":
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
                written += 1
        elif path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.is_file():
            try:
                data = read_bounded(path)
            except OSError:
                continue
            target.write_bytes(data)
            written += 1
        elif record[path] == "exists":  # a device node: what is read is that it exists
            target.touch()
            written += 1
    # git keeps no empty directory; a marker keeps e.g. drivers/thunderbolt-net in a commit
    for folder, subdirs, files in os.walk(dest):
        if not subdirs and not files:
            (Path(folder) / ".keep").touch()
    return written


def key_values(text: str, separator: str | None = None) -> dict[str, str]:
    """``key value`` (or ``key: value`` with ``separator=":"``) lines as a dict."""
    result: dict[str, str] = {}
    for raw in text.splitlines():
        parts = raw.split(separator, 1)
        if len(parts) == 2:
            result[parts[0].strip()] = parts[1].strip()
    return result
