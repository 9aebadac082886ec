"""The EXO test double: an aiohttp server that answers like upstream exo's node API.

Start it as ``python -m tests.exo_double`` with exo's own flags plus the double-only ones
(see ``build_parser``). It logs to stderr in upstream's loguru format, including the
election lines (``Node elected Master - maintaining self`` / ``Node X elected master -
demoting self``), because exo's HTTP API itself does not say which node is master.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from tests.exo_double.cluster import (
    BACKENDS,
    GIB,
    RUNNER_STATES,
    Cluster,
    DownloadSpec,
    ModelFaults,
    PeerSpec,
    model_list_entry,
    random_node_id,
)
from tests.exo_double.model_routes import add_routes as add_model_routes

JSON = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# cutoff and sse_error are upstream's ways of failing a chat completion after its 200 (see
# _generation_failed); they apply to POST /v1/chat/completions only.
FAULT_MODES = ("ok", "error500", "hang", "crash", "cutoff", "sse_error")
COMPLETION_FAULTS = ("cutoff", "sse_error")
CONTROL_PREFIX = "/__double__/"

_ANSI_BOLD = "\x1b[1m"
_ANSI_RESET = "\x1b[0m"
_LEVEL_COLOUR = {
    "DEBUG": "\x1b[34m\x1b[1m",
    "INFO": _ANSI_BOLD,
    "WARNING": "\x1b[33m\x1b[1m",
    "CRITICAL": "\x1b[41m\x1b[1m",
}


class Log:
    """Lines in the shape upstream's loguru sink writes to stderr (colour forced on, as there)."""

    def __init__(self, verbosity: int, stream: TextIO) -> None:
        self.verbosity = verbosity
        self.stream = stream

    def _emit(self, level: str, message: str) -> None:
        if level == "DEBUG" and self.verbosity == 0:
            return
        now = time.time()
        millis = int((now % 1) * 1000)
        colour = _LEVEL_COLOUR[level]
        if self.verbosity == 0:
            clock = time.strftime("%I:%M:%S", time.localtime(now))
            ampm = time.strftime("%p", time.localtime(now))
            stamp = f"{clock}.{millis:03d}0{ampm}"
            line = f"[ {stamp} | {colour}{level:<8}{_ANSI_RESET}] {colour}{message}{_ANSI_RESET}"
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{millis:03d}"
            line = (
                f"[ {stamp} | {colour}{level:<8}{_ANSI_RESET} | exo_double:main:0 ] "
                f"{colour}{message}{_ANSI_RESET}"
            )
        self.stream.write(line + "\n")
        self.stream.flush()

    def debug(self, message: str) -> None:
        self._emit("DEBUG", message)

    def info(self, message: str) -> None:
        self._emit("INFO", message)

    def warning(self, message: str) -> None:
        self._emit("WARNING", message)

    def critical(self, message: str) -> None:
        self._emit("CRITICAL", message)


