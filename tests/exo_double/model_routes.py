"""Upstream's placement, instance, download and custom-model routes, for the double.

Written from upstream exo at the pinned commit (see docs/test-double.md):

- routes and handlers: ``src/exo/api/main.py`` (``API._setup_routes``, ``place_instance``,
  ``get_placement``, ``get_instance``, ``await_instance``, ``delete_instance``,
  ``start_download``, ``add_custom_model``); SSE keep-alive: ``src/exo/api/keepalive.py``;
- bodies: ``src/exo/api/types/api.py`` (``PlaceInstanceParams``, ``CreateInstanceResponse``,
  ``DeleteInstanceResponse``, ``AwaitInstanceReadyMessage``, ``AwaitInstanceTimeoutMessage``,
  ``StartDownloadParams``/``StartDownloadResponse`` (FrozenModel: camelCase, strict),
  ``AddCustomModelParams``, ``ModelListModel``);
- placement failures: ``src/exo/master/placement.py`` (``ValueError`` reasons), answered 400 by
  ``get_placement`` only: ``POST /place_instance`` answers "Command received." whatever
  happens, and the master logs a failed placement ("Error in command processor",
  ``src/exo/master/main.py``) without any trace in the state;
- an unknown model: ``ModelCard.load`` (``src/exo/shared/models/model_cards.py``) asks the hub
  and raises, which FastAPI answers with a plain-text 500.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tests.exo_double.cluster import model_card, model_list_entry

if TYPE_CHECKING:
    from tests.exo_double.server import Double

JSON = dict[str, Any]
SHARDINGS = ("Pipeline", "Tensor")
INSTANCE_METAS = ("MlxRing", "MlxJaccl")
AWAIT_POLL_S = 0.1  # upstream's _sleep in await_instance


def _double(request: web.Request) -> Double:
    from tests.exo_double.server import DOUBLE_KEY

    return request.app[DOUBLE_KEY]


def _error(status: int, message: str, phrase: str) -> web.Response:
    from tests.exo_double.server import _error as error

    return error(status, message, phrase)


def _unprocessable(loc: list[str | int], msg: str, kind: str) -> web.Response:
    from tests.exo_double.server import _validation_error

    return _validation_error(loc, msg, kind)


def _internal_error() -> web.Response:
    # an exception FastAPI does not handle: Starlette's ServerErrorMiddleware, plain text
    return web.Response(status=500, text="Internal Server Error")


async def _body(request: web.Request) -> JSON | web.Response:
    try:
        doc = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _unprocessable(["body"], "JSON decode error", "json_invalid")
    if not isinstance(doc, dict):
        return _unprocessable(["body"], "Input should be a valid dictionary", "dict_type")
    return doc


def _place_params(source: Any, where: str) -> tuple[str, str, str, int] | web.Response:
    """``PlaceInstanceParams``: model_id, sharding, instance_meta, min_nodes (snake_case)."""
    model_id = source.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        return _unprocessable([where, "model_id"], "Field required", "missing")
    sharding = source.get("sharding", "Pipeline")
    if sharding not in SHARDINGS:
        return _unprocessable([where, "sharding"], "Input should be 'Tensor' or 'Pipeline'", "enum")
    meta = source.get("instance_meta", "MlxRing")
    if meta not in INSTANCE_METAS:
        return _unprocessable(
            [where, "instance_meta"], "Input should be 'MlxRing' or 'MlxJaccl'", "enum"
        )
    try:
        min_nodes = int(source.get("min_nodes", 1))
    except (TypeError, ValueError):
        return _unprocessable([where, "min_nodes"], "Input should be a valid integer", "int")
    return model_id, sharding, meta, min_nodes


async def place_instance(request: web.Request) -> web.Response:
    double = _double(request)
    cluster = double.cluster
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    params = _place_params(body, "body")
    if isinstance(params, web.Response):
        return params
    model_id, _, _, min_nodes = params
    if not cluster.knows(model_id):
        double.log.warning(f"double: no model card for {model_id} (hub unreachable or unknown)")
        return _internal_error()
    command_id = str(uuid.uuid4())

    async def process() -> None:
        await asyncio.sleep(cluster.faults.place_delay_s)
        if reason := cluster.placement_error(model_id, min_nodes):
            double.log.warning(f"Error in command processor: {reason}")
            return
        placed = cluster.add_instance(model_id, ready_at=None)
        if placed is None:
            double.log.warning("Error in command processor: No cycles found")
            return
        for node in placed.nodes:
            cluster.start_download(node, model_id)
        double.log.info(f"double: placed {model_id} as {placed.instance_id}")

    task = asyncio.ensure_future(process())
    double.background.add(task)
    task.add_done_callback(double.background.discard)
    return web.json_response(
        {
            "message": "Command received.",
            "command_id": command_id,
            "model_card": model_card(model_id),
        }
    )


async def get_placement(request: web.Request) -> web.Response:
    cluster = _double(request).cluster
    params = _place_params(dict(request.query), "query")
    if isinstance(params, web.Response):
        return params
    model_id, _, _, min_nodes = params
    if not cluster.knows(model_id):
        return _internal_error()
    if reason := cluster.placement_error(model_id, min_nodes):
        return _error(400, reason, "Bad Request")
    if not cluster.instance_nodes:
        return _error(400, "No cycles found with sufficient memory", "Bad Request")
    return web.json_response(cluster.preview(model_id))


def _find(request: web.Request) -> JSON | None:
    instance_id = request.match_info["instance_id"]
    return _double(request).cluster.instances().get(instance_id)


async def get_instance(request: web.Request) -> web.Response:
    instance = _find(request)
    if instance is None:
        return _error(404, "Instance not found", "Not Found")
    return web.json_response(instance)


async def delete_instance(request: web.Request) -> web.Response:
    double = _double(request)
    instance_id = request.match_info["instance_id"]
    if instance_id not in double.cluster.placed:
        return _error(404, "Instance not found", "Not Found")
    double.cluster.placed.pop(instance_id)
    double.log.info(f"double: deleted instance {instance_id}")
    return web.json_response(
        {
            "message": "Command received.",
            "command_id": str(uuid.uuid4()),
            "instance_id": instance_id,
        }
    )


_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


def snake_keys(value: Any) -> Any:
    """``model_dump_json()`` without ``by_alias``: field names snake_case; tags (class names,
    upper-case) and ids stay as they are."""
    if isinstance(value, dict):
        return {
            (_CAMEL.sub(r"_\1", k).lower() if k[:1].islower() else k): snake_keys(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [snake_keys(v) for v in value]
    return value


async def await_instance(request: web.Request) -> web.StreamResponse:
    """SSE: one ``ready`` message as soon as *an* instance of the model exists (ready or
    not), or a ``timeout`` message. Upstream serialises with ``model_dump_json()``, so the
    instance's keys are snake_case here, unlike ``/state``."""
    cluster = _double(request).cluster
    model_id = request.query.get("model_id")
    if not model_id:
        return _unprocessable(["query", "model_id"], "Field required", "missing")
    try:
        timeout = float(request.query.get("timeout_seconds", "0"))
    except ValueError:
        return _unprocessable(["query", "timeout_seconds"], "Input should be a number", "float")
    if not 0.0 <= timeout <= 300.0:
        return _unprocessable(
            ["query", "timeout_seconds"], "Input should be less than or equal to 300", "le"
        )
    from tests.exo_double.server import SSE_HEADERS

    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    await response.write(b": keep-alive\n\n")
    deadline = None if timeout == 0 else time.monotonic() + timeout
    while True:
        for instance_id, instance in cluster.instances().items():
            if cluster.placed[instance_id].model_id == model_id:
                message = {"type": "ready", "instance": snake_keys(instance)}
                await response.write(f"data: {json.dumps(message)}\n\n".encode())
                return response
        if deadline is not None and time.monotonic() >= deadline:
            message = {"type": "timeout", "message": f"No instance found for model {model_id}"}
            await response.write(f"data: {json.dumps(message)}\n\n".encode())
            return response
        await asyncio.sleep(AWAIT_POLL_S)


