"""What every nspawn test module shares: skip reasons, a booted and provisioned guest, and
small helpers to query units and speak HTTP from inside the guest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.nixeval import skip_reason as nix_skip_reason
from tests.systemd.guest import (
    Guest,
    GuestUnavailable,
    build_tarball,
    cache_dir,
    missing_host_tools,
    unpack,
)
from tests.systemd.provision import provision


def why_not() -> str | None:
    """Why the tier cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap)"
    if missing := missing_host_tools():
        tools = ", ".join(missing)
        return f"missing host tools: {tools} (apt-get install systemd-container debootstrap)"
    return nix_skip_reason()


@contextlib.contextmanager
def booted_guest(module: str, name: str) -> Iterator[Guest]:
    """A fresh guest provisioned with ``module``'s units, booted; skips the test with the
    reason when that cannot be done here. Powered off and deleted afterwards."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    log = cache_dir() / "debootstrap.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        tarball = build_tarball(log)
    except GuestUnavailable as exc:
        pytest.skip(f"guest tree unavailable: {exc}")
    work = Path(tempfile.mkdtemp(prefix="exo-guest-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        root = unpack(tarball, work)
        provision(root, module)
        machine = Guest(root=root, name=f"{name}-{os.getpid()}", console=work / "console.log")
        try:
            machine.boot()
        except GuestUnavailable as exc:
            machine.poweroff()
            pytest.skip(f"the container cannot start here: {exc}")
        try:
            yield machine
        finally:
            machine.poweroff()
    finally:
        shutil.rmtree(work, ignore_errors=True)


AS_EXO = ("setpriv", "--reuid", "exo", "--regid", "exo", "--clear-groups")
"""Prefix of a guest command run as the exo user outside any unit (the control of a refusal)."""


def unit_props(guest: Guest, unit: str, *props: str) -> dict[str, str]:
    out = guest.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_journal(guest: Guest, unit: str) -> str:
    return guest.run(["journalctl", "-u", unit, "-o", "short-monotonic", "--no-pager"]).stdout


def wait_until(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    guest: Guest | None = None,
    unit: str | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    detail = ""
    if guest is not None and unit is not None:
        detail = "\n" + unit_journal(guest, unit)[-4000:]
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


def sandbox_report(guest: Guest) -> dict[str, Any]:
    """What the fake exo recorded about the sandbox it found inside the node unit."""
    text = wait_until(
        lambda: guest.run(["cat", "/run/exo/sandbox.json"], check=False).stdout,
        20,
        "the sandbox report",
    )
    report: dict[str, Any] = json.loads(text)
    return report


_HTTP = (
    "import json,sys,urllib.error,urllib.request as u\n"
    "url,body,headers=sys.argv[1],sys.argv[2],json.loads(sys.argv[3])\n"
    "data=body.encode() if body else None\n"
    "req=u.Request(url,data=data,headers={'Content-Type':'application/json',**headers})\n"
    "try:\n"
    "    r=u.urlopen(req,timeout=float(sys.argv[4]))\n"
    "    print(r.status);print(r.read().decode())\n"
    "except urllib.error.HTTPError as e:\n"
    "    print(e.code);print(e.read().decode())\n"
    "except OSError as e:\n"
    "    print(0);print(type(getattr(e,'reason',e)).__name__)\n"
)


def http(
    guest: Guest,
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    *,
    prefix: Sequence[str] = (),
    timeout: float = 3.0,
) -> tuple[int, str]:
    """An HTTP request made inside the guest (``prefix``, e.g. ``ip netns exec X``, runs it
    elsewhere): (status, body); status 0 and the error's name when nothing answered."""
    argv = [
        *prefix,
        "python3",
        "-c",
        _HTTP,
        url,
        json.dumps(body) if body is not None else "",
        json.dumps(headers or {}),
        str(timeout),
    ]
    out = guest.run(argv, timeout=timeout + 30).stdout
    status, _, text = out.partition("\n")
    return int(status), text.strip()
