"""Keep this node's EndpointSlice in step with the health of its EXO node.

One EndpointSlice per node (``<service>-<node>``), labelled for the selector-less Service,
so nodes never write the same object. The loop probes the node every ``interval`` seconds;
the endpoint is ``ready`` after one good probe and not ready after ``failures`` bad ones in a
row. Writes use the resourceVersion of the last object the server returned (optimistic
concurrency): a 409 means someone else changed the object, so the registrar reads it again
and retries. While the API server cannot be reached or refuses (5xx, timeouts, 401, 403) the
loop retries with capped exponential backoff, still probing health so the first write after
an outage carries the current state. On stop the slice is deleted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.core.exceptions import ConfigError as KubeConfigError
from lightkube.models.discovery_v1 import Endpoint, EndpointConditions, EndpointPort
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.discovery_v1 import EndpointSlice

from exo_nixos.backoff import Backoff
from exo_nixos.hysteresis import UpDown
from exo_nixos.k3s.render import MANAGED_BY, MANAGED_BY_LABEL, PORT_NAME, SERVICE_NAME_LABEL

HealthCheck = Callable[[], Awaitable[bool]]
AddressSource = Callable[[], str | None]

MAX_CONFLICT_RETRIES = 5
log = logging.getLogger("exo_nixos.k3s.registrar")


class RegistrarError(Exception):
    """A write to the API server failed; the message is one line saying why.
    ``retry_after``: the seconds the server asked to wait (429 ``Retry-After``), if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


MAX_RETRY_AFTER = 600.0


def retry_after(exc: BaseException) -> float | None:
    """The delay a 429 (or 503) asks for in ``Retry-After`` (seconds; an HTTP date is not
    sent by kube-apiserver and is ignored), capped at ``MAX_RETRY_AFTER``."""
    if not isinstance(exc, httpx2.HTTPStatusError):
        return None
    response = exc.response
    if response is None or response.status_code not in (429, 503):
        return None
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None


@dataclass(frozen=True)
class SliceSpec:
    """What this node publishes: where its endpoint lives and which port it serves."""

    namespace: str
    service: str
    node_name: str
    port: int

    @property
    def name(self) -> str:
        return slice_name(self.service, self.node_name)


def slice_name(service: str, node: str) -> str:
    """``<service>-<node>`` as a valid object name (DNS subdomain, at most 253 characters)."""
    cleaned = re.sub(r"[^a-z0-9.-]+", "-", node.lower()).strip("-.") or "node"
    return f"{service}-{cleaned}"[:253].rstrip("-.")


def build_slice(spec: SliceSpec, address: str, ready: bool) -> EndpointSlice:
    family = "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"
    return EndpointSlice(
        metadata=ObjectMeta(
            name=spec.name,
            namespace=spec.namespace,
            labels={
                SERVICE_NAME_LABEL: spec.service,
                MANAGED_BY_LABEL: MANAGED_BY,
                "kubernetes.io/hostname": spec.node_name,
            },
        ),
        addressType=family,
        endpoints=[
            Endpoint(
                addresses=[address],
                conditions=EndpointConditions(ready=ready, serving=ready, terminating=False),
                nodeName=spec.node_name,
            )
        ],
        ports=[EndpointPort(name=PORT_NAME, port=spec.port, protocol="TCP", appProtocol="http")],
    )


def _content(obj: EndpointSlice) -> dict[str, Any]:
    data = obj.to_dict()
    labels = data.get("metadata", {}).get("labels", {})
    return {
        "labels": {k: labels.get(k) for k in (SERVICE_NAME_LABEL, MANAGED_BY_LABEL)},
        "addressType": data.get("addressType"),
        "endpoints": data.get("endpoints"),
        "ports": data.get("ports"),
    }


def describe(exc: BaseException) -> str:
    """One line for an API failure: what happened and what usually fixes it."""
    if isinstance(exc, ApiError):
        code = exc.status.code
        message = exc.status.message or exc.status.reason or "no message"
        if code == 401:
            return f"401 Unauthorized ({message}): the token or kubeconfig was rejected"
        if code == 403:
            return f"403 Forbidden ({message}): apply the exo manifests (Role/RoleBinding)"
        if code == 429:
            wait = retry_after(exc)
            after = f"; retrying after {wait:g}s as asked" if wait is not None else ""
            return f"429 Too Many Requests ({message}){after}"
        return f"{code} {exc.status.reason or ''} ({message})".replace("  ", " ")
    if isinstance(exc, httpx2.TimeoutException):
        return f"API server timed out ({type(exc).__name__})"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"API server answered {exc.response.status_code} without a Kubernetes Status"
    if isinstance(exc, httpx2.HTTPError | OSError):
        return f"API server unreachable ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


_API_FAILURES = (ApiError, httpx2.HTTPError, OSError, KubeConfigError)


