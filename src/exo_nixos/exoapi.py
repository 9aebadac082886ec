"""Client for one EXO node's HTTP API: is it up, what does it know about its cluster.

Used by ``exo-nixos health`` and ``status``, the supervisor and the gateway. It reads only
what upstream exo serves (see docs/health.md for the exact fields):

- ``GET /node_id``: the node's id as a bare JSON string. If this fails the node is *down*
  and :func:`probe` raises :class:`ExoApiError` with a one-line reason.
- ``GET /state``: cluster state: topology (peers and the API addresses the node reached
  them at), instances (model, nodes, runner status) and ``lastEventAppliedIdx``.
- ``GET /models``: upstream's own readiness probe.

Problems with ``/state`` or ``/models`` do not raise: they are listed in
``NodeView.problems`` (the node is *degraded*). Parsing tolerates missing and unknown
fields so that upstream additions do not break it.

exo's API does not say which node is master: exo only logs it. :func:`parse_log_line`
reads those log lines, and :func:`write_master_hint` / :func:`read_master_hint` hand the
result from the process that reads exo's log (the supervisor) to the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import re
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from exo_nixos import jsonio
from exo_nixos.addresses import local_api_url, multiaddr, url_for
from exo_nixos.basetypes import EXO_API_PORT
from exo_nixos.errors import UserError, describe_value
from exo_nixos.fsutil import atomic_write

DEFAULT_URL = local_api_url(EXO_API_PORT)
MASTER_HINT_FILE = "master.json"

_T = TypeVar("_T")


class ExoApiError(UserError):
    """The node's API gave no usable answer. The message is one line.

    ``kind`` is one of ``refused``, ``unreachable``, ``timeout``, ``http``, ``shape``,
    ``broken``, ``url``; ``status`` is the HTTP status for ``http``.
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class Peer:
    """Another node in this node's topology."""

    node_id: str
    addresses: tuple[str, ...] = ()
    """IP addresses: where this node reached the peer's API, then its reported interfaces."""
    api_urls: tuple[str, ...] = ()
    """``http://IP:PORT`` of the peer's API as this node reached it (topology edges)."""
    friendly_name: str | None = None
    last_seen: str | None = None


@dataclass(frozen=True)
class Instance:
    """A model instance placed on the cluster."""

    instance_id: str
    model_id: str
    node_ids: tuple[str, ...]
    kind: str = ""
    """Upstream's instance type, e.g. ``MlxRingInstance``."""
    runner_status: tuple[tuple[str, str], ...] = ()
    """``(node_id, status)`` per node, status as upstream names it, e.g. ``RunnerReady``."""


@dataclass(frozen=True)
class NodeView:
    """What one probe of a node's API found."""

    url: str
    node_id: str
    master_id: str | None = None
    """The elected master, when known. exo's API does not expose it: see ``with_master``."""
    peers: tuple[Peer, ...] = ()
    instances: tuple[Instance, ...] = ()
    models_ok: bool = False
    model_ids: tuple[str, ...] = ()
    state_ok: bool = False
    synced: bool = False
    """The node has applied events from a master (``lastEventAppliedIdx >= 0``)."""
    problems: tuple[str, ...] = ()
    """One line per thing that answered badly: a non-empty tuple means *degraded*."""
    elapsed_s: float = field(default=0.0, compare=False)

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def is_master(self) -> bool | None:
        """Whether this node is the master; ``None`` when unknown."""
        return None if self.master_id is None else self.master_id == self.node_id

    def with_master(self, master_id: str | None) -> NodeView:
        """This view with the master learnt elsewhere (exo's log, a master hint)."""
        return replace(self, master_id=master_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "nodeId": self.node_id,
            "masterId": self.master_id,
            "isMaster": self.is_master,
            "peers": [
                {
                    "nodeId": p.node_id,
                    "addresses": list(p.addresses),
                    "apiUrls": list(p.api_urls),
                    "friendlyName": p.friendly_name,
                    "lastSeen": p.last_seen,
                }
                for p in self.peers
            ],
            "instances": [
                {
                    "instanceId": i.instance_id,
                    "modelId": i.model_id,
                    "nodeIds": list(i.node_ids),
                    "kind": i.kind,
                    "runnerStatus": dict(i.runner_status),
                }
                for i in self.instances
            ],
            "modelsOk": self.models_ok,
            "modelIds": list(self.model_ids),
            "stateOk": self.state_ok,
            "synced": self.synced,
            "problems": list(self.problems),
            "elapsedSeconds": round(self.elapsed_s, 3),
        }


