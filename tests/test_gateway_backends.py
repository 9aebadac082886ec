"""The backend pool with a scripted probe: node identity and state-change logging."""

from __future__ import annotations

import asyncio
import logging

from exo_nixos.exoapi import ExoApiError, NodeView, Peer
from exo_nixos.gateway.backends import Backend, BackendPool
from exo_nixos.gateway.metrics import GatewayMetrics
from exo_nixos.hysteresis import UpDown

LOCAL = "http://127.0.0.1:52415"
PEER = "http://127.0.0.2:52415"


def pool_with(answers: dict[str, str | None], peers: tuple[Peer, ...] = ()) -> BackendPool:
    """A pool whose probe finds node ``answers[url]`` at each URL (None: nothing answers)."""

    async def probe(url: str, timeout: float) -> NodeView:  # noqa: ASYNC109
        node = answers.get(url)
        if node is None:
            raise ExoApiError(f"cannot connect to {url}", kind="connect")
        return NodeView(url=url, node_id=node, peers=peers, state_ok=True, synced=True)

    return BackendPool(
        local_url=LOCAL,
        static_urls=[],
        api_port=52415,
        interval=1.0,
        timeout=1.0,
        failures=2,
        metrics=GatewayMetrics(),
        probe=probe,
    )


def test_peer_address_that_is_another_node_does_not_count_as_the_peer(caplog):
    # The peer's first URL is where the local node is reached: it answers as "local".
    answers: dict[str, str | None] = {LOCAL: "local", PEER: None}
    pool = pool_with(answers, peers=(Peer("peer1", api_urls=(LOCAL, PEER)),))

    async def scenario() -> None:
        with caplog.at_level(logging.INFO):
            await pool.check_once()
            await pool.check_once()
        assert pool.summary() == {"healthy": 1, "total": 2}
        peer = pool.peers["peer1"]
        assert not peer.healthy and peer.node_id == "peer1"
        assert [b.node_id for b in pool.healthy()] == ["local"]
        assert any(
            f"{LOCAL} answers as node local, not as peer1" in r.getMessage() for r in caplog.records
        )
        # the peer's own address comes up: it is used, under its own id
        answers[PEER] = "peer1"
        await pool.check_once()
        await pool.check_once()
        assert peer.healthy and peer.url == PEER
        assert pool.summary() == {"healthy": 2, "total": 2}

    asyncio.run(scenario())


def test_a_backend_never_up_is_logged_once_per_state_change(caplog):
    answers: dict[str, str | None] = {LOCAL: None}
    pool = pool_with(answers)

    async def scenario() -> None:
        with caplog.at_level(logging.INFO):
            for _ in range(5):
                await pool.check_once()
            answers[LOCAL] = "local"
            for _ in range(3):
                await pool.check_once()
            answers[LOCAL] = None
            for _ in range(5):
                await pool.check_once()

    asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"backend {LOCAL} down: cannot connect to {LOCAL}",
        "no EXO backend is up (1 known): requests get 502 until one is",
        f"backend {LOCAL} up (node local)",
        "EXO backends up again: 1 of 1",
        f"backend {LOCAL} down: cannot connect to {LOCAL}",
        "no EXO backend is up (1 known): requests get 502 until one is",
    ]


def gauge(pool: BackendPool, name: str, backend: str | None = None) -> float | None:
    labels = {"backend": backend} if backend is not None else None
    return pool.metrics.registry.get_sample_value(name, labels)


def scripted_pool(views: dict[str, list[NodeView | None]], failures: int = 2) -> BackendPool:
    """A pool whose probe answers each URL from its list in turn (None: cannot connect)."""

    async def probe(url: str, timeout: float) -> NodeView:  # noqa: ASYNC109
        assert timeout == 1.5
        answers = views.get(url) or [None]
        view = answers.pop(0) if len(answers) > 1 else answers[0]
        if view is None:
            raise ExoApiError(f"cannot connect to {url}", kind="connect")
        return view

    return BackendPool(
        local_url=LOCAL,
        static_urls=[],
        api_port=52415,
        interval=1.0,
        timeout=1.5,
        failures=failures,
        metrics=GatewayMetrics(),
        probe=probe,
    )


def local_view(*peers: Peer, problems: tuple[str, ...] = ()) -> NodeView:
    return NodeView(
        url=LOCAL, node_id="local", peers=peers, state_ok=True, synced=True, problems=problems
    )


