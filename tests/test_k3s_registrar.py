"""The registrar against the kube-apiserver double: real HTTP on loopback, in-process loop."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trustme
from lightkube import ApiError

from exo_nixos.backoff import Backoff
from exo_nixos.config import parse_config
from exo_nixos.errors import UserError
from exo_nixos.k3s.registrar import Registrar, describe, log, retry_after, slice_name
from exo_nixos.k3s.service import build_registrar
from tests.kube_double import Fault, KubeApiDouble
from tests.kube_double import until as _until

NS = "exo-system"
NODE = "node-a"
NAME = "exo-api-node-a"
TOKEN = "good-token"


# Every wait below takes well under a second when the registrar works; a broken one (a
# planted bug, a mutant) fails in seconds rather than after the double's 20 s guard, which
# keeps a mutation run of this module within minutes.
WAIT_LIMIT = 5.0


async def until(check: Callable[[], bool], what: str, limit: float = WAIT_LIMIT) -> None:
    await _until(check, what, limit)


class Health:
    """A health verdict the test flips."""

    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        return self.healthy


def make_config(tmp_path: Path, api_server: str, **k3s: Any) -> Any:
    token = tmp_path / "token"
    if not token.exists():
        token.write_text(TOKEN + "\n")
    document = {
        "schemaVersion": 1,
        "healthCheck": {"intervalSec": 0.02, "timeoutSec": 1, "failures": 2},
        "gateway": {"enable": False},
        "k3s": {
            "integration": True,
            "tokenFile": str(token),
            "apiServer": api_server,
            "nodeName": NODE,
            "nodeAddress": "10.0.0.5",
            **k3s,
        },
    }
    return parse_config(document)


def registrar_for(tmp_path: Path, api: KubeApiDouble, health: Health, **k3s: Any) -> Registrar:
    return build_registrar(
        make_config(tmp_path, api.url, **k3s),
        health=health,
        resync=0.3,
        backoff_initial=0.02,
        backoff_max=0.1,
        request_timeout=0.5,
        stop_timeout=1.0,
    )


Scenario = Callable[[KubeApiDouble, Registrar, Health, asyncio.Event], Awaitable[None]]


def run_scenario(
    tmp_path: Path,
    scenario: Scenario,
    *,
    healthy: bool = True,
    api: KubeApiDouble | None = None,
    expect_removed: bool = True,
    **k3s: Any,
) -> KubeApiDouble:
    async def main() -> KubeApiDouble:
        double = api or KubeApiDouble(token=TOKEN)
        await double.start()
        health = Health(healthy)
        registrar = registrar_for(tmp_path, double, health, **k3s)
        stop = asyncio.Event()
        task = asyncio.create_task(registrar.run(stop))
        try:
            await scenario(double, registrar, health, stop)
            stop.set()
            removed = await asyncio.wait_for(task, WAIT_LIMIT)
            assert removed is expect_removed
        finally:
            stop.set()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await registrar.client.close()
            await double.stop()
        return double

    return asyncio.run(main())


def test_first_registration_creates_this_nodes_slice(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "the slice is ready")
        seen.update(api.get(NS, NAME) or {})

    api = run_scenario(tmp_path, scenario)
    meta = seen["metadata"]
    assert meta["labels"]["kubernetes.io/service-name"] == "exo-api"
    assert meta["labels"]["endpointslice.kubernetes.io/managed-by"] == "exo-nixos"
    assert seen["addressType"] == "IPv4"
    assert seen["endpoints"] == [
        {
            "addresses": ["10.0.0.5"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": NODE,
        }
    ]
    assert seen["ports"] == [
        {"name": "http", "port": 52415, "protocol": "TCP", "appProtocol": "http"}
    ]
    assert api.statuses("POST") == [201]
    assert all(
        s.query.get("fieldManager") == "exo-nixos" for s in api.requests if s.method == "POST"
    )
    # Stopping removed it.
    assert api.get(NS, NAME) is None
    assert api.statuses("DELETE")[-1] == 200


def test_unhealthy_node_registers_not_ready_then_turns_ready(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is False, "registered not ready")
        health.healthy = True
        await until(lambda: api.ready(NS, NAME) is True, "ready after a good probe")

    run_scenario(tmp_path, scenario, healthy=False)


def test_health_flips_to_not_ready_and_back(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        health.healthy = False
        await until(lambda: api.ready(NS, NAME) is False, "not ready after failed probes")
        obj = api.get(NS, NAME)
        assert obj is not None
        assert obj["endpoints"][0]["conditions"] == {
            "ready": False,
            "serving": False,
            "terminating": False,
        }
        health.healthy = True
        await until(lambda: api.ready(NS, NAME) is True, "ready again")

    api = run_scenario(tmp_path, scenario)
    # Updates went through PUT with the server's resourceVersion, never a second create.
    assert api.statuses("POST") == [201]
    assert api.statuses("PUT").count(200) >= 2


def test_one_failed_probe_is_not_enough_to_go_not_ready() -> None:
    class NoClient:
        pass

    probes = iter([True, False, True, False, False])

    async def health() -> bool:
        return next(probes)

    from exo_nixos.k3s.registrar import SliceSpec

    reg = Registrar(
        NoClient(),  # type: ignore[arg-type]
        SliceSpec(NS, "exo-api", NODE, 1),
        address=lambda: "10.0.0.5",
        health=health,
        failures=2,
    )
    verdicts = []
    for _ in range(5):
        asyncio.run(reg._probe())
        verdicts.append(reg.ready)
    assert verdicts == [True, True, True, True, False]


def test_stale_resource_version_conflict_is_resolved_by_rereading(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")

        def annotate(obj: dict[str, Any]) -> None:
            obj["metadata"]["annotations"] = {"touched-by": "kubectl"}

        api.modify(NS, NAME, annotate)  # the registrar's resourceVersion is now stale
        health.healthy = False
        await until(lambda: api.ready(NS, NAME) is False, "not ready despite the conflict")

    api = run_scenario(tmp_path, scenario)
    assert 409 in api.statuses("PUT")
    assert api.statuses("PUT")[-1] == 200


def test_api_down_then_up_publishes_the_current_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "exo_nixos.k3s.registrar")

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        await api.pause()
        health.healthy = False
        await until(lambda: reg.last_error is not None, "a failed write while down")
        assert "unreachable" in (reg.last_error or "")
        assert api.ready(NS, NAME) is True  # nobody could change it meanwhile
        failed_attempts = reg.backoff.attempt
        await until(lambda: reg.backoff.attempt > failed_attempts + 1, "retries continue")
        await api.resume()
        await until(lambda: api.ready(NS, NAME) is False, "state caught up after the outage")
        await until(lambda: reg.last_error is None, "error cleared")

    run_scenario(tmp_path, scenario)
    assert "registration failed" in caplog.text
    assert "API server reachable again" in caplog.text


def test_server_errors_and_plain_text_gateway_errors_are_retried(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        api.fail_next = [
            Fault(500),
            Fault(503),
            Fault(502, as_status=False),
            Fault(503, bare=True),
        ]
        health.healthy = False
        await until(lambda: api.ready(NS, NAME) is False, "written after three failures")
        assert not api.fail_next

    run_scenario(tmp_path, scenario)


def test_garbage_answers_are_retried(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        api.garbage = 2
        health.healthy = False
        await until(lambda: "unexpected answer" in (reg.last_error or ""), "reported")
        await until(lambda: api.ready(NS, NAME) is False, "written once the API answers properly")

    run_scenario(tmp_path, scenario)


def test_hanging_api_times_out_and_recovers(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        api.hang = True
        health.healthy = False
        await until(lambda: "timed out" in (reg.last_error or ""), "a timeout reported")
        api.release()
        await until(lambda: api.ready(NS, NAME) is False, "written once the API answers")

    run_scenario(tmp_path, scenario)


def test_bad_token_gets_401_until_the_token_file_is_fixed(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("stale-token\n")

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: "401" in (reg.last_error or ""), "401 reported")
        assert api.get(NS, NAME) is None
        token.write_text(TOKEN + "\n")  # rotated: the client re-reads the file on 401
        await until(lambda: api.ready(NS, NAME) is True, "registered with the new token")

    api = run_scenario(tmp_path, scenario)
    assert 401 in [s.status for s in api.requests]


def test_forbidden_is_one_clear_log_line_and_no_hot_loop(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.k3s.registrar")
    api = KubeApiDouble(token=TOKEN)
    api.forbidden = True  # no Role/RoleBinding for the service account yet

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: "403" in (reg.last_error or ""), "403 reported")
        first = len(api.requests)
        await asyncio.sleep(1.0)
        # backoff (0.02 s doubling to 0.1 s here): a few requests a second, not hundreds
        assert len(api.requests) - first <= 25, len(api.requests) - first
        # the registrar's own lines (the kube double's access log may be captured too)
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "exo_nixos.k3s.registrar" and "403" in r.getMessage()
        ]
        assert len(lines) == 1, lines
        assert "Forbidden" in lines[0] and "Role/RoleBinding" in lines[0]
        assert 'cannot get resource "endpointslices"' in lines[0]
        assert api.get(NS, NAME) is None
        api.forbidden = False  # the manifests got applied
        await until(lambda: api.ready(NS, NAME) is True, "registered")

    run_scenario(tmp_path, scenario, api=api)


def test_too_many_requests_waits_as_long_as_retry_after_says(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.k3s.registrar")

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        api.fail_next = [Fault(429, retry_after=1)]
        health.healthy = False
        await until(lambda: api.ready(NS, NAME) is False, "written after the wait")
        throttled = next(i for i, s in enumerate(api.requests) if s.status == 429)
        wait = api.requests[throttled + 1].at - api.requests[throttled].at
        # the backoff alone would retry within 0.1 s
        assert wait >= 0.95, wait
        assert any("retrying after 1s as asked" in r.getMessage() for r in caplog.records)

    run_scenario(tmp_path, scenario)


def test_node_name_the_api_server_refuses_is_a_422_retried_slowly(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: "422" in (reg.last_error or ""), "422 reported")
        assert 'nodeName: Invalid value: "GPU_01"' in (reg.last_error or "")
        first = len(api.requests)
        await asyncio.sleep(0.5)
        assert len(api.requests) - first <= 25  # GET + POST per attempt, with backoff
        assert api.objects == {}

    async def main() -> None:
        api = KubeApiDouble(token=TOKEN)
        await api.start()
        reg = registrar_for(tmp_path, api, Health())
        # what a node name that no configuration check saw would send
        reg.spec = dataclasses.replace(reg.spec, node_name="GPU_01")
        stop = asyncio.Event()
        task = asyncio.create_task(reg.run(stop))
        try:
            await scenario(api, reg, Health(), stop)
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
            await reg.client.close()
            await api.stop()

    asyncio.run(main())


def test_host_name_is_lowercased_like_k3s_and_registers(tmp_path: Path, monkeypatch) -> None:
    # Without k3s.nodeName the host name is the node name; the real server refuses upper
    # case in endpoints[].nodeName (422), so it must be sent as K3s names the node.
    monkeypatch.setattr(socket, "gethostname", lambda: "GPU-01")

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, "exo-api-gpu-01") is True, "registered")
        obj = api.get(NS, "exo-api-gpu-01")
        assert obj is not None
        (endpoint,) = obj["endpoints"]
        assert endpoint["nodeName"] == "gpu-01"
        assert reg.last_error is None

    run_scenario(tmp_path, scenario, nodeName=None)


def test_host_name_that_is_no_node_name_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "GPU_01")
    with pytest.raises(UserError, match=r"set k3s\.nodeName"):
        build_registrar(make_config(tmp_path, "https://127.0.0.1:6443", nodeName=None))


def test_missing_namespace_is_reported_and_retried(tmp_path: Path) -> None:
    api = KubeApiDouble(token=TOKEN, namespaces=())

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: "not found" in (reg.last_error or ""), "404 namespace reported")
        api.namespaces.add(NS)  # the manifests got applied
        await until(lambda: api.ready(NS, NAME) is True, "registered")

    run_scenario(tmp_path, scenario, api=api)


def test_slice_deleted_by_someone_else_is_recreated(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        api.remove(NS, NAME)
        await until(lambda: api.ready(NS, NAME) is True, "recreated on resync")

    api = run_scenario(tmp_path, scenario)
    assert api.statuses("POST") == [201, 201]


def test_existing_slice_from_an_earlier_run_is_taken_over(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")

    api = KubeApiDouble(token=TOKEN)
    api.objects[(NS, NAME)] = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": NAME,
            "namespace": NS,
            "resourceVersion": "7",
            "uid": "u",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "generation": 1,
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.9"], "conditions": {"ready": False}}],
        "ports": [],
    }
    run_scenario(tmp_path, scenario, api=api)
    assert api.statuses("POST") == []
    assert 200 in api.statuses("PUT")


def test_address_family_change_replaces_the_slice(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        reg.address = lambda: "fd00::5"
        await until(lambda: (api.get(NS, NAME) or {}).get("addressType") == "IPv6", "an IPv6 slice")

    api = run_scenario(tmp_path, scenario)
    assert api.statuses("DELETE")[0] == 200


def test_stop_while_api_is_down_reports_failure(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        await api.pause()

    api = run_scenario(tmp_path, scenario, expect_removed=False)
    assert api.get(NS, NAME) is not None


def test_https_with_ca_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    api = KubeApiDouble(token=TOKEN, ssl_context=server_context)

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready over HTTPS")

    run_scenario(tmp_path, scenario, api=api, caFile=str(ca_file))


def test_https_with_an_unknown_ca_never_registers(tmp_path: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_context)
    other_ca = tmp_path / "other.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    api = KubeApiDouble(token=TOKEN, ssl_context=server_context)

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: "CERTIFICATE_VERIFY_FAILED" in (reg.last_error or ""), "TLS error")
        assert api.requests == []

    run_scenario(tmp_path, scenario, api=api, caFile=str(other_ca), expect_removed=False)


def test_kubeconfig_file_credentials(tmp_path: Path) -> None:
    async def main() -> None:
        api = KubeApiDouble(token=TOKEN)
        await api.start()
        kubeconfig = tmp_path / "k3s.yaml"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "default", "cluster": {"server": api.url}}],
                    "users": [{"name": "default", "user": {"token": TOKEN}}],
                    "contexts": [
                        {"name": "default", "context": {"cluster": "default", "user": "default"}}
                    ],
                    "current-context": "default",
                }
            )
        )
        config = make_config(tmp_path, api.url, tokenFile=None, apiServer=None)
        config = parse_config(
            {
                **config.to_json(),
                "k3s": {**config.to_json()["k3s"], "kubeconfigFile": str(kubeconfig)},
            }
        )
        reg = build_registrar(config, health=Health(True), backoff_initial=0.02)
        try:
            await reg._probe()
            await reg.sync()
            assert api.ready(NS, NAME) is True
        finally:
            await reg.client.close()
            await api.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("k3s", "message"),
    [
        ({"integration": False}, "k3s.integration and k3s.serviceDiscovery"),
        ({"serviceDiscovery": False}, "k3s.integration and k3s.serviceDiscovery"),
        ({"tokenFile": None, "apiServer": None}, "no credentials"),
        ({"tokenFile": "/nonexistent/token"}, "does not exist"),
        (
            {"tokenFile": None, "apiServer": None, "kubeconfigFile": "/nonexistent/k"},
            "does not exist",
        ),
    ],
)
def test_configuration_mistakes_are_user_errors(tmp_path: Path, k3s: dict[str, Any], message: str):
    config = make_config(tmp_path, "http://127.0.0.1:1", **k3s)
    with pytest.raises(UserError, match=message):
        build_registrar(config, health=Health())


def test_a_token_file_that_is_not_a_regular_file_is_a_user_error(tmp_path: Path) -> None:
    """A FIFO would block the API client at its first request; a directory is no token."""
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    for path, reason in [(fifo, "not a regular file"), (tmp_path, "Is a directory")]:
        config = make_config(tmp_path, "http://127.0.0.1:1", tokenFile=str(path))
        with pytest.raises(UserError) as caught:
            build_registrar(config, health=Health())
        assert str(caught.value) == f"k3s.tokenFile: cannot read {path}: {reason}"


def test_garbled_kubeconfig_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "k.yaml"
    bad.write_text("clusters: [\n")
    config = make_config(
        tmp_path, "http://127.0.0.1:1", tokenFile=None, apiServer=None, kubeconfigFile=str(bad)
    )
    with pytest.raises(UserError, match=r"k3s\.kubeconfigFile"):
        build_registrar(config, health=Health())


def test_systemd_credentials_directory_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exo_nixos.k3s.credentials import credential_path

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "k3s-token").write_text("t")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert credential_path("/root/secret/token", "token") == creds / "k3s-token"
    assert credential_path("/root/secret/ca.crt", "ca") == Path("/root/secret/ca.crt")


def test_slice_names_are_valid_object_names() -> None:
    assert slice_name("exo-api", "Node_A.example.com") == "exo-api-node-a.example.com"
    assert len(slice_name("exo-api", "x" * 400)) <= 253


def test_backoff_is_capped_and_grows() -> None:
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next() for _ in range(8)]
    assert all(0.5 <= d <= 8.0 for d in delays)
    assert max(delays[5:]) > 4.0 >= delays[0]
    backoff.reset()
    assert backoff.next() <= 1.0


def test_steady_state_only_reads(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        await until(lambda: len(api.statuses("GET")) >= 3, "a few resyncs")

    api = run_scenario(tmp_path, scenario)
    assert api.statuses("PUT") == []
    assert api.statuses("POST") == [201]


def test_stop_abandons_a_hanging_request_and_removes_the_endpoint(tmp_path: Path) -> None:
    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        api.hang = True
        health.healthy = False
        await until(lambda: reg.ready is False, "a write to a hanging API in flight")
        stop.set()
        await asyncio.sleep(0)
        api.release()

    api = run_scenario(tmp_path, scenario)
    assert api.get(NS, NAME) is None


def test_a_conflict_is_followed_by_a_read_then_a_write_with_the_new_version(
    tmp_path: Path,
) -> None:
    """Step by step, without the loop: after a 409 the registrar reads the object again and
    writes with the resourceVersion it just read; it neither repeats the stale write nor
    creates the object anew."""

    async def main() -> tuple[list[tuple[str, int]], str | None, str | None, bool | None]:
        api = KubeApiDouble(token=TOKEN)
        await api.start()
        reg = registrar_for(tmp_path, api, Health())
        try:
            reg.probes.passed()
            await reg.sync()
            assert [(s.method, s.status) for s in api.requests] == [("GET", 404), ("POST", 201)]
            api.requests.clear()

            def annotate(obj: dict[str, Any]) -> None:
                obj["metadata"]["annotations"] = {"touched-by": "kubectl"}

            api.modify(NS, NAME, annotate)  # the registrar's resourceVersion is now stale
            theirs = (api.get(NS, NAME) or {})["metadata"]["resourceVersion"]
            reg.probes.give_up()
            await reg.sync()
            seen = [(s.method, s.status) for s in api.requests]
            current = reg._current
            assert current is not None and current.metadata is not None
            ours = current.metadata.resourceVersion
            return seen, theirs, ours, api.ready(NS, NAME)
        finally:
            await reg.client.close()
            await api.stop()

    seen, theirs, ours, ready = asyncio.run(main())
    assert seen == [("PUT", 409), ("GET", 200), ("PUT", 200)]
    assert ready is False
    assert ours is not None and theirs is not None and int(ours) > int(theirs)


@pytest.mark.parametrize(
    "change",
    [
        lambda obj: obj["metadata"]["labels"].pop("endpointslice.kubernetes.io/managed-by"),
        lambda obj: obj["metadata"]["labels"].update({"kubernetes.io/service-name": "other"}),
        lambda obj: obj["ports"][0].update({"port": 1}),
        lambda obj: obj["endpoints"][0].update({"addresses": ["10.0.0.9"]}),
    ],
    ids=["managed-by label", "service label", "port", "address"],
)
def test_a_slice_changed_by_someone_else_is_put_back_at_the_next_resync(
    tmp_path: Path, change: Callable[[dict[str, Any]], Any]
) -> None:
    """What the Service routes by (its labels, address and port) is restored; nothing is
    written while the object already says it."""
    original: dict[str, Any] = {}

    def content(obj: dict[str, Any] | None) -> Any:
        assert obj is not None
        return (obj["metadata"]["labels"], obj["addressType"], obj["endpoints"], obj["ports"])

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        original.update({"content": content(api.get(NS, NAME))})
        assert api.statuses("PUT") == []
        api.modify(NS, NAME, change)
        assert content(api.get(NS, NAME)) != original["content"]
        await until(lambda: content(api.get(NS, NAME)) == original["content"], "put back")

    api = run_scenario(tmp_path, scenario)
    assert api.statuses("PUT") == [200]


def test_probe_verdicts_and_their_log_lines(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="exo_nixos.k3s.registrar")

    class Raising(Health):
        async def __call__(self) -> bool:
            self.calls += 1
            if not self.healthy:
                raise RuntimeError("probe broke")
            return True

    async def scenario(api: KubeApiDouble, reg: Registrar, health: Health, stop: asyncio.Event):
        await until(lambda: api.ready(NS, NAME) is True, "ready")
        health.healthy = False  # (a raising probe counts as a failed one)
        calls = health.calls
        await until(lambda: health.calls >= calls + 1, "one failed probe")
        assert reg.ready  # one failure is not enough (failures: 2)
        await until(lambda: api.ready(NS, NAME) is False, "not ready after two")
        health.healthy = True
        await until(lambda: api.ready(NS, NAME) is True, "ready again after one good probe")

    async def main() -> None:
        double = KubeApiDouble(token=TOKEN)
        await double.start()
        health = Raising(True)
        registrar = registrar_for(tmp_path, double, health)
        stop = asyncio.Event()
        task = asyncio.create_task(registrar.run(stop))
        try:
            await scenario(double, registrar, health, stop)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT_LIMIT)
            await registrar.client.close()
            await double.stop()

    asyncio.run(main())
    messages = caplog.messages
    assert messages.count("node healthy: endpoint ready") == 2
    assert "2 failed probes: endpoint not ready" in messages
    # a probe that raises is a failed probe, and says why at debug level
    assert "health probe raised RuntimeError: probe broke" in messages


def _api_error(code: int, reason: str | None, message: str | None, **headers: str) -> ApiError:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    if reason is not None:
        body["reason"] = reason
    if message is not None:
        body["message"] = message
    request = httpx2.Request("GET", "https://127.0.0.1:6443/apis")
    return ApiError(request, httpx2.Response(code, json=body, headers=headers, request=request))


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (_api_error(500, "InternalError", "boom"), "500 InternalError (boom)"),
        (_api_error(422, None, "bad name"), "422 (bad name)"),
        (_api_error(500, None, None), "500 (no message)"),
        (_api_error(410, "Gone", None), "410 Gone (Gone)"),
        (
            _api_error(401, "Unauthorized", "Unauthorized"),
            "401 Unauthorized (Unauthorized): the token or kubeconfig was rejected",
        ),
        (
            _api_error(403, "Forbidden", "no"),
            "403 Forbidden (no): apply the exo manifests (Role/RoleBinding)",
        ),
        (
            _api_error(429, "TooManyRequests", "slow down", **{"Retry-After": "2"}),
            "429 Too Many Requests (slow down); retrying after 2s as asked",
        ),
        (_api_error(429, "TooManyRequests", "slow down"), "429 Too Many Requests (slow down)"),
        (httpx2.ReadTimeout("read"), "API server timed out (ReadTimeout)"),
        (
            httpx2.HTTPStatusError(
                "bad gateway",
                request=httpx2.Request("GET", "https://127.0.0.1:6443/"),
                response=httpx2.Response(502),
            ),
            "API server answered 502 without a Kubernetes Status",
        ),
        (httpx2.ConnectError("refused"), "API server unreachable (ConnectError: refused)"),
        (ConnectionResetError("reset"), "API server unreachable (ConnectionResetError: reset)"),
        (KeyError("Content-Type"), "KeyError: 'Content-Type'"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_api_failure_is_described_in_one_line(exc: BaseException, line: str) -> None:
    """What an operator reads in the journal and in ``status`` for each kind of failure."""
    assert describe(exc) == line


@pytest.mark.parametrize(
    ("code", "header", "seconds"),
    [
        (429, "3", 3.0),
        (503, "1.5", 1.5),
        (429, "-5", 0.0),  # never a negative wait
        (429, "100000", 600.0),  # capped
        (429, "inf", None),
        (429, "nan", None),
        (429, "Wed, 21 Oct 2026 07:28:00 GMT", None),  # a date is ignored
        (429, None, None),
        (500, "3", None),  # only 429 and 503 ask for a wait
    ],
)
def test_retry_after_reads_the_servers_wait(code: int, header: str | None, seconds: float | None):
    headers = {"Retry-After": header} if header is not None else {}
    assert retry_after(_api_error(code, "X", "m", **headers)) == seconds
    assert retry_after(httpx2.ConnectError("refused")) is None


def test_writes_say_what_they_did_in_one_line_each(tmp_path: Path, caplog) -> None:
    """created, updated (with the readiness written), a conflict, and an object already there
    although it read as missing: one INFO line each, naming the object."""
    caplog.set_level(logging.INFO, logger="exo_nixos.k3s.registrar")

    def lines() -> list[tuple[int, str]]:
        found = [
            (r.levelno, r.getMessage())
            for r in caplog.records
            if r.name == "exo_nixos.k3s.registrar"
        ]
        caplog.clear()
        return found

    async def main() -> None:
        api = KubeApiDouble(token=TOKEN)
        await api.start()
        reg = registrar_for(tmp_path, api, Health())
        other = registrar_for(tmp_path, api, Health())
        try:
            await reg.sync()
            assert lines() == [(logging.INFO, f"created EndpointSlice {NS}/{NAME} (ready=False)")]
            reg.probes.passed()
            await reg.sync()
            assert lines() == [(logging.INFO, f"updated EndpointSlice {NS}/{NAME} (ready=True)")]
            await reg.sync()
            assert lines() == []  # nothing changed, nothing written

            def annotate(obj: dict[str, Any]) -> None:
                obj["metadata"]["annotations"] = {"touched-by": "kubectl"}

            api.modify(NS, NAME, annotate)
            reg.probes.give_up()
            await reg.sync()
            assert lines() == [
                (logging.INFO, f"conflict on {NAME} (stale resourceVersion); reading it again"),
                (logging.INFO, f"updated EndpointSlice {NS}/{NAME} (ready=False)"),
            ]
            # a read that missed the object (a stale cache behind a proxy): the create
            # answers 409 AlreadyExists, and the object is read and written instead
            api.fail_next = [Fault(404)]
            other.probes.passed()
            await other.sync()
            assert lines() == [
                (logging.INFO, f"{NAME} already exists; reading it"),
                (logging.INFO, f"updated EndpointSlice {NS}/{NAME} (ready=True)"),
            ]
            assert api.ready(NS, NAME) is True
            assert api.statuses("POST") == [201, 409]
        finally:
            await reg.client.close()
            await other.client.close()
            await api.stop()

    asyncio.run(main())


def test_a_removal_the_api_refuses_is_retried_with_growing_delays_until_the_stop_timeout(
    tmp_path: Path, caplog
) -> None:
    """On stop the slice is deleted; while the API refuses, the delete is retried at once
    (within the loop's first backoff), then after growing delays, and given up before the stop
    timeout (1 s here) so that the service stops in time, with a warning per retry and one
    error. Once the API answers, the removal says so."""
    caplog.set_level(logging.INFO, logger="exo_nixos.k3s.registrar")

    async def main() -> tuple[bool, float, list[float], bool, bool | None]:
        api = KubeApiDouble(token=TOKEN)
        await api.start()
        reg = registrar_for(tmp_path, api, Health())
        try:
            reg.probes.passed()
            await reg.sync()
            assert reg.published is True
            api.requests.clear()
            caplog.clear()
            api.fail_next = [Fault(500)] * 100
            started = time.monotonic()
            refused = await reg.remove()
            elapsed = time.monotonic() - started
            times = [s.at for s in api.requests if s.method == "DELETE"]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            api.fail_next = []
            removed = await reg.remove()
            return refused, elapsed, gaps, removed, reg.published
        finally:
            await reg.client.close()
            await api.stop()

    refused, elapsed, gaps, removed, published = asyncio.run(main())
    assert refused is False
    # backoff from 0.02 s doubling (with jitter): five retries or more fit in the second
    assert len(gaps) >= 4, gaps
    assert gaps[0] < 0.2, gaps  # the first retry comes at once, not after half a second
    assert gaps[-1] > 2 * gaps[0], gaps  # and the delays grow
    # given up when the next delay (up to 0.64 s) would pass the stop timeout: the last
    # attempt starts before it (its own request may end a little after, on a loaded machine)
    assert 0.3 <= elapsed < 1.25, elapsed
    reason = "500 InternalError (injected failure)"
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == log.name]
    assert records == [
        *[(logging.WARNING, f"removing the endpoint failed ({reason}); retrying")] * len(gaps),
        (logging.ERROR, f"could not remove the endpoint before stopping: {reason}"),
        (logging.INFO, f"removed EndpointSlice {NS}/{NAME}"),
    ]
    assert removed is True
    assert published is None


def test_an_unexpected_error_in_the_loop_ends_run_with_that_error(tmp_path: Path) -> None:
    """Only API failures are retried: anything else (here the address source breaking) ends
    ``run`` with that error rather than a loop that silently stopped."""

    async def main() -> None:
        api = KubeApiDouble(token=TOKEN)
        await api.start()
        reg = registrar_for(tmp_path, api, Health())

        def broken() -> str | None:
            raise RuntimeError("address source broke")

        reg.address = broken
        try:
            with pytest.raises(RuntimeError, match="address source broke"):
                await asyncio.wait_for(reg.run(asyncio.Event()), WAIT_LIMIT)
        finally:
            await reg.client.close()
            await api.stop()

    asyncio.run(main())