@dataclass
class Options:
    """Parsed command line: exo's flags, then the double's own."""

    verbosity: int = 0
    force_master: bool = False
    spawn_api: bool = True
    api_port: int = 52415
    no_worker: bool = False
    no_downloads: bool = False
    offline: bool = False
    no_batch: bool = False
    legacy_daemon: bool = False
    bootstrap_peers: list[str] = field(default_factory=list)
    namespace: str = ""
    zenoh_port: int = 52414
    discovery_port: int = 52413
    fast_synch: bool | None = None
    # double-only
    node_id: str = ""
    peers: list[PeerSpec] = field(default_factory=list)
    master_id: str | None = None
    instances: list[str] = field(default_factory=list)
    no_master: bool = False
    bind: str = "0.0.0.0"  # upstream binds every IPv4 address, no IPv6
    no_edges: bool = False
    slow_start: float = 0.0
    hang_after: float | None = None
    crash_after: float | None = None
    exit_code: int = 1
    stream_delay: float = 0.0
    env_dump: Path | None = None
    download_seconds: float = 2.0
    place_delay: float = 0.3
    fail_download: list[str] = field(default_factory=list)
    never_ready: list[str] = field(default_factory=list)
    too_big: list[str] = field(default_factory=list)
    hub_model: list[str] = field(default_factory=list)
    hub_down: bool = False
    runner_status: str = "RunnerReady"
    downloads: list[DownloadSpec] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    ram_total_gib: float = 64.0

    @property
    def effective_master(self) -> str | None:
        if self.no_master:
            return None
        if self.master_id:
            return self.master_id
        if self.force_master or not self.peers:
            return self.node_id
        return self.peers[0].node_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exo",
        description="EXO test double: upstream exo's command line and HTTP API, no inference.",
    )
    # Upstream exo's flags (src/exo/main.py), same names, same defaults.
    parser.add_argument(
        "-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=0
    )
    parser.add_argument("-v", "--verbose", action="count", dest="verbosity", default=0)
    parser.add_argument("-m", "--force-master", action="store_true", dest="force_master")
    parser.add_argument("--no-api", action="store_false", dest="spawn_api")
    parser.add_argument("--api-port", type=int, dest="api_port", default=52415)
    parser.add_argument("--no-worker", action="store_true")
    parser.add_argument("--no-downloads", action="store_true")
    parser.add_argument(
        "--offline",
        action="store_true",
        default=os.getenv("EXO_OFFLINE", "false").lower() == "true",
    )
    parser.add_argument("--no-batch", action="store_true")
    parser.add_argument("--legacy-daemon", action="store_true")
    parser.add_argument(
        "--bootstrap-peers",
        type=lambda s: [p for p in s.split(",") if p],
        default=[p for p in os.getenv("EXO_BOOTSTRAP_PEERS", "").split(",") if p],
        dest="bootstrap_peers",
    )
    parser.add_argument("--namespace", default="1.0.71-double")
    parser.add_argument("--zenoh-port", type=int, default=52414)
    parser.add_argument("--discovery-port", type=int, default=52413)
    synch = parser.add_mutually_exclusive_group()
    synch.add_argument("--fast-synch", action="store_true", dest="fast_synch", default=None)
    synch.add_argument("--no-fast-synch", action="store_false", dest="fast_synch")

    double = parser.add_argument_group("test double only")
    double.add_argument("--node-id", default="", help="this node's id (default: random)")
    double.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="ID=ADDRESS",
        dest="peers",
        help="another node of the cluster and one of its addresses (repeatable)",
    )
    double.add_argument(
        "--master-id",
        default=None,
        help="the elected master (default: this node with --force-master, else the first peer)",
    )
    double.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="MODEL_ID",
        dest="instances",
        help="a running model instance over this node and its peers (repeatable)",
    )
    double.add_argument(
        "--no-master",
        action="store_true",
        help="no master reached yet: empty state (lastEventAppliedIdx -1), no election line",
    )
    double.add_argument(
        "--bind",
        default="0.0.0.0",
        help="IPv4 address to bind (default 0.0.0.0, as upstream; never IPv6)",
    )
    double.add_argument(
        "--no-edges",
        action="store_true",
        help="no socket edges to the peers (none of this node's reachability probes passed)",
    )
    double.add_argument("--slow-start", type=float, default=0.0, metavar="SECS")
    double.add_argument("--hang-after", type=float, default=None, metavar="SECS")
    double.add_argument("--crash-after", type=float, default=None, metavar="SECS")
    double.add_argument("--exit-code", type=int, default=1, metavar="N")
    double.add_argument("--stream-delay", type=float, default=0.0, metavar="SECS")
    double.add_argument("--env-dump", type=Path, default=None, metavar="FILE")
    models = parser.add_argument_group("test double only: downloads and placement")
    models.add_argument("--download-seconds", type=float, default=2.0, metavar="SECS")
    models.add_argument("--place-delay", type=float, default=0.3, metavar="SECS")
    for flag, text in (
        ("--fail-download", "this model's downloads fail (DownloadFailed)"),
        ("--never-ready", "instances of this model never leave RunnerLoading"),
        ("--too-big", "placing this model fails: no cycle with sufficient memory"),
        ("--hub-model", "a model the hub knows beyond the catalogue (/models/add finds it)"),
    ):
        models.add_argument(flag, action="append", default=[], metavar="MODEL_ID", help=text)
    models.add_argument("--hub-down", action="store_true", help="Hugging Face unreachable")
    double.add_argument(
        "--runner-status",
        choices=RUNNER_STATES,
        default="RunnerReady",
        help="the state of every runner of every instance (default RunnerReady)",
    )
    double.add_argument(
        "--download",
        action="append",
        default=[],
        metavar="MODEL=PERCENT",
        dest="downloads",
        help="this node downloading MODEL, PERCENT done (100: completed; repeatable)",
    )
    double.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        default=[],
        dest="backends",
        help="a backend every node reports in nodeBackends (repeatable; default MlxCpu)",
    )
    double.add_argument(
        "--ram-total-gib",
        type=float,
        default=64.0,
        metavar="GIB",
        help="every node's ramTotal (ramAvailable is 3/4 of it, or OVERRIDE_MEMORY_MB here)",
    )
    return parser


