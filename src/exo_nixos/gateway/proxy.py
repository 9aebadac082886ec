"""The gateway's HTTP application, on aiohttp's extension points.

Two middlewares run around every handler: ``timed`` (connection bookkeeping, the request
counters and durations, nginx's 499 for a client that left) and ``authenticated`` (the API
key, except on public paths). ``/health`` and ``/metrics`` are routes of their own; every
other path goes to ``proxy``, which tries the backends in turn: ``attempt`` sends the request
and reads a whole document (so a backend failing half way through one is retried elsewhere),
``relay`` passes a stream on as it arrives. When a response starts (its headers go out) is
recorded by the application's ``on_response_prepare`` signal, not by each branch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from exo_nixos.gateway.auth import KeyStore, presented_key
from exo_nixos.gateway.backends import Backend, BackendPool
from exo_nixos.gateway.connections import ConnectionLimits
from exo_nixos.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from exo_nixos.gateway.policy import Limiter, Refusal, Usage, UsageScanner, request_model

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
CLIENT_CLOSED = 499
METRICS_PATH = "/metrics"

# RFC 9110 7.6.1 connection-specific headers, never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers the gateway consumes or sets itself (it answers Expect: 100-continue and
# has the whole body before it forwards a request).
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key", "expect"}
# Response headers the gateway sets itself; EXO's blanket CORS grant is not passed on.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server"}
_RESPONSE_DROP_PREFIX = "access-control-"

_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# Responses up to this size with a known length are read whole before answering, so a backend
# failing in the middle of one is retried like a failure before the response.
BUFFER_LIMIT = 1 << 20


@dataclass
class RequestState:
    """What the gateway learns about one request, kept on it."""

    started: float  # time.perf_counter() when it arrived
    key: str | None = None  # the name of the key it was let in with (None: none needed)
    model: str = ""  # the model it names
    usage: Usage | None = None  # the tokens its answer reported


try:
    _STATE: Any = web.RequestKey("exo_gateway", RequestState)
except AttributeError:  # aiohttp before 3.12 (Debian 13 ships 3.11): a plain key
    _STATE = "exo_gateway"
_REFUSAL_TYPES = {403: "permission_error", 429: "rate_limit_error"}


@dataclass(frozen=True)
class ProxySettings:
    public_paths: frozenset[str] = field(default_factory=lambda: frozenset({HEALTH_PATH}))
    max_body_bytes: int = 64 << 20
    connect_timeout: float = 5.0
    response_timeout: float = 900.0
    stream_idle_timeout: float = 300.0
    header_read_timeout: float = 10.0
    max_connections_per_address: int = 256
    max_attempts: int = 3


def _whole_document(upstream: aiohttp.ClientResponse) -> bool:
    """Whether to read the response before answering: JSON documents (EXO sends non-streamed
    completions chunked, without a length) and anything else with a small known length.
    Event streams and NDJSON streams (Ollama's) are passed on as they arrive."""
    if upstream.content_type in {"text/event-stream", "application/x-ndjson"}:
        return False
    length = upstream.content_length
    if length is not None:
        return length <= BUFFER_LIMIT
    return upstream.content_type == "application/json"


async def _read_upto(
    upstream: aiohttp.ClientResponse, limit: int, idle: float
) -> tuple[bytes, bool]:
    """Read the body until its end or past ``limit`` bytes; return it and whether it ended.
    TimeoutError when ``idle`` seconds pass without data."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        async with asyncio.timeout(idle):
            chunk = await upstream.content.readany()
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), False


def _cut(request: web.Request) -> None:
    """Close the client's connection in the middle of a response."""
    if request.transport is not None:
        request.transport.close()


class BackendFailed(Exception):
    """The backend failed before anything was sent to the client: try another.
    ``responded``: its response had started (it failed while the gateway read it)."""

    def __init__(self, reason: str, *, responded: bool = False) -> None:
        super().__init__(reason)
        self.responded = responded


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An OpenAI-style JSON error, as clients of EXO's API expect one."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def _end_to_end(
    headers: CIMultiDictProxy[str], drop: frozenset[str], drop_prefix: str | None = None
) -> CIMultiDict[str]:
    """``headers`` less those in ``drop``, those the Connection header names (RFC 9110
    7.6.1) and, with ``drop_prefix``, those whose name starts with it."""
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower in named:
            continue
        if drop_prefix is not None and lower.startswith(drop_prefix):
            continue
        kept.add(name, value)
    return kept