def test_peers_come_from_the_local_nodes_state(caplog):
    peers = (
        Peer("nowhere", addresses=("fe80::1", "not an address")),  # no usable address: skipped
        Peer("local", addresses=("10.0.0.1",)),  # the node itself
        Peer("p1", addresses=("/ip4/10.0.0.2/tcp/52414", "10.0.0.3:1"), api_urls=(PEER,)),
        Peer("p2", addresses=("fd00::2",)),
    )
    views: dict[str, list[NodeView | None]] = {LOCAL: [local_view(*peers), local_view(peers[3])]}
    pool = scripted_pool(views)

    async def scenario() -> None:
        with caplog.at_level(logging.INFO):
            await pool.check_once()
            assert {n: (b.urls, b.source, b.node_id) for n, b in pool.peers.items()} == {
                "p1": (
                    [PEER, "http://10.0.0.2:52415", "http://10.0.0.3:52415"],
                    "peer",
                    "p1",
                ),
                "p2": (["http://[fd00::2]:52415"], "peer", "p2"),
            }
            assert pool.summary() == {"healthy": 1, "total": 3}
            assert gauge(pool, "exo_gateway_backend_up", PEER) == 0
            await pool.check_once()  # p1 left the state
            assert list(pool.peers) == ["p2"]
            assert gauge(pool, "exo_gateway_backend_up", PEER) is None

    asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert (
        f"peer p1 found at {PEER}, http://10.0.0.2:52415, http://10.0.0.3:52415" in lines
        and "peer p2 found at http://[fd00::2]:52415" in lines
        and "peer p1 left the cluster state" in lines
    )


def test_a_backend_goes_down_after_the_threshold_of_failed_probes_in_a_row(caplog):
    good = local_view()
    views: dict[str, list[NodeView | None]] = {LOCAL: [good, None, good, None, None, good]}
    pool = scripted_pool(views, failures=2)
    local = pool.local
    assert local is not None

    async def scenario() -> list[tuple[bool, int]]:
        seen = []
        for _ in range(6):
            await pool.check_once()
            seen.append((local.healthy, local.probes.failed))
        return seen

    # one failure between good probes is forgiven; two in a row take it down
    assert asyncio.run(scenario()) == [
        (True, 0),
        (True, 1),
        (True, 0),
        (True, 1),
        (False, 2),
        (True, 0),
    ]
    assert gauge(pool, "exo_gateway_backend_up", LOCAL) == 1
    assert gauge(pool, "exo_gateway_backends_healthy") == 1


def test_problems_are_the_reason_a_backend_is_down(caplog):
    views: dict[str, list[NodeView | None]] = {LOCAL: [local_view(problems=("a bad", "b bad"))]}
    pool = scripted_pool(views)
    with caplog.at_level(logging.WARNING):
        asyncio.run(pool.check_once())
    assert caplog.records[0].getMessage() == f"backend {LOCAL} down: a bad; b bad"
    assert pool.local is not None and not pool.local.healthy


def test_mark_failed_and_the_next_address():
    pool = scripted_pool({}, failures=3)
    single = pool.local
    assert single is not None
    asyncio.run(pool.check_once())
    multi = Backend(
        ["http://10.0.0.2:1", "http://10.0.0.3:1", "http://10.0.0.4:1"], "peer", probes=UpDown(3)
    )
    multi.healthy = True
    pool.peers["p"] = multi
    pool.mark_failed(multi, "refused")
    assert (multi.healthy, multi.probes.failed, multi.url) == (False, 3, "http://10.0.0.3:1")
    pool.mark_failed(multi, "refused")
    pool.mark_failed(multi, "refused")
    assert multi.url == "http://10.0.0.2:1"  # round the list, in order
    pool.mark_failed(single, "refused")
    assert single.url == LOCAL and single.probes.failed == 3
    assert gauge(pool, "exo_gateway_backend_up", multi.label) == 0


def test_inflight_counts_and_the_least_busy_first():
    views: dict[str, list[NodeView | None]] = {LOCAL: [local_view()]}
    pool = scripted_pool(views)
    asyncio.run(pool.check_once())
    other = Backend(["http://10.0.0.9:1"], "static", healthy=True, probes=UpDown(3))
    pool.static.append(other)
    local = pool.local
    assert local is not None
    pool.started(local)
    pool.started(local)
    assert local.inflight == 2
    assert gauge(pool, "exo_gateway_backend_inflight", LOCAL) == 2
    for _ in range(3):
        assert pool.candidates()[0] is other
    pool.finished(local)
    pool.finished(local)
    assert local.inflight == 0
    assert gauge(pool, "exo_gateway_backend_inflight", LOCAL) == 0


def test_a_peer_that_answers_as_another_node_is_down_at_once():
    peer = Peer("p1", api_urls=(PEER,))
    views: dict[str, list[NodeView | None]] = {
        LOCAL: [local_view(peer)],
        PEER: [
            NodeView(url=PEER, node_id="p1", state_ok=True, synced=True),
            NodeView(url=PEER, node_id="someone-else", state_ok=True, synced=True),
        ],
    }
    pool = scripted_pool(views, failures=3)

    async def scenario() -> None:
        await pool.check_once()
        assert pool.peers["p1"].healthy
        await pool.check_once()  # one probe, below the threshold of 3: down all the same
        assert not pool.peers["p1"].healthy

    asyncio.run(scenario())


def test_a_peers_addresses_follow_the_cluster_state():
    views: dict[str, list[NodeView | None]] = {
        LOCAL: [
            local_view(Peer("p1", addresses=("10.0.0.2",))),
            local_view(Peer("p1", addresses=("10.0.0.3",))),
        ]
    }
    pool = scripted_pool(views)

    async def scenario() -> None:
        await pool.check_once()
        assert pool.peers["p1"].urls == ["http://10.0.0.2:52415"]
        await pool.check_once()
        assert pool.peers["p1"].urls == ["http://10.0.0.3:52415"]

    asyncio.run(scenario())
