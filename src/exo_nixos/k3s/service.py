"""Wire the registrar to a config: credentials, client, health probe, signals."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal

from exo_nixos.addresses import local_api_url, url_for
from exo_nixos.backoff import Backoff
from exo_nixos.config import Config
from exo_nixos.errors import UserError
from exo_nixos.k3s.registrar import HealthCheck, Registrar, SliceSpec

log = logging.getLogger("exo_nixos.k3s")


def _loopback_for(listen: str) -> str:
    address = ipaddress.ip_address(listen)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return str(address)


def node_health(config: Config) -> HealthCheck:
    """Healthy when this node's EXO API probe finds no problem (the verdict of
    ``exo-nixos health`` exit 0: ``/node_id``, ``/state`` synced with a master, ``/models``)
    and, when the Service points at the gateway, the gateway answers ``/health`` with 200."""
    from exo_nixos.exoapi import ExoApiError, probe
    from exo_nixos.k3s.render import exposure
    from exo_nixos.network.instance_net import node_urls

    timeout = config.health_check.timeout_sec
    # one node per GPU: the host is healthy while one of its nodes is
    nodes = node_urls(config) or [local_api_url(config.api_port)]
    gateway_url: str | None = None
    if exposure(config).via_gateway:
        gateway = config.gateway
        scheme = "https" if gateway.tls_certificate_file else "http"
        gateway_url = (
            url_for(_loopback_for(gateway.listen_address), gateway.port, scheme) + "/health"
        )

    async def node_healthy(url: str) -> bool:
        try:
            view = await probe(url, timeout)
        except ExoApiError as exc:
            log.debug("node probe failed: %s", exc)
            return False
        if not view.healthy:
            log.debug("node degraded: %s", "; ".join(view.problems))
        return view.healthy

    async def check() -> bool:
        if not any([await node_healthy(url) for url in nodes]):
            return False
        if gateway_url is None:
            return True
        import aiohttp

        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                # The gateway's certificate names the host, not this address: the probe
                # checks liveness over loopback-equivalent paths only, so skip verification.
                session.get(gateway_url, ssl=False) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("gateway probe failed: %s", exc)
            return False

    return check


def build_registrar(
    config: Config,
    *,
    health: HealthCheck | None = None,
    resync: float = 60.0,
    backoff_initial: float = 1.0,
    backoff_max: float = 60.0,
    request_timeout: float = 10.0,
    stop_timeout: float = 10.0,
) -> Registrar:
    """A Registrar for ``config``; raises UserError for anything the user must fix."""
    import httpx2
    from lightkube import AsyncClient
    from lightkube.core.exceptions import ConfigError as KubeConfigError

    from exo_nixos.k3s.credentials import kube_config
    from exo_nixos.k3s.node import node_address, node_name
    from exo_nixos.k3s.render import exposure

    k3s = config.k3s
    if not k3s.integration or not k3s.service_discovery:
        raise UserError(
            "k3s.integration and k3s.serviceDiscovery must both be true to register this node"
        )
    if min(resync, backoff_initial, backoff_max, request_timeout) <= 0 or stop_timeout < 0:
        raise UserError("the --*-sec options must be positive")
    try:
        client = AsyncClient(
            config=kube_config(k3s),
            namespace=k3s.namespace,
            timeout=httpx2.Timeout(request_timeout),
            field_manager="exo-nixos",
            trust_env=False,
        )
    except (KubeConfigError, OSError, ValueError) as exc:
        raise UserError(f"k3s: cannot set up the Kubernetes client: {exc}") from None
    spec = SliceSpec(
        namespace=k3s.namespace,
        service=k3s.service_name,
        node_name=node_name(config),
        port=exposure(config).port,
    )
    return Registrar(
        client,
        spec,
        address=lambda: node_address(config),
        health=health or node_health(config),
        interval=config.health_check.interval_sec,
        failures=config.health_check.failures,
        resync=resync,
        backoff=Backoff(backoff_initial, backoff_max),
        stop_timeout=stop_timeout,
    )


async def _serve(registrar: Registrar) -> bool:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        return await registrar.run(stop)
    finally:
        await registrar.client.close()


def run_registrar(config: Config, registrar: Registrar) -> int:
    """``exo-nixos k3s register``: run ``registrar`` (from :func:`build_registrar`) until
    SIGTERM or SIGINT; 0 when stopped and the endpoint removed, 1 otherwise."""
    from exo_nixos.k3s.render import exposure

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    spec = registrar.spec
    log.info(
        "registering node %s as %s/%s for Service %s via %s",
        spec.node_name,
        spec.namespace,
        spec.name,
        spec.service,
        exposure(config).reason,
    )
    try:
        removed = asyncio.run(_serve(registrar))
    except Exception as exc:  # a failure the loop does not retry: one line, not a traceback
        log.error("registration stopped: %s", _reason(exc))
        return 1
    return 0 if removed else 1


def _reason(exc: BaseException) -> str:
    """``Type: message`` of the first failure inside (task groups nest the real one)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
