"""API keys: the key file, constant-time checks, reload on SIGHUP.

The key file holds one key per line. Blank lines and lines starting with ``#`` are ignored.
A line ``name:key`` gives the key a name (letters, digits, ``.``, ``_``, ``-``) that appears in
logs and metrics instead of the key; a line without such a prefix is named ``line<N>``. Keys are
at least 16 printable characters without whitespace.

The file must be a regular file that other users cannot read or write (like ssh with a private
key); it is read in a worker thread, so a file that blocks (a FIFO, a hung file system) cannot
stop the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from exo_nixos.basetypes import PATTERNS
from exo_nixos.errors import UserError
from exo_nixos.fsutil import os_reason, read_bounded

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
# A key file holds a few lines; anything larger is not one.
MAX_KEY_FILE_BYTES = 1 << 20
_NAMED = re.compile(f"^(?P<name>{PATTERNS['apiKeyName']['pattern']}):(?P<key>.*)$")


@dataclass(frozen=True)
class ApiKey:
    """A key by name; only its SHA-256 digest is kept in memory."""

    name: str
    digest: bytes


def _digest(secret: str) -> bytes:
    # surrogateescape: a header value that is not UTF-8 arrives with its bytes as surrogates
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def _key_lines(text: str) -> Iterator[tuple[int, str | None, str]]:
    """The key lines of a key file's text: line number, name (None when unnamed) and key;
    blank lines and ``#`` comments skipped."""
    # split("\n"), not splitlines(): that would also split at characters such as \x1c
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _NAMED.match(line)
        yield (number, match["name"], match["key"].strip()) if match else (number, None, line)


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Parse a key file's text; raise UserError naming the first bad line."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, named, secret in _key_lines(text):
        name = named or f"line{number}"
        where = f"{source} line {number}"
        if any(c.isspace() for c in secret):
            raise UserError(f"{where}: a key must not contain whitespace; write one key per line")
        if not secret.isprintable():
            raise UserError(
                f"{where}: key '{name}' contains a control character (e.g. NUL); "
                "a key is printable characters only"
            )
        if len(secret) < MIN_KEY_LENGTH:
            raise UserError(
                f"{where}: key '{name}' is shorter than {MIN_KEY_LENGTH} characters; "
                "generate one with `openssl rand -hex 32`"
            )
        if name in names:
            raise UserError(f"{where}: the name '{name}' is used twice; give each key its own")
        digest = _digest(secret)
        if digest in digests:
            raise UserError(f"{where}: key '{name}' repeats an earlier key; remove one")
        names.add(name)
        digests.add(digest)
        keys.append(ApiKey(name, digest))
    if not keys:
        raise UserError(f"{source}: no API keys in the file; add one key per line")
    return keys


def read_client_key(path: str) -> str:
    """A client's key to send (``--api-key-file`` of ``status`` and ``models``): the first key
    line of ``path``, ``name:key`` as in the gateway's key file, or the key alone."""
    try:
        # a pipe too (``--api-key-file <(pass show exo)``), up to the key file's own limit
        text = read_bounded(path, MAX_KEY_FILE_BYTES, streams=True).decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"--api-key-file {path}: no such file") from None
    except PermissionError:
        raise UserError(
            f"--api-key-file {path}: cannot read it as this user (permission denied)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--api-key-file {path}: cannot read it: {os_reason(exc)}") from None
    for _number, _name, key in _key_lines(text):
        if key and key.isprintable() and not any(c.isspace() for c in key):
            return key
        break
    raise UserError(f"--api-key-file {path}: no key in it; write the key on the first line")


def _open_key_file(path: Path) -> bytes:
    """The file's bytes, once it is known to be a regular file other users cannot access."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(
                f"{path}: the API key file is not a regular file; point apiKeysFile at a file"
            )
        if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise UserError(
                f"{path}: the API key file is readable or writable by every user "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); refusing it: "
                f"chmod 0440 {path} (owner root, group of the gateway) or chmod 0400 "
                "(owned by the gateway's user)"
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise UserError(f"{path}: the API key file is over {MAX_KEY_FILE_BYTES} bytes")
    return data


def read_key_file(path: Path) -> list[ApiKey]:
    """Read and parse a key file; every failure is a one-line UserError. Blocking: call it
    from a worker thread once the event loop runs."""
    try:
        text = _open_key_file(path).decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: API key file not found; create it or fix apiKeysFile") from None
    except PermissionError:
        raise UserError(
            f"{path}: cannot read the API key file (permission denied); "
            "make it readable by the gateway's user"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the API key file: {os_reason(exc)}") from None
    return parse_keys(text, str(path))


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY``, ``x-api-key: KEY``, or
    ``Authorization: Basic`` with the key as password (what a browser sends for the dashboard).
    """
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return value.strip() or None
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            _, _, password = decoded.partition(":")
            return password or None
        return None
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key else None


class KeyStore:
    """The current set of keys. ``None`` path: authentication is off (loopback only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._keys: tuple[ApiKey, ...] = ()
        self._reloading = False
        if path is not None:
            self._keys = tuple(read_key_file(path))

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def __len__(self) -> int:
        return len(self._keys)

    async def reload(self) -> bool:
        """Re-read the key file in a worker thread. On any problem keep the current keys and
        log one line; a reload asked for while one is under way is refused the same way."""
        if self.path is None:
            return True
        if self._reloading:
            log.error(
                "API keys not reloaded, keeping the %d loaded: %s: the previous reload "
                "has not finished reading it",
                len(self._keys),
                self.path,
            )
            return False
        self._reloading = True
        try:
            keys = await asyncio.to_thread(read_key_file, self.path)
        except UserError as exc:
            log.error("API keys not reloaded, keeping the %d loaded: %s", len(self._keys), exc)
            return False
        finally:
            self._reloading = False
        self._keys = tuple(keys)
        log.info("API keys reloaded from %s: %d keys", self.path, len(keys))
        return True

    def check(self, presented: str | None) -> str | None:
        """The name of the key that matches ``presented``, or None.

        The presented key is hashed and its digest compared with every key's digest by
        ``hmac.compare_digest``, without stopping at a match, so the time taken does not
        depend on which key matched, how much of one matched, or the key's length.
        """
        if presented is None:
            return None
        digest = _digest(presented)
        found: str | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.name
        return found
