"""One node per GPU: the gateway and the K3s registrar see each of the host's nodes.

Each node is reached at its own address; here the nodes' addresses are loopback addresses
(``127.0.0.2``, ``127.0.0.3``) and the test double of EXO, bound to one of them, stands in for
a node.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from exo_nixos.config import Config, parse_config
from exo_nixos.gateway.server import build_gateway
from exo_nixos.k3s.service import node_health
from exo_nixos.network.instance_net import link_local_v4, node_urls
from tests.exo_double.fixture import free_port, run_double

MACHINE = "0123456789abcdef0123456789abcdef"


def _config(port: int, addresses: list[str] | None = None, **extra: Any) -> Config:
    node_per_gpu: dict[str, Any] = {"enable": True, "groups": [[0], [1]]}
    if addresses is not None:
        node_per_gpu["addresses"] = addresses
    return parse_config(
        {
            "schemaVersion": 1,
            "apiPort": port,
            "networking": {"bondInterface": "bond0"},
            "hardware": {"nodePerGpu": node_per_gpu},
            **extra,
        }
    )


def test_node_urls_are_the_configured_or_derived_addresses() -> None:
    configured = _config(52415, ["10.0.0.11/24", "10.0.0.12/24"])
    assert node_urls(configured) == ["http://10.0.0.11:52415", "http://10.0.0.12:52415"]
    derived = node_urls(_config(52415), machine_id=MACHINE)
    assert derived == [
        f"http://{link_local_v4(MACHINE, name).split('/')[0]}:52415" for name in ("gpu0", "gpu1")
    ]
    assert node_urls(parse_config({"schemaVersion": 1})) == []


def test_the_gateway_has_each_node_as_a_backend() -> None:
    config = _config(52415, ["10.0.0.11/24", "10.0.0.12/24"])
    pool = build_gateway(config).pool
    assert pool.local is None, "nothing listens on the host's own loopback"
    assert [b.url for b in pool.static] == ["http://10.0.0.11:52415", "http://10.0.0.12:52415"]


def test_the_registrar_counts_the_host_healthy_while_one_node_is() -> None:
    port = free_port()
    config = _config(port, ["127.0.0.2/8", "127.0.0.3/8"])
    health = node_health(config)

    async def check() -> bool:
        return await health()

    assert asyncio.run(check()) is False  # no node answers
    with run_double("--force-master", "--bind", "127.0.0.3", port=port, wait=False):
        deadline = time.monotonic() + 20
        while not asyncio.run(check()):  # gpu0 (127.0.0.2) stays down, gpu1 comes up
            assert time.monotonic() < deadline, "the host never counted healthy"
            time.sleep(0.2)