def _override_memory_mb() -> int | None:
    """``OVERRIDE_MEMORY_MB`` as upstream reads it (``int(...)`` when set and not empty,
    src/exo/utils/info_gatherer/info_gatherer.py)."""
    text = os.environ.get("OVERRIDE_MEMORY_MB")
    return int(text) if text else None


def parse_args(argv: Sequence[str]) -> Options:
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    try:
        peers = [PeerSpec.parse(p) for p in ns.peers]
        downloads = [DownloadSpec.parse(d) for d in ns.downloads]
    except ValueError as exc:
        parser.error(str(exc))
    if ns.api_port <= 0:
        parser.error("--api-port must be a positive integer")
    if ":" in ns.bind:
        parser.error("--bind takes an IPv4 address: upstream's API never listens on IPv6")
    values = vars(ns)
    values["peers"] = peers
    values["downloads"] = downloads
    values["node_id"] = ns.node_id or random_node_id()
    return Options(**values)


@dataclass
class Fault:
    """The current fault: ``mode`` applies to every route but the control ones, or to ``paths``."""

    mode: str = "ok"
    exit_code: int = 1
    paths: tuple[str, ...] = ()

    def applies_to(self, path: str) -> bool:
        return not self.paths or path in self.paths


@dataclass
class Double:
    options: Options
    log: Log
    cluster: Cluster
    fault: Fault = field(default_factory=Fault)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    background: set[asyncio.Future[None]] = field(default_factory=set)

    def exit_now(self, code: int) -> None:
        """Die like a crashed exo: one critical line, no clean-up, exit ``code``."""
        self.log.critical("EXO terminated due to unhandled exception")
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os._exit(code)


# upstream's streamed answers: StreamingResponse(media_type="text/event-stream") with these
# headers (src/exo/api/main.py at the pin); Starlette adds the charset
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "close",
    "X-Accel-Buffering": "no",
}


def _error(status: int, message: str, phrase: str) -> web.Response:
    """Upstream's ``ErrorResponse`` for an ``HTTPException``."""
    body = {"error": {"message": message, "type": phrase, "param": None, "code": status}}
    return web.json_response(body, status=status)


def _validation_error(loc: list[str | int], msg: str, kind: str) -> web.Response:
    """FastAPI's 422 body for a request that fails validation."""
    return web.json_response({"detail": [{"type": kind, "loc": loc, "msg": msg}]}, status=422)


@web.middleware
async def _faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    double: Double = request.app[DOUBLE_KEY]
    double.log.debug(f"API request: {request.method} {request.path}")
    if request.path.startswith(CONTROL_PREFIX) or not double.fault.applies_to(request.path):
        return await handler(request)
    mode = double.fault.mode
    if mode in COMPLETION_FAULTS:  # applied by chat_completions itself
        return await handler(request)
    if mode == "error500":
        return web.Response(status=500, text="Internal Server Error")
    if mode == "hang":
        await asyncio.Event().wait()
    if mode == "crash":
        double.exit_now(double.fault.exit_code)
    return await handler(request)


DOUBLE_KEY = web.AppKey("double", Double)

_CORS_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"


@web.middleware
async def _cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Starlette's CORSMiddleware as upstream configures it: any origin, credentials."""
    if (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    ):
        headers = {
            "Access-Control-Allow-Methods": _CORS_METHODS,
            "Access-Control-Max-Age": "600",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Allow-Origin": request.headers["Origin"],
            "Vary": "Origin",
        }
        if wanted := request.headers.get("Access-Control-Request-Headers"):
            headers["Access-Control-Allow-Headers"] = wanted
        return web.Response(text="OK", headers=headers)
    return await handler(request)


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    if origin := request.headers.get("Origin"):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"


async def node_id(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOUBLE_KEY].cluster.node_id)


def _walk(doc: Any, path: str) -> Any:
    for part in path.split("/"):
        if part == "":
            continue
        doc = doc[part] if isinstance(doc, dict) else doc[int(part)]
    return doc


