"""Reading /sys, /proc and /dev under a root prefix, turning every failure into a warning.

Detection runs at every service start and on captured trees from other machines: a file that
is missing, unreadable or garbled must never raise. Each reader returns ``None`` (or an empty
result) and, where the file was expected, records one warning line naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from exo_nixos.fsutil import read_bounded


class Tree:
    """A filesystem root (``/`` or a captured tree) plus the warnings met while reading it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.warnings: list[str] = []
        # True when the tree is this machine's own root, so live queries make sense
        self.is_live = root.resolve() == Path("/")

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def shown(self, absolute: str) -> str:
        """The path as a user should see it in a warning."""
        return absolute if self.is_live else str(self.path(absolute))

    def exists(self, absolute: str) -> bool:
        return os.path.lexists(self.path(absolute))

    def text(self, absolute: str, *, expected: bool = False) -> str | None:
        """The file's text; ``None`` when missing (a warning if ``expected``) or unreadable."""
        try:
            return read_bounded(self.path(absolute)).decode("utf-8")
        except FileNotFoundError:
            if expected:
                self.warn(f"{self.shown(absolute)}: missing")
            return None
        except UnicodeDecodeError:
            self.warn(f"{self.shown(absolute)}: not text (garbled); ignored")
            return None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            self.warn(f"{self.shown(absolute)}: unreadable ({reason}); ignored")
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

    def integer(self, absolute: str, *, expected: bool = False) -> int | None:
        value = self.line(absolute, expected=expected)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            self.warn(f"{self.shown(absolute)}: {value[:40]!r} is not a number; ignored")
            return None

    def link_name(self, absolute: str) -> str | None:
        """The last component of a symlink's target (a bound driver's name), or ``None``."""
        try:
            target = os.readlink(self.path(absolute))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not self.path(absolute).exists():
                return None
            reason = exc.strerror or type(exc).__name__
            self.warn(f"{self.shown(absolute)}: not a readable symlink ({reason}); ignored")
            return None
        name = os.path.basename(target.rstrip("/"))
        return name or None

    def listdir(self, absolute: str, *, expected: bool = False) -> list[str]:
        try:
            return sorted(os.listdir(self.path(absolute)))
        except FileNotFoundError:
            if expected:
                self.warn(f"{self.shown(absolute)}: missing")
            return []
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            self.warn(f"{self.shown(absolute)}: cannot list ({reason}); ignored")
            return []


def key_values(text: str, separator: str | None = None) -> dict[str, str]:
    """``key value`` (or ``key: value`` with ``separator=":"``) lines as a dict."""
    result: dict[str, str] = {}
    for raw in text.splitlines():
        parts = raw.split(separator, 1)
        if len(parts) == 2:
            result[parts[0].strip()] = parts[1].strip()
    return result
