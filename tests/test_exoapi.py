"""exo_nixos.exoapi: parsing upstream's answers, and probing the test double for real."""

from __future__ import annotations

import asyncio
import copy
import functools
import http.server
import json
import threading
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_nixos.errors import UserError
from exo_nixos.exoapi import (
    ExoApiError,
    LogEvent,
    NodeView,
    normalize_url,
    parse_log_line,
    parse_state,
    parse_state_doc,
    probe,
    probe_sync,
    read_master_hint,
    write_master_hint,
)
from tests.exo_double.cluster import Cluster, DownloadSpec, PeerSpec
from tests.exo_double.fixture import free_port, run_double

MODEL = "mlx-community/Qwen3-0.6B-4bit"


@functools.cache
def _sample() -> dict[str, Any]:
    cluster = Cluster(
        node_id="self1",
        api_port=52415,
        peers=[PeerSpec("peer2", "10.0.0.2"), PeerSpec("peer3", "fd00::3")],
        instance_models=[MODEL],
    )
    return cluster.state()


def sample_state() -> dict[str, Any]:
    # one document for the whole module (the double's instance ids are random, and hypothesis
    # needs the same shape on every run); a copy: the mangling tests change it in place
    return copy.deepcopy(_sample())


def test_parse_state_reads_peers_instances_and_sync():
    summary = parse_state(sample_state(), "self1")
    assert [p.node_id for p in summary.peers] == ["peer2", "peer3"]
    peer2, peer3 = summary.peers
    assert peer2.api_urls == ("http://10.0.0.2:52415",)
    assert peer2.addresses == ("10.0.0.2",)
    # upstream's API listens on IPv4 only: no edge (and so no API URL) to an IPv6 address
    assert peer3.api_urls == ()
    assert peer3.addresses == ("fd00::3",)
    assert peer2.friendly_name == "double-peer2"
    (instance,) = summary.instances
    assert instance.model_id == MODEL
    assert instance.node_ids == ("self1", "peer2", "peer3")
    assert instance.kind == "MlxRingInstance"
    assert dict(instance.runner_status) == dict.fromkeys(instance.node_ids, "RunnerReady")
    assert summary.synced


def test_parse_state_tolerates_missing_and_unknown_fields():
    assert parse_state({}, "me").peers == ()
    doc = sample_state()
    doc["somethingNew"] = {"x": [1, 2]}
    del doc["nodeIdentities"], doc["runners"], doc["nodeNetwork"]
    for tagged in doc["instances"].values():
        tagged["MlxRingInstance"]["futureField"] = True
    summary = parse_state(doc, "self1")
    assert summary.peers[0].friendly_name is None
    assert summary.instances[0].runner_status == ()
    assert summary.instances[0].model_id == MODEL


def test_parse_state_skips_edges_it_does_not_know():
    doc = sample_state()
    connections = doc["topology"]["connections"]["self1"]
    connections["peer2"].append({"sourceRdmaIface": "rdma0", "sinkRdmaIface": "rdma1"})
    connections["peer2"].append("garbage")
    summary = parse_state(doc, "self1")
    assert summary.peers[0].api_urls == ("http://10.0.0.2:52415",)


def test_parse_state_accepts_untagged_instances_and_plain_multiaddr_strings():
    doc = {
        "topology": {
            "nodes": ["a", "b"],
            "connections": {"a": {"b": [{"sinkMultiaddr": "/ip4/192.0.2.7/tcp/8000"}]}},
        },
        "instances": {
            "i1": {"shardAssignments": {"modelId": "m", "nodeToRunner": {"a": "r1"}}},
        },
        "lastEventAppliedIdx": 0,
    }
    summary = parse_state(doc, "a")
    assert summary.peers[0].api_urls == ("http://192.0.2.7:8000",)
    assert summary.instances[0].node_ids == ("a",)
    assert summary.instances[0].kind == ""


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["topology"].update(nodes="a,b"), "topology.nodes is str"),
        (lambda d: d.update(instances=[]), "instances is list"),
        (lambda d: d.update(topology=3), "topology is int"),
    ],
)
def test_parse_state_names_the_wrong_field(mutate, message):
    doc = sample_state()
    mutate(doc)
    with pytest.raises(ExoApiError) as info:
        parse_state(doc, "self1")
    assert str(info.value).startswith("unexpected /state shape: ")
    assert message in str(info.value)
    assert info.value.kind == "shape"


