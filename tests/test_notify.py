from __future__ import annotations

import os

import pytest

from exo_nixos.supervisor.notify import Notifier
from tests.notify_listener import NotifyListener


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_messages_reach_the_socket(abstract: bool) -> None:
    listener = NotifyListener(abstract=abstract)
    try:
        notifier = Notifier.from_environ(listener.env())
        assert notifier.enabled
        assert notifier.status("starting  up\nnow")
        assert notifier.ready("worker; 2 peers")
        assert notifier.watchdog()
        assert notifier.stopping()
        ready = listener.wait_for("READY", "1")
        assert ready.fields["STATUS"] == "worker; 2 peers"
        assert listener.wait_for("STATUS", "starting up now")
        listener.wait_for("WATCHDOG", "1")
        listener.wait_for("STOPPING", "1")
        notifier.close()
    finally:
        listener.close()


def test_unchanged_status_is_not_resent() -> None:
    listener = NotifyListener()
    try:
        notifier = Notifier.from_environ(listener.env())
        notifier.status("a")
        notifier.status("a")
        notifier.status("b")
        listener.wait_for("STATUS", "b")
        assert [m.fields["STATUS"] for m in listener.all("STATUS")] == ["a", "b"]
        notifier.close()
    finally:
        listener.close()


def test_without_socket_everything_is_a_quiet_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_sec is None
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_unreachable_socket_is_not_an_error(tmp_path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert not notifier.ready()


def test_watchdog_settings_follow_sd_watchdog_enabled() -> None:
    me = str(os.getpid())
    assert Notifier.from_environ({"WATCHDOG_USEC": "3000000"}).watchdog_sec == 3.0
    assert Notifier.from_environ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": me}).watchdog_sec
    other = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(other).watchdog_sec is None
    assert Notifier.from_environ({"WATCHDOG_USEC": "junk"}).watchdog_sec is None
    assert Notifier.from_environ({"WATCHDOG_USEC": "0"}).watchdog_sec is None