@dataclass(frozen=True)
class StateSummary:
    """The parts of ``/state`` this project uses."""

    peers: tuple[Peer, ...]
    instances: tuple[Instance, ...]
    synced: bool


def short_id(node_id: str) -> str:
    """A node id cut to its first 12 characters, for one-line displays."""
    return node_id if len(node_id) <= 12 else node_id[:12] + "…"


def normalize_url(base_url: str) -> str:
    """``HOST:PORT`` or ``http://HOST:PORT/`` -> ``http://HOST:PORT``; reject other schemes."""
    text = base_url.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        valid = (
            parts.scheme in {"http", "https"}
            and bool(parts.hostname)
            and not any(c.isspace() for c in text)
        )
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        valid = False
    if not valid:
        raise ExoApiError(f"invalid URL {base_url!r}: expected http://HOST:PORT", kind="url")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")).rstrip("/")


def _seconds(value: float) -> str:
    return f"{value:g}s"


async def _get_json(session: aiohttp.ClientSession, base: str, path: str, limit_s: float) -> Any:
    """GET ``base+path`` and decode JSON; every failure is an ExoApiError with one line."""
    url = base + path
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=limit_s)) as response:
            if response.status != 200:
                raise ExoApiError(
                    f"HTTP {response.status} from {path}", kind="http", status=response.status
                )
            text = await response.text(errors="replace")
    except ExoApiError:
        raise
    except TimeoutError:
        raise ExoApiError(
            f"timed out after {_seconds(limit_s)} waiting for {url}", kind="timeout"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        if _refused(exc.os_error):
            raise ExoApiError(
                f"connection refused at {base}: is exo running?", kind="refused"
            ) from None
        reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        raise ExoApiError(f"cannot connect to {base}: {reason}", kind="unreachable") from None
    except aiohttp.InvalidURL:
        raise ExoApiError(f"invalid URL {url!r}", kind="url") from None
    except aiohttp.ClientError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExoApiError(f"{url}: connection broken: {detail}", kind="broken") from None
    try:
        return jsonio.loads(text)
    except ValueError:
        snippet = text.strip().splitlines()[0][:60] if text.strip() else "an empty body"
        raise ExoApiError(f"{path} did not answer JSON: {snippet!r}", kind="shape") from None


def _refused(error: OSError) -> bool:
    # One address: ConnectionRefusedError. Several (localhost -> ::1, 127.0.0.1): an OSError
    # "Multiple exceptions: [Errno 111] ..., [Errno 111] ..." without an errno of its own.
    if isinstance(error, ConnectionRefusedError) or error.errno == errno.ECONNREFUSED:
        return True
    text = str(error)
    return text.startswith("Multiple exceptions") and text.count("[Errno") == text.count(
        f"[Errno {errno.ECONNREFUSED}]"
    )


def _parse_node_id(body: Any) -> str:
    if isinstance(body, str) and body.strip().strip('"'):
        return body.strip().strip('"')
    raise ExoApiError(
        f"unexpected /node_id answer: {describe_value(body)} (expected a JSON string)", kind="shape"
    )


def _shape(message: str) -> ExoApiError:
    return ExoApiError(f"unexpected /state shape: {message}", kind="shape")


def _mapping(doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _shape(f"{where}{key} is {type(value).__name__}, expected an object")
    return value


def _untag(value: Any) -> tuple[str, Mapping[str, Any]] | None:
    """Upstream's tagged unions: ``{"ClassName": {...}}``. Untagged objects pass through."""
    if not isinstance(value, Mapping):
        return None
    if len(value) == 1:
        ((tag, body),) = value.items()
        # Tags are class names (Capitalised); field names are camelCase.
        if isinstance(body, Mapping) and str(tag)[:1].isupper():
            return str(tag), body
    return "", value


def _edge_endpoint(edge: Any) -> tuple[str, int | None] | None:
    """``(ip, port)`` of a socket edge's ``sinkMultiaddr``; ``None`` for RDMA or unknown."""
    if not isinstance(edge, Mapping):
        return None
    addr = edge.get("sinkMultiaddr", edge.get("sink_multiaddr"))
    if isinstance(addr, str):
        addr = {"address": addr}
    if not isinstance(addr, Mapping):
        return None
    found = multiaddr(str(addr.get("address", "")))
    if found:
        return found[1], found[2]
    ip = addr.get("ip_address", addr.get("ipAddress"))
    port = addr.get("port")
    if isinstance(ip, str) and ip:
        return ip, port if isinstance(port, int) else None
    return None


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_state(doc: Any, node_id: str) -> StateSummary:
    """Read peers, instances and sync from a ``/state`` document, seen from ``node_id``.

    Missing keys read as empty; unknown keys are ignored; a known key of the wrong type
    raises ExoApiError(kind="shape") naming it.
    """
    if not isinstance(doc, Mapping):
        raise _shape(f"the document is {type(doc).__name__}, expected an object")
    topology = _mapping(doc, "topology", "")
    nodes_raw = topology.get("nodes", [])
    if not isinstance(nodes_raw, list):
        raise _shape(f"topology.nodes is {type(nodes_raw).__name__}, expected a list")
    connections = _mapping(topology, "connections", "topology.")
    identities = _mapping(doc, "nodeIdentities", "")
    networks = _mapping(doc, "nodeNetwork", "")
    last_seen = _mapping(doc, "lastSeen", "")

    order = [str(n) for n in nodes_raw if isinstance(n, str)]
    edge_addresses: dict[str, list[str]] = {}
    edge_urls: dict[str, list[str]] = {}
    for source, sinks in connections.items():
        if not isinstance(sinks, Mapping):
            continue
        for sink, edges in sinks.items():
            order.extend([str(source), str(sink)])
            if str(source) != node_id or not isinstance(edges, list):
                continue
            for edge in edges:
                endpoint = _edge_endpoint(edge)
                if endpoint is None:
                    continue
                ip, port = endpoint
                edge_addresses.setdefault(str(sink), []).append(ip)
                if port is not None:
                    edge_urls.setdefault(str(sink), []).append(url_for(ip, port))

    peers: list[Peer] = []
    for peer_id in _unique(order):
        if peer_id == node_id:
            continue
        addresses = list(edge_addresses.get(peer_id, []))
        network = networks.get(peer_id)
        interfaces = network.get("interfaces", []) if isinstance(network, Mapping) else []
        if isinstance(interfaces, list):
            for interface in interfaces:
                if isinstance(interface, Mapping):
                    ip = interface.get("ipAddress", interface.get("ip_address"))
                    if isinstance(ip, str) and ip:
                        addresses.append(ip)
        identity = identities.get(peer_id)
        name = identity.get("friendlyName") if isinstance(identity, Mapping) else None
        seen = last_seen.get(peer_id)
        peers.append(
            Peer(
                node_id=peer_id,
                addresses=_unique(addresses),
                api_urls=_unique(edge_urls.get(peer_id, [])),
                friendly_name=name if isinstance(name, str) else None,
                last_seen=seen if isinstance(seen, str) else None,
            )
        )

    runners = _mapping(doc, "runners", "")
    instances: list[Instance] = []
    for instance_id, raw in _mapping(doc, "instances", "").items():
        untagged = _untag(raw)
        if untagged is None:
            continue
        kind, body = untagged
        assignments = body.get("shardAssignments", body.get("shard_assignments"))
        if not isinstance(assignments, Mapping):
            assignments = {}
        model = assignments.get("modelId", assignments.get("model_id"))
        node_to_runner = assignments.get("nodeToRunner", assignments.get("node_to_runner"))
        if not isinstance(node_to_runner, Mapping):
            node_to_runner = {}
        status: list[tuple[str, str]] = []
        for node, runner_id in node_to_runner.items():
            runner = _untag(runners.get(runner_id)) if isinstance(runner_id, str) else None
            if runner is not None and runner[0]:
                status.append((str(node), runner[0]))
        instances.append(
            Instance(
                instance_id=str(body.get("instanceId", instance_id)),
                model_id=str(model) if isinstance(model, str) else "",
                node_ids=tuple(str(n) for n in node_to_runner),
                kind=kind,
                runner_status=tuple(status),
            )
        )

    applied = doc.get("lastEventAppliedIdx")
    synced = isinstance(applied, int) and not isinstance(applied, bool) and applied >= 0
    return StateSummary(peers=tuple(peers), instances=tuple(instances), synced=synced)


def _model_ids(doc: Any) -> tuple[str, ...]:
    data = doc.get("data") if isinstance(doc, Mapping) else None
    if not isinstance(data, list):
        raise ExoApiError(
            f"unexpected /models shape: {describe_value(doc)} (expected {{'data': [...]}})",
            kind="shape",
        )
    return tuple(str(m["id"]) for m in data if isinstance(m, Mapping) and "id" in m)


async def _probe(session: aiohttp.ClientSession, base: str, limit_s: float) -> NodeView:
    started = time.monotonic()

    async def fetch(path: str) -> Any:
        return await _get_json(session, base, path, limit_s)

    node_task = asyncio.ensure_future(fetch("/node_id"))
    state_task = asyncio.ensure_future(fetch("/state"))
    models_task = asyncio.ensure_future(fetch("/models"))
    try:
        node_id = _parse_node_id(await node_task)
    except BaseException:
        for task in (state_task, models_task):
            task.cancel()
        await asyncio.gather(state_task, models_task, return_exceptions=True)
        raise
    problems: list[str] = []

    summary: StateSummary | None = None
    try:
        summary = parse_state(await state_task, node_id)
    except ExoApiError as exc:
        problems.append(str(exc))
    model_ids: tuple[str, ...] = ()
    models_ok = False
    try:
        model_ids = _model_ids(await models_task)
        models_ok = True
    except ExoApiError as exc:
        problems.append(str(exc))
    if summary is not None and not summary.synced:
        problems.append("no master reached yet: /state has applied no events")
    return NodeView(
        url=base,
        node_id=node_id,
        peers=summary.peers if summary else (),
        instances=summary.instances if summary else (),
        models_ok=models_ok,
        model_ids=model_ids,
        state_ok=summary is not None,
        synced=summary.synced if summary else False,
        problems=tuple(problems),
        elapsed_s=time.monotonic() - started,
    )


async def probe(
    base_url: str,
    timeout: float,  # noqa: ASYNC109 - a per-request limit handed to aiohttp, not a deadline
    session: aiohttp.ClientSession | None = None,
) -> NodeView:
    """Ask the node at ``base_url`` for ``/node_id``, ``/state`` and ``/models`` at once.

    Each request is limited to ``timeout`` seconds. Raises ExoApiError when ``/node_id``
    gives no id (the node is down); other failures land in ``NodeView.problems``.
    """
    base = normalize_url(base_url)
    if session is not None:
        return await _probe(session, base, timeout)
    async with aiohttp.ClientSession() as own:
        return await _probe(own, base, timeout)


def run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from sync code, also when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def probe_sync(base_url: str, timeout: float) -> NodeView:
    """:func:`probe` for synchronous callers (also safe where an event loop is running)."""
    return run_coroutine(probe(base_url, timeout))


# -- exo's log: the only place it names the master -----------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = re.compile(r"^\[[^\]]*\]\s*")
_SELF_ELECTED = re.compile(r"^Node elected Master - (?:maintaining|promoting) self$")
_OTHER_ELECTED = re.compile(r"^Node (\S+) elected master(?: - demoting self)?$")
_STARTING = re.compile(r"^Starting node (\S+)$")


@dataclass(frozen=True)
class LogEvent:
    """A fact exo states only in its log.

    ``kind == "started"``: ``node_id`` is this node's id. ``kind == "elected"``:
    ``node_id`` is the new master, or ``None`` when this node itself is the master.
    """

    kind: Literal["started", "elected"]
    node_id: str | None


def parse_log_line(line: str) -> LogEvent | None:
    """Recognise exo's start and election lines (loguru format, ANSI colours allowed)."""
    text = _PREFIX.sub("", _ANSI.sub("", line).strip()).strip()
    if _SELF_ELECTED.match(text):
        return LogEvent("elected", None)
    if match := _OTHER_ELECTED.match(text):
        return LogEvent("elected", match.group(1))
    if match := _STARTING.match(text):
        return LogEvent("started", match.group(1))
    return None


def write_master_hint(directory: str | Path, node_id: str, master_id: str) -> None:
    """Record who node ``node_id`` says is master, for readers of ``read_master_hint``."""
    doc = {"nodeId": node_id, "masterId": master_id, "updated": time.time()}
    atomic_write(Path(directory) / MASTER_HINT_FILE, json.dumps(doc) + "\n")


def read_master_hint(directory: str | Path, node_id: str) -> str | None:
    """The master recorded for ``node_id``; ``None`` if absent, unreadable or for another id.

    exo draws a new node id at every start, so a hint left by an earlier run never matches.
    """
    try:
        doc = jsonio.loads((Path(directory) / MASTER_HINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("nodeId") != node_id:
        return None
    master = doc.get("masterId")
    return master if isinstance(master, str) and master else None