class Registrar:
    """The loop behind ``exo-nixos k3s register``; health and clock are injectable."""

    def __init__(
        self,
        client: AsyncClient,
        spec: SliceSpec,
        *,
        address: AddressSource,
        health: HealthCheck,
        interval: float = 5.0,
        failures: int = 3,
        resync: float = 60.0,
        backoff: Backoff | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        self.client = client
        self.spec = spec
        self.address = address
        self.health = health
        self.interval = interval
        self.probes = UpDown(failures)
        self.resync = resync
        self.backoff = backoff or Backoff()
        self.stop_timeout = stop_timeout
        self.published: bool | None = None
        self.last_error: str | None = None
        self._current: EndpointSlice | None = None

    @property
    def ready(self) -> bool:
        """Whether the endpoint is published as ready (the node passed its last probes)."""
        return self.probes.up

    async def _probe(self) -> None:
        try:
            healthy = await self.health()
        except Exception as exc:
            log.debug("health probe raised %s: %s", type(exc).__name__, exc)
            healthy = False
        if healthy:
            if self.probes.passed():
                log.info("node healthy: endpoint ready")
        elif self.probes.failed_probe():
            log.warning("%d failed probes: endpoint not ready", self.probes.failed)

    async def _get(self) -> EndpointSlice | None:
        try:
            return await self.client.get(
                EndpointSlice, self.spec.name, namespace=self.spec.namespace
            )
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    async def sync(self, refresh: bool = False) -> None:
        """Write the endpoint with the current ``ready``; raise RegistrarError on failure."""
        address = self.address()
        if address is None:
            raise RegistrarError("no address for this node: set k3s.nodeAddress")
        desired = build_slice(self.spec, address, self.ready)
        try:
            await self._write(desired, refresh)
        except RegistrarError:
            raise
        except _API_FAILURES as exc:
            raise RegistrarError(describe(exc), retry_after(exc)) from exc
        except (KeyError, ValueError) as exc:
            # A body that is not a Kubernetes object, or an error without Content-Type
            # (lightkube looks that header up): a proxy or a broken server, retried like 5xx.
            raise RegistrarError(
                f"unexpected answer from the API server ({type(exc).__name__}: {exc})"
            ) from exc
        self.published = self.ready

    async def _write(self, desired: EndpointSlice, refresh: bool) -> None:
        ns, name = self.spec.namespace, self.spec.name
        for _ in range(MAX_CONFLICT_RETRIES):
            current = self._current
            if current is None or refresh:
                current = await self._get()
                refresh = False
            if current is None:
                try:
                    self._current = await self.client.create(desired)
                except ApiError as exc:
                    if exc.status.code != 409:
                        raise
                    log.info("%s already exists; reading it", name)
                    refresh = True
                    continue
                log.info("created EndpointSlice %s/%s (ready=%s)", ns, name, self.ready)
                return
            if current.addressType != desired.addressType:
                # addressType is immutable: replace the object.
                await self._delete()
                self._current = None
                continue
            if _content(current) == _content(desired):
                self._current = current
                return
            assert current.metadata is not None and desired.metadata is not None
            desired.metadata.resourceVersion = current.metadata.resourceVersion
            try:
                self._current = await self.client.replace(desired)
            except ApiError as exc:
                if exc.status.code == 409:
                    log.info("conflict on %s (stale resourceVersion); reading it again", name)
                elif exc.status.code != 404:
                    raise
                self._current = None
                refresh = True
                continue
            log.info("updated EndpointSlice %s/%s (ready=%s)", ns, name, self.ready)
            return
        raise RegistrarError(f"{MAX_CONFLICT_RETRIES} conflicts in a row writing {ns}/{name}")

    async def _delete(self) -> None:
        try:
            await self.client.delete(EndpointSlice, self.spec.name, namespace=self.spec.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def remove(self) -> bool:
        """Delete this node's slice, retrying until ``stop_timeout``; True when it is gone."""
        deadline = time.monotonic() + self.stop_timeout
        backoff = Backoff(min(self.backoff.initial, 0.5), 2.0)
        while True:
            try:
                await self._delete()
            except (*_API_FAILURES, KeyError, ValueError) as exc:
                reason = describe(exc)
                delay = backoff.next()
                if time.monotonic() + delay >= deadline:
                    log.error("could not remove the endpoint before stopping: %s", reason)
                    return False
                log.warning("removing the endpoint failed (%s); retrying", reason)
                await asyncio.sleep(delay)
                continue
            self._current = None
            self.published = None
            log.info("removed EndpointSlice %s/%s", self.spec.namespace, self.spec.name)
            return True

    async def run(self, stop: asyncio.Event) -> bool:
        """Run until ``stop`` is set, then remove the endpoint; True when it was removed.

        A request in flight when ``stop`` is set is abandoned, so the removal starts at once.
        """
        work = asyncio.create_task(self._loop())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, stopped):
                task.cancel()
            await asyncio.gather(work, stopped, return_exceptions=True)
        error = None if work.cancelled() else work.exception()
        if error is not None:
            raise error
        return await self.remove()

    async def _loop(self) -> None:
        last_sync = float("-inf")
        failing = False
        while True:
            await self._probe()
            due = time.monotonic() - last_sync >= self.resync
            delay = self.interval
            if failing or due or self.published != self.ready:
                try:
                    await self.sync(refresh=due or failing)
                except RegistrarError as exc:
                    delay = self.backoff.next()
                    if exc.retry_after is not None:  # the server said when: not sooner
                        delay = max(delay, exc.retry_after)
                    if str(exc) != self.last_error:
                        log.warning("registration failed: %s; retrying", exc)
                    self.last_error = str(exc)
                    failing = True
                else:
                    if failing:
                        log.info("API server reachable again")
                    failing = False
                    self.last_error = None
                    self.backoff.reset()
                    last_sync = time.monotonic()
            await asyncio.sleep(delay)