def forward_request_headers(request: web.Request) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones and its key, plus X-Forwarded-*."""
    headers = _end_to_end(request.headers, _REQUEST_DROP)
    peer = request.remote or ""
    previous = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
    headers["X-Forwarded-Proto"] = request.scheme
    if request.host:
        headers["X-Forwarded-Host"] = request.host
    return headers


def forward_response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    return _end_to_end(upstream.headers, _RESPONSE_DROP, _RESPONSE_DROP_PREFIX)


@dataclass(frozen=True)
class Forward:
    """What one attempt sends: the request as the backend gets it."""

    method: str
    target: str  # path and query, as the client sent them
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Answer:
    """A backend's response as far as ``attempt`` read it: ``body`` whole when ``complete``,
    else its first bytes, the rest still to come from ``upstream``."""

    upstream: aiohttp.ClientResponse
    headers: CIMultiDict[str]
    body: bytes
    complete: bool


async def attempt(
    session: aiohttp.ClientSession,
    backend: Backend,
    forward: Forward,
    settings: ProxySettings,
) -> Answer:
    """Send ``forward`` to ``backend`` and read a whole document (the start of a stream).
    BackendFailed when nothing can have reached the client yet and another backend may
    answer; the caller releases ``Answer.upstream``."""
    label = backend.label
    try:
        async with asyncio.timeout(settings.response_timeout):
            upstream = await session.request(
                forward.method,
                backend.url + forward.target,
                headers=forward.headers,
                data=forward.body if forward.body else None,
                allow_redirects=False,
                # only the client's headers: no added Accept-Encoding (bodies pass
                # undecoded), User-Agent or Content-Type
                skip_auto_headers=_NO_AUTO_HEADERS,
            )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise BackendFailed(f"{label}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
    headers = forward_response_headers(upstream)
    if not _whole_document(upstream):
        return Answer(upstream, headers, b"", complete=False)
    try:
        body, complete = await _read_upto(upstream, BUFFER_LIMIT, settings.stream_idle_timeout)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        upstream.release()
        reason = f"{label}: response cut off: {type(exc).__name__}"
        raise BackendFailed(reason, responded=True) from None
    return Answer(upstream, headers, body, complete)


@dataclass(frozen=True)
class RelayEnd:
    """How a relayed stream ended: ``None`` when complete, else which side failed."""

    failed: str | None = None  # "client", "client-stalled", "backend", "backend-stalled"
    error: BaseException | None = None


class _Watchdog:
    """The idle limit of a relayed stream: one timer per stream instead of one per chunk.

    Before each wait the relay says which side it waits on (a stamp, no timer); the timer
    wakes at most every ``idle`` seconds, and when the side waited on has made no progress
    for ``idle`` it closes both connections, which ends the pending wait with an error."""

    def __init__(
        self,
        idle: float,
        upstream: aiohttp.ClientResponse,
        request: web.Request,
        on_stall: Callable[[str], None] | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.on_stall = on_stall
        self.idle = idle
        self.upstream = upstream
        self.request = request
        self.side = ""
        self.since = self.loop.time()
        self.stalled: str | None = None
        self._timer = self.loop.call_at(self.since + idle, self._check)

    def waiting(self, side: str) -> None:
        self.side = side
        self.since = self.loop.time()

    def _check(self) -> None:
        due = self.since + self.idle
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check)
            return
        self.stalled = self.side
        if self.on_stall is not None:  # now: the handler may be cancelled by what follows
            self.on_stall(self.side)
        self.upstream.close()
        if self.side == "client" and self.request.transport is not None:
            # close() would wait for the client to take what is buffered: it does not
            self.request.transport.abort()
        else:
            _cut(self.request)

    def stop(self) -> None:
        self._timer.cancel()


async def relay(
    request: web.Request,
    response: web.StreamResponse,
    answer: Answer,
    idle: float,
    observe: Callable[[bytes], None] | None = None,
    on_stall: Callable[[str], None] | None = None,
) -> RelayEnd:
    """Pass the rest of ``answer`` to the client as it arrives (its headers are out). A side
    that fails or stalls for ``idle`` seconds ends it; the client's connection is then cut
    so it sees an incomplete response, never a shortened one that looks whole. ``observe``
    sees each chunk passed on; ``on_stall`` hears of a stall (``"client"``, ``"backend"``)
    when it happens (cutting a client off may cancel the handler)."""
    upstream = answer.upstream
    chunk = answer.body
    watchdog = _Watchdog(idle, upstream, request, on_stall)
    try:
        while True:
            if chunk:
                if observe is not None:
                    observe(chunk)
                watchdog.waiting("client")
                try:
                    await response.write(chunk)
                except ConnectionError:  # the client went away; closing upstream stops EXO
                    upstream.close()
                    return RelayEnd("client-stalled" if watchdog.stalled else "client")
            watchdog.waiting("backend")
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                if watchdog.stalled == "client":
                    return RelayEnd("client-stalled")
                if watchdog.stalled == "backend":
                    return RelayEnd("backend-stalled")
                _cut(request)
                return RelayEnd("backend", exc)
            if watchdog.stalled:  # cut while the data was on its way
                return RelayEnd(f"{watchdog.stalled}-stalled")
            if not chunk:
                break
    finally:
        watchdog.stop()
    await response.write_eof()
    return RelayEnd()


def state_of(request: web.Request) -> RequestState:
    """The request's state, made by the first code that asks (its arrival time)."""
    state = request.get(_STATE)
    if state is None:
        state = request[_STATE] = RequestState(time.perf_counter())
    return cast(RequestState, state)