def test_parse_state_rejects_non_objects():
    with pytest.raises(ExoApiError, match="the document is list"):
        parse_state([], "x")


def test_unsynced_state():
    doc = copy.deepcopy(sample_state())
    doc["lastEventAppliedIdx"] = -1
    assert not parse_state(doc, "self1").synced
    doc["lastEventAppliedIdx"] = True
    assert not parse_state(doc, "self1").synced


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (
            "[ 07:38:44.1230PM | \x1b[1mINFO    \x1b[0m] \x1b[1mNode elected Master - "
            "maintaining self\x1b[0m",
            LogEvent("elected", None),
        ),
        ("Node elected Master - promoting self", LogEvent("elected", None)),
        (
            "[ 2026-06-22 13:00:00.000 | INFO     | exo.main:_elect_loop:233 ] "
            "Node 9a8b elected master - demoting self",
            LogEvent("elected", "9a8b"),
        ),
        ("[ 01:02:03.0000AM | INFO    ] Node 9a8b elected master", LogEvent("elected", "9a8b")),
        ("[ 01:02:03.0000AM | INFO    ] Starting node 77ff", LogEvent("started", "77ff")),
        ("[ 01:02:03.0000AM | INFO    ] Node 9a8b elected masterful", None),
        ("random output", None),
        ("", None),
    ],
)
def test_parse_log_line(line, event):
    assert parse_log_line(line) == event


def test_master_hint_round_trip_and_staleness(tmp_path):
    assert read_master_hint(tmp_path, "n1") is None
    write_master_hint(tmp_path, "n1", "m9")
    assert read_master_hint(tmp_path, "n1") == "m9"
    assert read_master_hint(tmp_path, "n2") is None  # another run of exo: another node id
    (tmp_path / "master.json").write_text("{not json")
    assert read_master_hint(tmp_path, "n1") is None


def test_with_master():
    view = NodeView(url="http://x", node_id="n1")
    assert view.with_master("n1").is_master is True
    assert view.with_master("n2").is_master is False
    assert view.with_master(None).is_master is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:52415", "http://127.0.0.1:52415"),
        ("http://node-a:52415/", "http://node-a:52415"),
        ("https://[fd00::1]:8443", "https://[fd00::1]:8443"),
    ],
)
def test_normalize_url(given, expected):
    assert normalize_url(given) == expected


@pytest.mark.parametrize("bad", ["ftp://x:1", "http://", "http://[::1", "http://a b:1", "x:99999"])
def test_normalize_url_rejects(bad):
    with pytest.raises(ExoApiError, match="invalid URL") as info:
        normalize_url(bad)
    assert isinstance(info.value, UserError)


# --- against the double, a real process on a real socket -------------------------------------


def test_probe_healthy_node_with_peers_and_instance():
    with run_double("--peer", "beef01=10.1.0.2", "--instance", MODEL, node_id="cafe01") as double:
        view = probe_sync(double.url, 5)
    assert view.healthy
    assert view.node_id == "cafe01"
    assert view.url == double.url
    assert view.state_ok and view.models_ok and view.synced
    assert [p.node_id for p in view.peers] == ["beef01"]
    # the edge carries the observing node's own API port (upstream requires one port)
    assert view.peers[0].api_urls == (f"http://10.1.0.2:{double.port}",)
    assert [i.model_id for i in view.instances] == [MODEL]
    assert MODEL in view.model_ids
    assert view.master_id is None and view.is_master is None
    json.dumps(view.to_json())


@pytest.mark.parametrize(
    ("path", "problem"),
    [("/models", "HTTP 500 from /models"), ("/state", "HTTP 500 from /state")],
)
def test_probe_degraded_when_one_route_fails(path, problem):
    with run_double() as double:
        double.set_fault("error500", paths=[path])
        view = probe_sync(double.url, 5)
    assert view.problems == (problem,)
    assert not view.healthy
    assert view.models_ok == (path != "/models")
    assert view.state_ok == (path != "/state")


def test_probe_degraded_before_a_master_is_reached():
    with run_double("--no-master") as double:
        view = probe_sync(double.url, 5)
    assert view.problems == ("no master reached yet: /state has applied no events",)