async def state(request: web.Request) -> web.Response:
    doc = request.app[DOUBLE_KEY].cluster.state()
    path = request.match_info.get("path", "")
    if not path:
        return web.json_response(doc)
    try:
        return web.json_response(_walk(doc, path))
    except (KeyError, IndexError, ValueError, TypeError):
        dotted = path.replace("/", ".")
        return _error(404, f"unable to find path '{dotted}' in state json", "Not Found")


async def models(request: web.Request) -> web.Response:
    cluster = request.app[DOUBLE_KEY].cluster
    # ModelListModel.created is Field(default_factory=lambda: int(time.time())) in upstream's
    # src/exo/api/types/api.py: the time of the request, not of the node's start.
    created = int(time.time())
    ids = cluster.catalogue()
    if request.query.get("status") == "downloaded":
        downloaded = set(cluster.instance_models) | {
            entry["DownloadCompleted"]["shardMetadata"]["PipelineShardMetadata"]["modelCard"][
                "modelId"
            ]
            for entries in cluster.downloads_doc().values()
            for entry in entries
            if "DownloadCompleted" in entry
        }
        ids = [m for m in ids if m in downloaded]
    return web.json_response(
        {"object": "list", "data": [model_list_entry(m, created) for m in ids]}
    )


async def events(request: web.Request) -> web.Response:
    body = json.dumps(request.app[DOUBLE_KEY].cluster.events())
    return web.Response(text=body, content_type="application/json")


async def ollama_version(_: web.Request) -> web.Response:
    return web.json_response({"version": "1.0.0"})


