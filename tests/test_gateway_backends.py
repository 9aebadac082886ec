"""The backend pool with a scripted probe: node identity and state-change logging."""

from __future__ import annotations

import asyncio
import logging

from exo_nixos.exoapi import ExoApiError, NodeView, Peer
from exo_nixos.gateway.backends import BackendPool
from exo_nixos.gateway.metrics import GatewayMetrics

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