def test_probe_down_when_nothing_listens():
    port = free_port()
    with pytest.raises(ExoApiError) as info:
        probe_sync(f"http://127.0.0.1:{port}", 2)
    assert str(info.value) == f"connection refused at http://127.0.0.1:{port}: is exo running?"
    assert info.value.kind == "refused"


def test_probe_down_when_node_id_fails():
    with run_double() as double:
        double.set_fault("error500", paths=["/node_id"])
        with pytest.raises(ExoApiError, match=r"^HTTP 500 from /node_id$"):
            probe_sync(double.url, 5)


def test_probe_down_on_hang_within_timeout():
    with run_double() as double:
        double.set_fault("hang")
        with pytest.raises(ExoApiError) as info:
            probe_sync(double.url, 0.5)
    assert str(info.value) == f"timed out after 0.5s waiting for {double.url}/node_id"
    assert info.value.kind == "timeout"


def test_probe_with_a_shared_session_and_inside_a_loop():
    async def both(url: str) -> tuple[NodeView, NodeView]:
        async with aiohttp.ClientSession() as session:
            first = await probe(url, 5, session=session)
        # probe_sync called where a loop is running must not fail
        second = probe_sync(url, 5)
        return first, second

    with run_double(node_id="abc123") as double:
        first, second = asyncio.run(both(double.url))
    assert first.node_id == second.node_id == "abc123"


def test_log_lines_of_the_double_name_the_master():
    with run_double("--peer", "feed42=10.0.0.9") as double:
        log = double.log_text()
    events = [e for e in map(parse_log_line, log.splitlines()) if e]
    assert LogEvent("started", double.node_id) in events
    assert LogEvent("elected", "feed42") in events


# --- whatever upstream sends, parsing ends in a summary or a one-line ExoApiError ------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
STATE_KEYS = [
    "topology",
    "instances",
    "runners",
    "nodeIdentities",
    "nodeNetwork",
    "lastSeen",
    "lastEventAppliedIdx",
]


def _parse_or_error(doc: Any) -> None:
    try:
        parse_state(doc, "self1")
    except ExoApiError as exc:
        assert "\n" not in str(exc)
        assert str(exc).startswith("unexpected /state shape: ")


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parse_state_never_crashes_on_any_json(doc):
    _parse_or_error(doc)


def _objects(doc: Any) -> list[dict[str, Any]]:
    """Every JSON object inside ``doc``, the document itself first."""
    found: list[dict[str, Any]] = []
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_parse_state_never_crashes_on_a_mangled_real_state(data):
    doc = sample_state()
    # Replace values anywhere in a real document with arbitrary JSON.
    for _ in range(data.draw(st.integers(1, 3))):
        objects = _objects(doc)
        target = objects[data.draw(st.integers(0, len(objects) - 1))]
        key = data.draw(st.sampled_from([*sorted(target), *STATE_KEYS]))
        target[key] = data.draw(json_values)
    _parse_or_error(doc)


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass


def _probe_error(handler: type[http.server.BaseHTTPRequestHandler], timeout: float) -> str:
    """The one line ``probe_sync`` raises against a plain HTTP server running ``handler``."""
    from exo_nixos.exoapi import ExoApiError, probe_sync

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ExoApiError) as caught:
            probe_sync(f"http://127.0.0.1:{server.server_address[1]}", timeout)
        return str(caught.value)
    finally:
        server.shutdown()


