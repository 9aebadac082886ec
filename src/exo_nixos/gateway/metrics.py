"""Prometheus metrics of the gateway, in a registry of its own.

With several worker processes, prometheus_client's multiprocess mode: each worker writes its
values to memory-mapped files in one directory (``PROMETHEUS_MULTIPROC_DIR``, made by the
master process before it forks), and ``/metrics`` in any worker reads them all, so counters
add up over the workers and a gauge combines them as its ``multiprocess_mode`` says.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; fine below a millisecond for small JSON requests, up to minutes for generations.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

M = TypeVar("M", bound=MetricWrapperBase)


def _child(children: dict[tuple[str, ...], M], metric: M, *values: str) -> M:
    """``metric.labels(*values)``, kept in ``children``: labels() costs more than an update."""
    child = children.get(values)
    if child is None:
        child = children[values] = metric.labels(*values)
    return child


class GatewayMetrics:
    """Every metric the gateway exports; ``render()`` gives the text exposition format."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            # this process's values go to files there (set once per worker, before any
            # metric exists; prometheus_client reads the directory from the environment)
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "exo_gateway_requests",
            "Requests answered by the gateway, by method and status code (499: the client went "
            "away).",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "exo_gateway_response_latency_seconds",
            "Seconds from a request's arrival to the start of its response (headers sent).",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "exo_gateway_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response (streams included).",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "exo_gateway_auth_failures",
            "Requests refused with 401, by reason: missing (no key) or invalid (a wrong key).",
            ["reason"],
            registry=r,
        )
        self.requests_by_key = Counter(
            "exo_gateway_key_requests",
            "Authenticated requests answered, by key name and model (the request's model when "
            "EXO answered it, below 400, else empty: made-up model names add no series).",
            ["key", "model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "exo_gateway_key_prompt_tokens",
            "Prompt tokens by key name and model, from EXO's usage.",
            ["key", "model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "exo_gateway_key_completion_tokens",
            "Completion tokens by key name and model, from EXO's usage.",
            ["key", "model"],
            registry=r,
        )
        self.key_limited = Counter(
            "exo_gateway_key_limited",
            "Requests refused by the key's policy (403 model, 429 limits), by key and limit.",
            ["key", "limit"],
            registry=r,
        )
        self.retries = Counter(
            "exo_gateway_retries",
            "Requests sent again to another backend after one failed before responding.",
            registry=r,
        )
        self.aborted_streams = Counter(
            "exo_gateway_aborted_streams",
            "Responses cut off because the backend failed after the response had started.",
            registry=r,
        )
        self.backend_up = Gauge(
            "exo_gateway_backend_up",
            "1 when the backend's health check passes, 0 when it is down.",
            ["backend"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.backend_requests = Counter(
            "exo_gateway_backend_requests",
            "Requests forwarded to a backend, by outcome (response, error).",
            ["backend", "outcome"],
            registry=r,
        )
        self.backend_inflight = Gauge(
            "exo_gateway_backend_inflight",
            "Requests a backend is serving now.",
            ["backend"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.backends_healthy = Gauge(
            "exo_gateway_backends_healthy",
            "Backends whose health check passes.",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.connections_open = Gauge(
            "exo_gateway_connections_open",
            "Client connections open.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_refused = Counter(
            "exo_gateway_connections_refused",
            "Client connections closed at once: their address had maxConnectionsPerAddress open.",
            registry=r,
        )
        self.header_timeouts = Counter(
            "exo_gateway_header_timeouts",
            "Client connections closed for sending no request within headerReadTimeoutSec.",
            registry=r,
        )
        self.stalled_streams = Counter(
            "exo_gateway_stalled_streams",
            "Streams closed after streamIdleTimeoutSec without data, by side (backend, client).",
            ["side"],
            registry=r,
        )
        self.api_keys = Gauge(
            "exo_gateway_api_keys",
            "API keys loaded.",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.key_reloads = Counter(
            "exo_gateway_key_reloads",
            "Reloads of the API key file (SIGHUP), by result.",
            ["result"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "exo_gateway_policy_reloads",
            "Reloads of the key policy file (SIGHUP), by result.",
            ["result"],
            registry=r,
        )

        # Labelled children by label values (see _child).
        self._answered: dict[tuple[str, ...], Counter] = {}
        self._latency: dict[tuple[str, ...], Histogram] = {}
        self._duration: dict[tuple[str, ...], Histogram] = {}
        self._by_key: dict[tuple[str, ...], Counter] = {}
        self._prompt: dict[tuple[str, ...], Counter] = {}
        self._completion: dict[tuple[str, ...], Counter] = {}
        self._forwarded: dict[tuple[str, ...], Counter] = {}
        self._inflight: dict[tuple[str, ...], Gauge] = {}

    def inflight(self, backend: str, value: int) -> None:
        _child(self._inflight, self.backend_inflight, backend).set(value)

    def answered(self, method: str, status: int, seconds: float) -> None:
        """A request got its complete response ``seconds`` after it arrived."""
        _child(self._answered, self.requests, method, str(status)).inc()
        _child(self._duration, self.duration, method).observe(seconds)

    def responding(self, method: str, seconds: float) -> None:
        """A response started (its headers are about to go out) ``seconds`` after arrival."""
        _child(self._latency, self.latency, method).observe(seconds)

    def key_used(self, key: str, model: str, prompt: int, completion: int) -> None:
        """A request of ``key`` was answered, having used these tokens."""
        _child(self._by_key, self.requests_by_key, key, model).inc()
        if prompt:
            _child(self._prompt, self.prompt_tokens, key, model).inc(prompt)
        if completion:
            _child(self._completion, self.completion_tokens, key, model).inc(completion)

    def forwarded(self, backend: str, outcome: str) -> None:
        _child(self._forwarded, self.backend_requests, backend, outcome).inc()

    def forget_backend(self, backend: str) -> None:
        """Drop the labelled series of a backend that left the pool."""
        self._inflight.pop((backend,), None)
        for metric in (self.backend_up, self.backend_inflight):
            with contextlib.suppress(KeyError):
                metric.remove(backend)
        for outcome in ("response", "error"):
            self._forwarded.pop((backend, outcome), None)
            with contextlib.suppress(KeyError):
                self.backend_requests.remove(backend, outcome)

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
