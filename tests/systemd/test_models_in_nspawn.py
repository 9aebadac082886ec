"""exo-models.service under a real systemd 257: the reconciler, sandboxed as the module
renders it, places the declared model on the node (the EXO test double) and says so in its
STATUS=; it takes the lock in the node's runtime dir and repairs the cache in the data dir."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.systemd.guest import Guest
from tests.systemd.harness import booted_guest, http, unit_journal, wait_until
from tests.systemd.harness import unit_props as props

pytestmark = pytest.mark.systemd

NODE = "exo-worker.service"
MODELS = "exo-models.service"
LLAMA = "mlx-community/Llama-3.2-1B-Instruct-4bit"
EXPOSURE_LIMIT = 1.5

MODULE = f"""
{{ pkgs, ... }}: {{
  services.exo = {{
    enable = true;
    mode = "worker";
    gateway.enable = false;
    healthCheck = {{ intervalSec = 1; timeoutSec = 1; failures = 2; }};
    models."{LLAMA}" = {{ }};
    modelReconciler.intervalSec = 1;
  }};
}}
"""


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    with booted_guest(MODULE, "exo-models-test") as machine:
        yield machine


def _status(guest: Guest) -> str:
    return props(guest, MODELS, "StatusText").get("StatusText", "")


def test_the_reconciler_places_the_declared_model(guest: Guest) -> None:
    guest.run(["systemctl", "start", "--no-block", "exo.target"])
    wait_until(
        lambda: "1/1 declared models in place" in _status(guest), 90, "STATUS", guest, MODELS
    )
    assert props(guest, MODELS, "ActiveState")["ActiveState"] == "active"
    status, body = http(guest, "http://127.0.0.1:52415/state/instances")
    assert status == 200 and LLAMA in body
    journal = unit_journal(guest, MODELS)
    assert f"place {LLAMA}: declared running, no instance" in journal, journal
    # the lock lives in the node's runtime dir, written through the unit's ReadWritePaths
    assert guest.run(["test", "-f", "/run/exo/models.lock"], check=False).returncode == 0


def test_the_units_verify_and_the_reconciler_is_confined(guest: Guest) -> None:
    done = guest.run(["systemd-analyze", "verify", f"/etc/systemd/system/{MODELS}"], check=False)
    assert (done.returncode, done.stderr.strip()) == (0, ""), done
    out = guest.run(["systemd-analyze", "security", "--no-pager", MODELS]).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    print(f"exo-models.service exposure in the guest: {match.group(1)}")
    assert float(match.group(1)) <= EXPOSURE_LIMIT
    unit = props(guest, MODELS, "User", "Type", "Restart", "After", "PartOf")
    assert (unit["User"], unit["Type"], unit["Restart"]) == ("exo", "notify", "always")
    assert NODE in unit["After"].split()