def test_a_node_answering_json_nested_too_deep_is_one_problem_not_a_traceback():
    body = b"[" * 100_000 + b"]" * 100_000

    class Deep(_Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    assert "did not answer JSON" in _probe_error(Deep, 5.0)


@pytest.mark.parametrize("length", [None, (32 << 20) + 1])
def test_a_node_answering_without_end_is_cut_off_at_the_limit(length: int | None):
    """Anything at a node's address that sends without end (or announces more than any answer
    holds) is one error line, read no further than the limit: the client's memory stays
    bounded whatever the time limit lets through."""
    sent = [0]

    class Endless(_Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if length is None:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            chunk = b"[" + b"0," * 32767 + b"0"
            framed = b"%x\r\n%s\r\n" % (len(chunk), chunk) if length is None else chunk
            try:
                while sent[0] < 1 << 30:
                    self.wfile.write(framed)
                    sent[0] += len(chunk)
            except OSError:
                pass  # the client stopped reading

    error = _probe_error(Endless, 30.0)
    if length is None:
        assert error == f"/node_id answered more than {32 << 20} bytes"
        assert sent[0] < 1 << 30  # it stopped reading
    else:
        assert error == f"/node_id answered {length} bytes, more than {32 << 20}"


# -- the /state models: what status, the exporter and a model reconciler read -------------

OTHER = "mlx-community/Llama-3.2-1B-Instruct-4bit"


def test_state_models_read_memory_backends_runners_and_downloads():
    cluster = Cluster(
        node_id="self1",
        api_port=52415,
        peers=[PeerSpec("peer2", "10.0.0.2")],
        instance_models=[MODEL],
        runner_status="RunnerLoading",
        downloads=[DownloadSpec(OTHER, 40.0)],
        backends=["MlxCuda"],
        override_memory_mb=2048,
    )
    state = parse_state_doc(copy.deepcopy(cluster.state()))
    assert state.synced
    assert state.node_ids() == ("self1", "peer2")
    mine, theirs = state.node_memory["self1"], state.node_memory["peer2"]
    assert mine.ram_available.in_bytes == 2048 << 20  # OVERRIDE_MEMORY_MB, as upstream
    assert mine.ram_used_bytes == mine.ram_total.in_bytes - (2048 << 20)
    assert theirs.ram_total.in_bytes == 64 << 30
    assert state.node_backends["peer2"] == ["MlxCuda"]
    (instance,) = state.instances.values()
    assert (instance.model_id, instance.meta, instance.sharding) == (MODEL, "MlxRing", "Pipeline")
    assert instance.node_ids == ("self1", "peer2")
    runner = state.runner_of("peer2", instance)
    assert runner is not None
    assert (runner.name, runner.layers_loaded, runner.total_layers) == ("Loading", 14, 28)
    by_model = {d.model_id: d for d in state.downloads["self1"]}
    assert by_model[MODEL].status == "Completed"
    assert by_model[MODEL].fraction == 1.0
    ongoing = by_model[OTHER]
    assert ongoing.status == "Ongoing"
    assert ongoing.total_bytes == 729808896
    assert ongoing.fraction == pytest.approx(0.4, abs=0.001)
    assert [d.model_id for d in state.downloads["peer2"]] == [MODEL]


def test_state_models_accept_snake_case_and_ignore_unknown_fields():
    doc = {
        "node_memory": {"n1": {"ram_total": {"in_bytes": 8}, "ram_available": {"inBytes": 3}}},
        "last_event_applied_idx": 4,
        "downloads": {
            "n1": [{"DownloadFailed": {"node_id": "n1", "error_message": "disk full", "x": 1}}]
        },
        "somethingNew": [1],
    }
    state = parse_state_doc(doc)
    assert state.node_memory["n1"].ram_used_bytes == 5
    assert state.synced
    (failed,) = state.downloads["n1"]
    assert (failed.status, failed.error_message, failed.fraction) == ("Failed", "disk full", 0.0)


def test_state_models_name_a_wrong_nested_field():
    doc = sample_state()
    doc["nodeMemory"]["peer2"]["ramTotal"] = {"inBytes": "many"}
    with pytest.raises(ExoApiError, match=r"nodeMemory\.peer2\.ramTotal\.inBytes is str"):
        parse_state(doc, "self1")


def test_probe_keeps_the_whole_state_of_a_real_double():
    args = ("--instance", MODEL, "--download", f"{OTHER}=25", "--runner-status", "RunnerFailed")
    with run_double(*args, env={"OVERRIDE_MEMORY_MB": "1000"}) as double:
        view = probe_sync(double.url, 5.0)
    assert view.state is not None
    assert view.state.node_memory[double.node_id].ram_available.in_bytes == 1000 << 20
    (instance,) = view.state.instances.values()
    runner = view.state.runner_of(double.node_id, instance)
    assert runner is not None
    assert (runner.name, runner.error_message) == ("Failed", "runner process exited")
    fractions = {d.model_id: d.fraction for d in view.state.downloads[double.node_id]}
    assert fractions[OTHER] == pytest.approx(0.25, abs=0.001)
