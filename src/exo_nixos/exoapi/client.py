"""The HTTP client of one EXO node's API: is it up, what does it know about its cluster.

It reads only what upstream exo serves (see docs/health.md for the exact fields):

- ``GET /node_id``: the node's id as a bare JSON string. If this fails the node is *down*
  and :func:`probe` raises :class:`ExoApiError` with a one-line reason.
- ``GET /state``: cluster state (:mod:`exo_nixos.exoapi.state`).
- ``GET /models``: upstream's own readiness probe.

Problems with ``/state`` or ``/models`` do not raise: they are listed in
``NodeView.problems`` (the node is *degraded*).
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from exo_nixos import jsonio
from exo_nixos.errors import describe_value
from exo_nixos.exoapi.errors import ExoApiError
from exo_nixos.exoapi.state import State, parse_state_doc
from exo_nixos.exoapi.sync import run_coroutine
from exo_nixos.exoapi.urls import normalize_url
from exo_nixos.exoapi.view import NodeView, summarize
from exo_nixos.fsutil import os_reason

# The most of an answer this client reads. EXO's largest, /state, is some KiB per node,
# instance and download; a node (or anything at its address) that sends without end is
# stopped here instead of filling this process's memory before the time limit.
ANSWER_LIMIT = 32 << 20


def _seconds(value: float) -> str:
    return f"{value:g}s"


async def _bounded_text(response: aiohttp.ClientResponse, path: str) -> str:
    """The answer's body as text (UTF-8, as JSON is), at most ``ANSWER_LIMIT`` bytes."""
    if (response.content_length or 0) > ANSWER_LIMIT:
        raise ExoApiError(
            f"{path} answered {response.content_length} bytes, more than {ANSWER_LIMIT}",
            kind="shape",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > ANSWER_LIMIT:
            raise ExoApiError(f"{path} answered more than {ANSWER_LIMIT} bytes", kind="shape")
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


async def get_json(
    session: aiohttp.ClientSession,
    base: str,
    path: str,
    limit_s: float,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """GET ``base+path`` and decode JSON; every failure is an ExoApiError with one line.

    ``headers`` go with the request (an ``Authorization`` to pass a gateway)."""
    return await request_json(session, "GET", base, path, limit_s, headers)


def _reason(text: str) -> str:
    """Upstream's reason in an error body: ``{"error": {"message"}}`` (its HTTPException
    handler) or FastAPI's ``{"detail": ...}``; ``""`` for anything else."""
    try:
        doc = jsonio.loads(text)
    except ValueError:
        return ""
    if isinstance(doc, Mapping):
        error = doc.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return " ".join(error["message"].split())
        detail = doc.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list) and detail and isinstance(detail[0], Mapping):
            where = ".".join(str(p) for p in detail[0].get("loc", []))
            return f"{where}: {detail[0].get('msg', '')}".strip(": ")
    return ""


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    base: str,
    path: str,
    limit_s: float,
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    *,
    with_reason: bool = False,
) -> Any:
    """``method`` ``base+path`` (with a JSON ``body``) and decode the JSON answer.

    Every failure is an ExoApiError with one line; ``with_reason`` adds upstream's reason
    from an error answer's body (``HTTP 400 from /instance/placement: No cycles ...``)."""
    url = base + path
    try:
        async with session.request(
            method,
            url,
            json=body,
            timeout=aiohttp.ClientTimeout(total=limit_s),
            headers=headers,
        ) as response:
            text = await _bounded_text(response, path)
            if response.status != 200:
                reason = _reason(text) if with_reason else ""
                raise ExoApiError(
                    f"HTTP {response.status} from {path}" + (f": {reason}" if reason else ""),
                    kind="http",
                    status=response.status,
                )
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
        reason = os_reason(exc.os_error)
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


def _model_ids(doc: Any) -> tuple[str, ...]:
    data = doc.get("data") if isinstance(doc, Mapping) else None
    if not isinstance(data, list):
        raise ExoApiError(
            f"unexpected /models shape: {describe_value(doc)} (expected {{'data': [...]}})",
            kind="shape",
        )
    return tuple(str(m["id"]) for m in data if isinstance(m, Mapping) and "id" in m)


async def _probe(
    session: aiohttp.ClientSession,
    base: str,
    limit_s: float,
    headers: Mapping[str, str] | None = None,
) -> NodeView:
    started = time.monotonic()

    async def fetch(path: str) -> Any:
        return await get_json(session, base, path, limit_s, headers)

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

    state: State | None = None
    try:
        state = parse_state_doc(await state_task)
    except ExoApiError as exc:
        problems.append(str(exc))
    model_ids: tuple[str, ...] = ()
    models_ok = False
    try:
        model_ids = _model_ids(await models_task)
        models_ok = True
    except ExoApiError as exc:
        problems.append(str(exc))
    summary = summarize(state, node_id) if state is not None else None
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
        state=state,
    )


async def probe(
    base_url: str,
    timeout: float,  # noqa: ASYNC109 - a per-request limit handed to aiohttp, not a deadline
    session: aiohttp.ClientSession | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> NodeView:
    """Ask the node at ``base_url`` for ``/node_id``, ``/state`` and ``/models`` at once.

    Each request is limited to ``timeout`` seconds. Raises ExoApiError when ``/node_id``
    gives no id (the node is down); other failures land in ``NodeView.problems``.
    ``headers`` go with each request (``Authorization`` when ``base_url`` is a gateway).
    """
    base = normalize_url(base_url)
    if session is not None:
        return await _probe(session, base, timeout, headers)
    async with aiohttp.ClientSession() as own:
        return await _probe(own, base, timeout, headers)


def probe_sync(
    base_url: str, timeout: float, *, headers: Mapping[str, str] | None = None
) -> NodeView:
    """:func:`probe` for synchronous callers (also safe where an event loop is running)."""
    return run_coroutine(probe(base_url, timeout, headers=headers))
