"""The gateway's metrics are the ones docs/gateway.md lists: each name, type, label set and HELP
text, and nothing more; several workers' values add up; the series a backend leaves behind
are dropped with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from exo_nixos.gateway.metrics import GatewayMetrics

DOC = Path(__file__).resolve().parent.parent / "docs" / "gateway.md"

# | `name` | type | `label` (`value`, ...), `label` | HELP text |
ROW = re.compile(r"^\| `(exo_gateway_[a-z_*]+)` \| (\w+) \|\s*([^|]*?)\s*\| ([^|]*) \|$")
LABEL = re.compile(r"`(\w+)`(?: \(([^)]*)\))?")


Row = tuple[str, dict[str, list[str]], str]


def documented() -> dict[str, Row]:
    """{sample name as scraped: (type, {label: documented values}, HELP text)} from the doc's
    tables."""
    rows: dict[str, Row] = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match is None:
            continue
        name, kind, labels, meaning = match.groups()
        if name.endswith("*"):
            continue  # a summary row; the family's own table lists each metric
        rows[name] = (
            kind,
            {
                label: re.findall(r"`(\w+)`", values or "")
                for label, values in LABEL.findall(labels)
            },
            meaning.replace("`", ""),
        )
    return rows


def by_name(metrics: GatewayMetrics) -> dict[str, MetricWrapperBase]:
    """The gateway's metric objects by the name their samples carry (``_total`` for counters)."""
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            suffix = "_total" if family.type == "counter" else ""
            found[family.name + suffix] = value
    return found


def test_the_doc_lists_every_metric_with_its_type_and_labels() -> None:
    doc = documented()
    metrics = GatewayMetrics()
    objects = by_name(metrics)
    assert sorted(doc) == sorted(objects), "docs/gateway.md's tables and the metrics differ"
    for name, (kind, labels, _) in doc.items():
        metric = objects[name]
        # labels() takes exactly the metric's label names; the doc's values (or "x") fill them
        child = (
            metric.labels(**{k: (v[0] if v else "x") for k, v in labels.items()})
            if labels
            else metric
        )
        if kind == "counter":
            child.inc()  # type: ignore[attr-defined]
        elif kind == "gauge":
            child.set(1)  # type: ignore[attr-defined]
        else:
            child.observe(0.2)  # type: ignore[attr-defined]
    scraped = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    for name, (kind, labels, meaning) in doc.items():
        family = scraped[name.removesuffix("_total")]
        assert family.type == kind, name
        assert family.documentation == meaning, name
        names = {s.name for s in family.samples}
        assert name in names or f"{name}_bucket" in names, (name, names)
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(labels), (name, sample)


def test_latency_buckets_run_from_half_a_millisecond_to_five_minutes() -> None:
    """As the doc says; a generation's response can take minutes, a small answer far below a
    millisecond."""
    metrics = GatewayMetrics()
    metrics.responding("POST", 0.0001)
    metrics.answered("POST", 200, 250.0)
    scraped = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    for name in ("exo_gateway_response_latency_seconds", "exo_gateway_request_duration_seconds"):
        bounds = [
            float(s.labels["le"]) for s in scraped[name].samples if s.name.endswith("_bucket")
        ]
        assert bounds[0] == 0.0005 and bounds[-2] == 300.0 and bounds[-1] == float("inf"), bounds
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    counts = {
        (s.name, s.labels.get("method"), s.labels.get("code")): s.value
        for f in scraped.values()
        for s in f.samples
    }
    assert counts[("exo_gateway_requests_total", "POST", "200")] == 1
    assert counts[("exo_gateway_response_latency_seconds_sum", "POST", None)] == 0.0001
    assert counts[("exo_gateway_request_duration_seconds_sum", "POST", None)] == 250.0


@pytest.mark.parametrize(("prompt", "completion"), [(12, 30), (0, 7), (5, 0)])
def test_key_usage_counts_the_request_and_only_the_tokens_used(
    prompt: int, completion: int
) -> None:
    metrics = GatewayMetrics()
    metrics.key_used("alice", "m", prompt, completion)
    metrics.key_used("alice", "m", prompt, completion)
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
        if s.labels == {"key": "alice", "model": "m"}
    }
    assert samples.pop("exo_gateway_key_requests_total") == 2
    expected = {}
    if prompt:
        expected["exo_gateway_key_prompt_tokens_total"] = 2.0 * prompt
    if completion:
        expected["exo_gateway_key_completion_tokens_total"] = 2.0 * completion
    # a zero adds no series (inc(0) would make one)
    assert {k: v for k, v in samples.items() if not k.endswith("_created")} == expected


def test_a_departed_backend_leaves_no_series() -> None:
    metrics = GatewayMetrics()
    for url in ("http://a:1", "http://b:1"):
        metrics.backend_up.labels(url).set(1)
        metrics.inflight(url, 2)
        metrics.forwarded(url, "response")
        metrics.forwarded(url, "error")
    metrics.forget_backend("http://a:1")
    metrics.forget_backend("http://never-seen:1")  # nothing to drop: no error
    backends = {
        s.labels["backend"]
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
        if "backend" in s.labels
    }
    assert backends == {"http://b:1"}
    # the same backend back again starts from zero, through the same methods
    metrics.inflight("http://a:1", 1)
    metrics.forwarded("http://a:1", "response")
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
    }
    assert values[("exo_gateway_backend_inflight", (("backend", "http://a:1"),))] == 1
    assert (
        values[
            (
                "exo_gateway_backend_requests_total",
                (("backend", "http://a:1"), ("outcome", "response")),
            )
        ]
        == 1
    )
    assert (
        "exo_gateway_backend_requests_total",
        (("backend", "http://a:1"), ("outcome", "error")),
    ) not in values


def test_the_workers_values_add_up_as_each_metric_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prometheus_client's multiprocess mode, as the worker processes use it: each writes its
    values to files in one directory, and any of them renders the sum (counters, requests in
    flight, connections), or the most recent value (a backend's health), without a ``pid``
    label. Two workers are two process identifiers here, in one process."""
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)  # put back after the test
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    real = values.MultiProcessValue

    def worker(pid: int) -> GatewayMetrics:
        monkeypatch.setattr(values, "MultiProcessValue", lambda: real(lambda: pid))
        return GatewayMetrics(str(tmp_path))

    backend = "http://10.0.0.2:52415"
    first = worker(1001)
    first.connections_open.inc(2)
    first.inflight(backend, 2)
    first.answered("GET", 200, 0.1)
    first.backend_up.labels(backend).set(1)
    first.backends_healthy.set(1)
    second = worker(1002)
    second.connections_open.inc(3)
    second.inflight(backend, 1)
    second.answered("GET", 200, 0.2)
    second.backend_up.labels(backend).set(0)  # the later word: it is down
    second.backends_healthy.set(0)
    second.api_keys.set(4)
    for metrics in (first, second):
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.render().decode())
            for s in f.samples
        }
        assert not any("pid" in dict(labels) for _, labels in samples), samples
        assert samples[("exo_gateway_connections_open", ())] == 5
        assert samples[("exo_gateway_backend_inflight", (("backend", backend),))] == 3
        assert samples[("exo_gateway_requests_total", (("code", "200"), ("method", "GET")))] == 2
        assert samples[("exo_gateway_backend_up", (("backend", backend),))] == 0
        assert samples[("exo_gateway_backends_healthy", ())] == 0
        assert samples[("exo_gateway_api_keys", ())] == 4