DASHBOARD = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>EXO</title></head>
<body>
<h1>EXO</h1>
<p>Test double of the EXO dashboard. Node <code>{node_id}</code>.</p>
</body>
</html>
"""


async def dashboard(request: web.Request) -> web.Response:
    node = request.app[DOUBLE_KEY].cluster.node_id
    return web.Response(text=DASHBOARD.format(node_id=node), content_type="text/html")


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


_TOKEN = re.compile(r"\S+\s*")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    double = request.app[DOUBLE_KEY]
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _validation_error(["body", 0], "JSON decode error", "json_invalid")
    if not isinstance(payload, dict):
        return _validation_error(["body"], "Input should be a valid dictionary", "dict_type")
    for key in ("model", "messages"):
        if key not in payload:
            return _validation_error(["body", key], "Field required", "missing")
    model = payload["model"]
    messages = payload["messages"]
    if not isinstance(model, str) or not isinstance(messages, list):
        return _validation_error(["body"], "Input should be a valid request", "model_type")
    if not double.cluster.has_instance(model):
        return _error(404, f"No instance found for model {model}", "Not Found")

    texts = [_message_text(m.get("content")) for m in messages if isinstance(m, dict)]
    users = [
        _message_text(m.get("content"))
        for m in messages
        if isinstance(m, dict) and m.get("role") == "user"
    ]
    reply = f"EXO test double {double.cluster.node_id[:8]} heard: {users[-1] if users else ''}"
    tokens = _TOKEN.findall(reply)
    max_tokens = payload.get("max_tokens")
    finish = "stop"
    if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
        tokens = tokens[:max_tokens]
        finish = "length"
    prompt_tokens = sum(len(_TOKEN.findall(t)) for t in texts)
    usage = _usage(prompt_tokens, len(tokens))
    command_id = str(uuid.uuid4())
    fault = double.fault
    failing = (
        fault.mode if fault.mode in COMPLETION_FAULTS and fault.applies_to(request.path) else None
    )
    streamed = payload.get("stream") is True

    if failing is not None:
        return await _generation_failed(request, failing, streamed=streamed)

    if streamed:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        await response.write(b": keep-alive\n\n")
        for index, token in enumerate(tokens):
            if double.options.stream_delay > 0:
                await asyncio.sleep(double.options.stream_delay)
            last = index == len(tokens) - 1
            choice: JSON = {"index": 0, "delta": {"role": "assistant", "content": token}}
            chunk: JSON = {
                "id": command_id,
                "object": "chat.completion",
                # chunk_to_response (src/exo/api/adapters/chat_completions.py) stamps every
                # chunk with int(time.time()) when it is made
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
            }
            if last:
                # generate_chat_stream (same file) puts the usage on the chunk with the
                # finish_reason only, dumped with exclude_none: no usage key before it
                choice["finish_reason"] = finish
                chunk["usage"] = usage
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    body = {
        "id": command_id,
        "object": "chat.completion",
        "created": int(time.time()),  # collect_chat_response: when the answer is complete
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens)},
                "finish_reason": finish,
            }
        ],
        "usage": usage,  # collect_chat_response: the last chunk's usage
    }
    # Upstream answers non-streamed completions through a StreamingResponse as well:
    # application/json with chunked transfer encoding, no Content-Length.
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(json.dumps(body).encode())
    await response.write_eof()
    return response


GENERATION_ERROR = "Runner failed: the test double was told to fail (fault mode {mode})"


async def _generation_failed(
    request: web.Request, mode: str, *, streamed: bool
) -> web.StreamResponse:
    """A completion whose runner fails (an ``ErrorChunk``), as upstream answers it.

    Streamed (``generate_chat_stream`` in src/exo/api/adapters/chat_completions.py, wrapped
    by ``with_sse_keepalive``): the 200 and the ``: keep-alive`` comment are out already, then
    ``data: {"error": {"message", "type": "InternalServerError", "code": 500}}`` (an
    ``ErrorResponse`` dumped with ``exclude_none``, so no ``param``) and ``data: [DONE]``.

    Not streamed (``collect_chat_response``, same file): it raises ``ValueError`` inside the
    ``StreamingResponse`` body after Starlette has sent the 200 headers, and hypercorn
    (0.18, ``HTTPStream.app_send``) then closes the connection without ending the chunked
    body: a 200 ``application/json`` with an empty, unterminated body. The same happens to
    a streamed request in mode ``cutoff``: the stream ends after the keep-alive comment,
    without ``[DONE]`` or a last chunk.
    """
    if streamed:
        response = web.StreamResponse(headers=SSE_HEADERS)
    else:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    if streamed:
        await response.write(b": keep-alive\n\n")
    if streamed and mode == "sse_error":
        error = {
            "error": {
                "message": GENERATION_ERROR.format(mode=mode),
                "type": "InternalServerError",
                "code": 500,
            }
        }
        await response.write(f"data: {json.dumps(error)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    # Headers (and for streams the keep-alive) are on the wire; now drop the connection
    # without the chunked body's last chunk, as hypercorn does after the app raised.
    await asyncio.sleep(0.01)
    if request.transport is not None:
        request.transport.abort()
    return response


async def set_fault(request: web.Request) -> web.Response:
    double = request.app[DOUBLE_KEY]
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return web.json_response({"error": "body must be JSON"}, status=400)
    mode = payload.get("mode") if isinstance(payload, dict) else None
    if mode not in FAULT_MODES:
        return web.json_response({"error": f"mode must be one of {FAULT_MODES}"}, status=400)
    exit_code = payload.get("exitCode", double.options.exit_code)
    paths = payload.get("paths", [])
    if not isinstance(exit_code, int) or not isinstance(paths, list):
        return web.json_response({"error": "exitCode: int, paths: list of paths"}, status=400)
    double.fault = Fault(mode=mode, exit_code=exit_code, paths=tuple(str(p) for p in paths))
    double.log.info(f"test double: fault mode {mode}")
    if mode == "crash" and not paths:
        asyncio.get_running_loop().call_later(0.05, double.exit_now, exit_code)
    return web.json_response({"mode": mode, "exitCode": exit_code, "paths": list(paths)})


async def get_fault(request: web.Request) -> web.Response:
    fault = request.app[DOUBLE_KEY].fault
    return web.json_response(
        {"mode": fault.mode, "exitCode": fault.exit_code, "paths": list(fault.paths)}
    )


def build_app(double: Double) -> web.Application:
    app = web.Application(middlewares=[_cors_preflight, _faults])
    app[DOUBLE_KEY] = double
    app.on_response_prepare.append(_cors_headers)
    app.router.add_get("/node_id", node_id)
    app.router.add_get("/state", state)
    app.router.add_get("/state/{path:.*}", state)
    app.router.add_get("/models", models)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/events", events)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/ollama/api/version", ollama_version)
    app.router.add_get("/", dashboard)
    app.router.add_get("/index.html", dashboard)
    app.router.add_post(CONTROL_PREFIX + "fault", set_fault)
    app.router.add_get(CONTROL_PREFIX + "fault", get_fault)
    add_model_routes(app, CONTROL_PREFIX)
    return app


def _cache_dir() -> Path | None:
    """Upstream's cache dir, only where the environment names one (never the real ~/.cache)."""
    if exo_home := os.environ.get("EXO_HOME"):
        return Path.home() / exo_home
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "exo"
    return None