async def start_download(request: web.Request) -> web.Response:
    """``StartDownloadParams`` is a strict FrozenModel: camelCase ``targetNodeId`` and a
    tagged ``shardMetadata``; the answer ``StartDownloadResponse`` is ``{"commandId"}``."""
    double = _double(request)
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    target = body.get("targetNodeId", body.get("target_node_id"))
    shard = body.get("shardMetadata", body.get("shard_metadata"))
    if not isinstance(target, str):
        return _unprocessable(["body", "targetNodeId"], "Field required", "missing")
    inner = (
        next(iter(shard.values()), None) if isinstance(shard, dict) and len(shard) == 1 else None
    )
    card = inner.get("modelCard") if isinstance(inner, dict) else None
    model_id = card.get("modelId") if isinstance(card, dict) else None
    if not isinstance(model_id, str):
        return _unprocessable(
            ["body", "shardMetadata"], "Input should be a valid dictionary", "model_type"
        )
    if target in double.cluster.all_nodes:
        double.cluster.start_download(target, model_id)
    return web.json_response({"commandId": str(uuid.uuid4())})


async def add_custom_model(request: web.Request) -> web.Response:
    double = _double(request)
    cluster = double.cluster
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        return _unprocessable(["body", "model_id"], "Field required", "missing")
    if not cluster.known_to_hub(model_id):
        reason = (
            "Cannot connect to host huggingface.co"
            if cluster.faults.hub_down
            else (
                f"404, message='Not Found', url='https://huggingface.co/{model_id}/resolve/main/config.json'"
            )
        )
        return _error(400, f"Failed to fetch model: {reason}", "Bad Request")
    if model_id not in cluster.custom_models:
        cluster.custom_models.append(model_id)
    entry = model_list_entry(model_id, int(time.time()))
    entry["is_custom"] = True
    return web.json_response(entry)


async def tear_down(request: web.Request) -> web.Response:
    """Double-only: drop every instance, as EXO does when the master changes."""
    double = _double(request)
    gone = list(double.cluster.placed)
    double.cluster.placed.clear()
    double.log.info(f"double: tore down {len(gone)} instance(s)")
    return web.json_response({"removed": gone})


def add_routes(app: web.Application, control_prefix: str) -> None:
    # upstream registers /instance/await and /instance/placement before /instance/{id}
    app.router.add_post("/place_instance", place_instance)
    app.router.add_get("/instance/placement", get_placement)
    app.router.add_get("/instance/await", await_instance)
    app.router.add_get("/instance/{instance_id}", get_instance)
    app.router.add_delete("/instance/{instance_id}", delete_instance)
    app.router.add_post("/download/start", start_download)
    app.router.add_post("/models/add", add_custom_model)
    app.router.add_post(control_prefix + "teardown", tear_down)