class Gateway:
    """The aiohttp application and the state its handlers share."""

    def __init__(
        self,
        keys: KeyStore,
        pool: BackendPool,
        metrics: GatewayMetrics,
        settings: ProxySettings,
        limiter: Limiter | None = None,
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.pool = pool
        self.metrics = metrics
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        self.connections = ConnectionLimits(
            per_address=settings.max_connections_per_address,
            header_timeout=settings.header_read_timeout,
            metrics=metrics,
        )
        self.app = web.Application(
            client_max_size=settings.max_body_bytes,
            middlewares=[self.timed, self.authenticated],
        )
        # every method: a POST to /health is the gateway's, never EXO's
        routes = self.app.router
        routes.add_route("*", HEALTH_PATH, self.health, expect_handler=self._expect)
        routes.add_route("*", METRICS_PATH, self.metrics_page, expect_handler=self._expect)
        routes.add_route("*", "/{tail:.*}", self.proxy, expect_handler=self._expect)
        self.app.on_response_prepare.append(self._responding)
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)
        metrics.api_keys.set(len(keys))

    async def _on_startup(self, _app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout,
                sock_connect=self.settings.connect_timeout,
            ),
        )
        self.pool.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.pool.stop()
        if self.session is not None:
            await self.session.close()

    async def reload_keys(self) -> bool:
        """Re-read the key file and the key policy file (each kept as it was when its
        file is bad); True when both were read."""
        ok = await self.keys.reload()
        self.metrics.key_reloads.labels("ok" if ok else "error").inc()
        self.metrics.api_keys.set(len(self.keys))
        if self.limiter is not None and self.limiter.store.path is not None:
            read = await self.limiter.store.reload()
            self.metrics.policy_reloads.labels("ok" if read else "error").inc()
            ok = ok and read
        return ok

    # --- middleware and signals ----------------------------------------------------------

    @web.middleware
    async def timed(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count every answer with its status and duration (499: the client left first)."""
        started = state_of(request).started
        self.connections.arrived(request.transport)
        method = request.method
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own, e.g. 413 from request.read()
            response = error_response(exc.status, exc.reason, "invalid_request_error")
        except asyncio.CancelledError:  # the client closed the connection (nginx's 499)
            self.metrics.answered(method, CLIENT_CLOSED, time.perf_counter() - started)
            self._key_used(request, CLIENT_CLOSED)
            raise
        self.metrics.answered(method, response.status, time.perf_counter() - started)
        self._key_used(request, response.status)
        return response

    def _key_used(self, request: web.Request, status: int) -> None:
        state = state_of(request)
        key = state.key
        if key is None:
            return
        # only models EXO answered for: a label per made-up model name would be unbounded
        model = state.model if status < 400 else ""
        usage = state.usage or Usage()  # none read (not proxied): no tokens
        self.metrics.key_used(key, model, usage.prompt, usage.completion)

    @web.middleware
    async def authenticated(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = self._authenticate(request)
        if refused is not None:
            return refused
        return await handler(request)

    async def _responding(self, request: web.Request, _response: web.StreamResponse) -> None:
        """A response's headers are about to go out: the latency to its start."""
        self.metrics.responding(request.method, time.perf_counter() - state_of(request).started)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue`` (before the middleware runs): the key and the declared
        body size are checked before the client is told to send its body; a refused client
        gets its answer instead."""
        started = state_of(request).started
        self.connections.arrived(request.transport)
        expect = request.headers.get("Expect", "")
        http11 = request.version == aiohttp.HttpVersion11
        refused = self._authenticate(request) or self._too_large(request)
        if refused is None and http11 and expect.lower() != "100-continue":
            refused = error_response(
                417, f"unknown expectation {expect!r}", "invalid_request_error"
            )
        if refused is not None:
            refused.force_close()  # the body the client may send anyway is not read
            self.metrics.answered(request.method, refused.status, time.perf_counter() - started)
            return refused
        if http11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        return None

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """None when the request may go on (its key's name in its state)."""
        state = state_of(request)
        if state.key is not None or not self.keys.enabled:
            return None
        if request.path in self.settings.public_paths:
            return None
        presented = presented_key(request.headers)
        name = self.keys.check(presented)
        if name is None:
            reason = "missing" if presented is None else "invalid"
            self.metrics.auth_failures.labels(reason).inc()
            message = (
                "an API key is required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
                if presented is None
                else "the API key is not valid"
            )
            return error_response(
                401,
                message,
                "authentication_error",
                {"WWW-Authenticate": 'Basic realm="exo", charset="UTF-8"'},
            )
        state.key = name
        return None

    def _too_large(self, request: web.Request) -> web.Response | None:
        declared = request.content_length
        if declared is not None and declared > self.settings.max_body_bytes:
            return error_response(
                413,
                f"request body of {declared} bytes is over the limit of "
                f"{self.settings.max_body_bytes}",
                "invalid_request_error",
            )
        return None

    # --- handlers ------------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        summary = self.pool.summary()
        status = "ok" if summary["healthy"] == summary["total"] else "degraded"
        if summary["healthy"] == 0:
            status = "down"
        body = json.dumps({"status": status, "backends": summary, "nodes": self.pool.describe()})
        return web.Response(
            status=503 if status == "down" else 200,
            text=body,
            content_type="application/json",
        )

    async def metrics_page(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        too_large = self._too_large(request)
        if too_large is not None:
            return too_large
        forward = Forward(
            request.method,
            request.raw_path if request.raw_path.startswith("/") else str(request.rel_url),
            forward_request_headers(request),
            await request.read() if request.can_read_body else b"",
        )
        state = state_of(request)
        key = state.key
        if key is None:  # no key needed: no policy, no usage to count
            return await self._try_backends(request, forward)
        model = request_model(forward.body)
        if model is not None:
            state.model = model
        usage = state.usage = Usage()
        admitted = self.limiter.admit(key, model) if self.limiter is not None else None
        if isinstance(admitted, Refusal):
            self.metrics.key_limited.labels(key, admitted.limit).inc()
            retry = {"Retry-After": str(admitted.retry_after)} if admitted.retry_after else None
            kind = _REFUSAL_TYPES.get(admitted.status, "invalid_request_error")
            return error_response(admitted.status, admitted.message, kind, retry)
        try:
            return await self._try_backends(request, forward, usage)
        finally:
            if admitted is not None and self.limiter is not None:
                self.limiter.done(admitted, key, usage.total)

    async def _try_backends(
        self, request: web.Request, forward: Forward, usage: Usage | None = None
    ) -> web.StreamResponse:
        candidates = self.pool.candidates()
        if not candidates:
            return error_response(503, "no EXO node API is known to the gateway", "gateway_error")
        for number, backend in enumerate(candidates[: self.settings.max_attempts]):
            if number:
                self.metrics.retries.inc()
            try:
                return await self._through(request, backend, forward, usage)
            except BackendFailed:
                continue  # why is logged by the pool when the backend's state changes
        # The client learns no backend address or client-library error; the log has them.
        return error_response(502, "no EXO node could answer the request", "gateway_error")

    async def _through(
        self, request: web.Request, backend: Backend, forward: Forward, usage: Usage | None
    ) -> web.StreamResponse:
        """One backend's answer to the client: whole, or relayed as it arrives."""
        assert self.session is not None
        self.pool.started(backend)
        try:
            try:
                answer = await attempt(self.session, backend, forward, self.settings)
            except BackendFailed as exc:
                self.metrics.forwarded(backend.label, "response" if exc.responded else "error")
                self.pool.mark_failed(backend, str(exc))
                raise
            self.metrics.forwarded(backend.label, "response")
            try:
                upstream = answer.upstream
                if answer.complete:
                    if usage is not None and upstream.status < 400:
                        usage.take_body(answer.body)
                    return web.Response(
                        status=upstream.status,
                        reason=upstream.reason,
                        body=answer.body,
                        headers=answer.headers,
                    )
                response = web.StreamResponse(
                    status=upstream.status, reason=upstream.reason, headers=answer.headers
                )
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                observe = UsageScanner(usage).feed if usage is not None else None
                idle = self.settings.stream_idle_timeout
                end = await relay(
                    request,
                    response,
                    answer,
                    idle,
                    observe,
                    lambda side: self._stalled(request, backend, side),
                )
                self._relay_ended(backend, end)
                return response
            finally:
                answer.upstream.release()
        finally:
            self.pool.finished(backend)

    def _stalled(self, request: web.Request, backend: Backend, side: str) -> None:
        idle = self.settings.stream_idle_timeout
        self.metrics.stalled_streams.labels(side).inc()
        if side == "client":
            log.info(
                "client %s took no data for %gs: stream from %s closed",
                request.remote,
                idle,
                backend.label,
            )
        else:
            # EXO stalled: the client is cut off rather than both kept open for ever.
            self.metrics.aborted_streams.inc()
            log.warning("stream from %s stalled: no data for %gs; cut off", backend.label, idle)

    def _relay_ended(self, backend: Backend, end: RelayEnd) -> None:
        if end.failed == "backend":
            # Part of the response is out: it cannot be retried.
            self.metrics.aborted_streams.inc()
            reason = f"{backend.label}: stream cut off: {type(end.error).__name__}"
            self.pool.mark_failed(backend, reason)
            log.warning("stream from %s cut off: %s", backend.label, end.error)