def _lock_pidfile() -> int | None:
    """One exo per cache dir, as upstream's flock-ed ``exo.pid``. Returns the fd or exits."""
    cache = _cache_dir()
    if cache is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "exo.pid"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        print(f"daemon already running: pidfile {path} is locked", file=sys.stderr)
        raise SystemExit(1) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _dump_env(path: Path, argv: Sequence[str]) -> None:
    doc = {
        "argv": list(argv),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    tmp.replace(path)


async def _serve(double: Double) -> int:
    options = double.options
    log = double.log
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, double.stop.set)

    log.info(f"Starting node {options.node_id}")
    master = options.effective_master
    if master == options.node_id:
        log.info("Node elected Master - maintaining self")
    elif master is not None:
        log.info(f"Node {master} elected master - demoting self")

    if options.crash_after is not None:
        loop.call_later(options.crash_after, double.exit_now, options.exit_code)
    if options.hang_after is not None:
        loop.call_later(options.hang_after, _start_hanging, double)

    runner: web.AppRunner | None = None
    if options.spawn_api:
        if options.slow_start > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(double.stop.wait(), options.slow_start)
        if not double.stop.is_set():
            log.info("Starting API")
            # Upstream prints its banner ("Dashboard & API Ready") to stderr just before
            # the server binds, so it is no proof that the port is open.
            log.stream.write(f"\nDashboard & API Ready\nhttp://localhost:{options.api_port}\n\n")
            log.stream.flush()
            runner = web.AppRunner(build_app(double), access_log=None, handle_signals=False)
            await runner.setup()
            # Upstream: API.run_api (src/exo/api/main.py) sets hypercorn's
            # cfg.bind = [f"0.0.0.0:{self.port}"]: every IPv4 address, no IPv6 socket.
            site = web.TCPSite(runner, options.bind, options.api_port, shutdown_timeout=1.0)
            await site.start()
    await double.stop.wait()
    if runner is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.cleanup(), 2.0)
    log.info("EXO Shutdown complete")
    return 0


def _start_hanging(double: Double) -> None:
    double.fault = Fault(mode="hang")
    double.log.info("test double: hanging from now on")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(args)
    if options.env_dump is not None:
        _dump_env(options.env_dump, [sys.argv[0], *args])
    log = Log(options.verbosity, sys.stderr)
    if os.getenv("EXO_LIBP2P_NAMESPACE"):
        print(
            "ValueError: EXO_LIBP2P_NAMESPACE has been removed - use EXO_ZENOH_NAMESPACE instead",
            file=sys.stderr,
        )
        return 1
    if options.bootstrap_peers:
        print("ValueError: Bootstrap peers has been temporarily removed", file=sys.stderr)
        return 1
    pid_fd = _lock_pidfile()
    log.info(f"pid = {os.getpid()}")
    if options.offline:
        log.info("Running in OFFLINE mode — no internet checks, local models only")
    if options.no_batch:
        log.info("Continuous batching disabled (--no-batch)")
    if options.fast_synch is True:
        log.info("FAST_SYNCH forced ON")
    elif options.fast_synch is False:
        log.info("FAST_SYNCH forced OFF")
    cluster = Cluster(
        node_id=options.node_id,
        api_port=options.api_port,
        peers=options.peers,
        instance_models=options.instances,
        synced=not options.no_master,
        no_worker=options.no_worker,
        no_edges=options.no_edges,
        faults=ModelFaults(
            download_s=options.download_seconds,
            place_delay_s=options.place_delay,
            fail_download=frozenset(options.fail_download),
            never_ready=frozenset(options.never_ready),
            too_big=frozenset(options.too_big),
            hub_models=frozenset(options.hub_model),
            hub_down=options.hub_down,
        ),
        runner_status=options.runner_status,
        downloads=options.downloads,
        backends=options.backends or ["MlxCpu"],
        ram_total=int(options.ram_total_gib * GIB),
        ram_available=int(options.ram_total_gib * GIB * 3 / 4),
        override_memory_mb=_override_memory_mb(),
    )

    async def run() -> int:
        return await _serve(Double(options=options, log=log, cluster=cluster))

    try:
        return asyncio.run(run())
    finally:
        if pid_fd is not None:
            os.close(pid_fd)
