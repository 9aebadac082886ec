"""A Debian trixie guest booted with systemd 257 as PID 1 in systemd-nspawn.

The guest tree is built once with debootstrap and cached as a tarball under
``${XDG_CACHE_HOME:-~/.cache}/exo-nixos/``; every test session unpacks a fresh copy, provisions
it offline (user, unit files, the Python tool, the EXO test double), boots it, runs commands
inside with ``nsenter`` and powers it off. Only processes started here are ever signalled.

Run ``python -m tests.systemd.guest build`` to fill the cache ahead of time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "trixie"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "libbpf1",
    # the tool's run-time dependencies, from the guest's own archive (Python 3.13)
    "python3-pydantic",
    "python3-aiohttp",
    # the gateway's: its metrics, and the event loop it prefers (as on NixOS)
    "python3-prometheus-client",
    "python3-uvloop",
    # test set-up inside the guest: the interfaces of the interface-restriction test
    "iproute2",
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class GuestUnavailable(RuntimeError):
    """The guest cannot be built or booted on this machine (the reason says why)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "exo-nixos"


def host_mirror(sources: Sequence[Path] | None = None) -> str:
    """The Debian mirror the host's apt sources name (deb822 or one-line format)."""
    if sources is None:
        root = Path("/etc/apt")
        sources = [root / "sources.list", *sorted((root / "sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for raw in text.splitlines():
            line = raw.strip()
            words = line.split()
            candidates: list[str] = []
            if line.startswith("URIs:"):
                candidates = words[1:]
            elif words[:1] == ["deb"]:
                candidates = [w for w in words[1:] if "://" in w][:1]
            for uri in candidates:
                if uri.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def tarball_path() -> Path:
    digest = hashlib.sha256(" ".join((SUITE, *PACKAGES)).encode()).hexdigest()[:12]
    return cache_dir() / f"guest-{SUITE}-{digest}.tar.gz"


def missing_host_tools() -> list[str]:
    return [t for t in ("systemd-nspawn", "debootstrap", "nsenter", "tar") if not shutil.which(t)]


def build_tarball(log: Path | None = None) -> Path:
    """Debootstrap the guest tree once and cache it; return the tarball."""
    target = tarball_path()
    if target.exists():
        return target
    if os.geteuid() != 0:
        raise GuestUnavailable("building the guest needs root (debootstrap)")
    if missing := missing_host_tools():
        raise GuestUnavailable(f"missing host tools: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="exo-guest-build-", dir=target.parent) as tmp:
        root = Path(tmp) / "root"
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root),
            host_mirror(),
        ]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        if done.returncode != 0:
            raise GuestUnavailable(f"debootstrap failed (exit {done.returncode}); see {log}")
        # the apt caches are not needed inside and make the tarball bigger
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        partial = target.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "-czf", str(partial), "."], check=True)
        os.replace(partial, target)
    return target


@dataclass
class Guest:
    """A booted guest; ``run`` executes a command inside it as root."""

    root: Path
    name: str
    console: Path
    nspawn: subprocess.Popen[bytes] | None = None
    pid1: int | None = None
    extra_nspawn_args: list[str] = field(default_factory=list)

    def boot(self, timeout: float = 60.0) -> None:
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        cmd = [
            "systemd-nspawn",
            "-D",
            str(self.root),
            "-b",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            "--system-call-filter=bpf",
            "--private-network",
            *self.extra_nspawn_args,
        ]
        with open(self.console, "wb") as console:
            self.nspawn = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise GuestUnavailable(
                    f"systemd-nspawn exited with {self.nspawn.returncode}: " + self.console_tail()
                )
            if self.pid1 is None:
                found = subprocess.run(
                    ["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if found.stdout.strip():
                    self.pid1 = int(found.stdout.split()[0])
            if (
                self.pid1 is not None
                and Path(f"/proc/{self.pid1}/root/run/systemd/private").exists()
            ):
                state = self.run(
                    ["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout
                )
                if state.stdout.strip() not in {"running", "degraded"}:
                    raise GuestUnavailable(f"guest did not boot: {state.stdout.strip()}")
                return
            time.sleep(0.05)
        raise GuestUnavailable(f"guest did not boot within {timeout:.0f}s: {self.console_tail()}")

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        assert self.pid1 is not None, "guest not booted"
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input_text,
            env={
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "SYSTEMD_PAGER": "",
                "SYSTEMD_COLORS": "0",
                "LANG": "C.UTF-8",
            },
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def poweroff(self, timeout: float = 10.0) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=5)
        try:
            self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()


def unpack(tarball: Path, into: Path) -> Path:
    root = into / "root"
    root.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(root), "-xzf", str(tarball)], check=True)
    return root


@contextlib.contextmanager
def booted(root: Path, name: str, console: Path) -> Iterator[Guest]:
    guest = Guest(root=root, name=name, console=console)
    try:
        guest.boot()
        yield guest
    finally:
        guest.poweroff()


def main(argv: Sequence[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m tests.systemd.guest build", file=sys.stderr)
        return 2
    log = cache_dir() / "debootstrap.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    path = build_tarball(log)
    print(f"{path} ({path.stat().st_size >> 20} MiB, {time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
