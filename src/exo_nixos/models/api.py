"""Upstream exo's model routes, as a node (or the gateway in front of it) serves them.

Shapes read at the pinned commit: routes in ``src/exo/api/main.py`` (``API._setup_routes``),
bodies in ``src/exo/api/types/api.py``:

- ``POST /place_instance`` (``PlaceInstanceParams``: ``model_id``, ``sharding``,
  ``instance_meta``, ``min_nodes``) answers ``CreateInstanceResponse`` at once ("Command
  received."); the master places later, or logs why it could not. Nothing in the answer
  says whether placement will succeed.
- ``GET /instance/placement`` (same parameters, as a query) runs the same placement without
  placing: the instance it would create, or 400 with upstream's reason ("No cycles found
  with sufficient memory"). This is how a refusal is learnt before placing.
- ``GET /instance/{id}``, ``DELETE /instance/{id}`` (404 "Instance not found").
- ``GET /instance/await?model_id=&timeout_seconds=`` (at most 300): an SSE stream whose one
  ``data:`` event is ``{"type": "ready", "instance": ...}`` as soon as any instance of the
  model *exists* (not when its runners are ready) or ``{"type": "timeout"}``.
- ``POST /download/start`` (``StartDownloadParams``: ``targetNodeId``, ``shardMetadata``):
  one node downloads one shard.
- ``POST /models/add`` (``AddCustomModelParams``: ``model_id``): fetch a model card from
  Hugging Face (400 "Failed to fetch model: ..." when it cannot).

Upstream has no single "download this model on the cluster" route: a pull asks for the
placement preview and starts each node's shard download from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp
from pydantic import ValidationError

from exo_nixos import jsonio
from exo_nixos.exoapi import ExoApiError, State, normalize_url, parse_state_doc, request_json
from exo_nixos.exoapi.state import Instance

if TYPE_CHECKING:
    from exo_nixos.config import DeclaredModel

AWAIT_LIMIT_S = 300.0  # upstream's Query(le=300.0) on timeout_seconds


@dataclass(frozen=True)
class Placement:
    """How to place a model: upstream's ``PlaceInstanceParams``."""

    model_id: str
    sharding: str = "Pipeline"
    instance_meta: str = "MlxRing"
    min_nodes: int = 1

    @classmethod
    def declared(cls, model_id: str, spec: DeclaredModel) -> Placement:
        """The placement a ``models`` entry of the config asks for."""
        return cls(
            model_id=model_id,
            sharding=str(spec.sharding),
            instance_meta=str(spec.instance_meta),
            min_nodes=spec.min_nodes,
        )

    def params(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "sharding": self.sharding,
            "instance_meta": self.instance_meta,
            "min_nodes": self.min_nodes,
        }


@dataclass(frozen=True)
class Preview:
    """``GET /instance/placement``: the instance a placement would create."""

    instance: Instance
    raw: Mapping[str, Any]
    """The answer as sent, whose shard metadata ``/download/start`` takes back verbatim."""

    def shards_by_node(self) -> dict[str, Any]:
        """Each node's tagged shard metadata, as upstream sent it."""
        body = next(iter(self.raw.values()), {}) if len(self.raw) == 1 else self.raw
        assignments = body.get("shardAssignments") or body.get("shard_assignments") or {}
        shards = assignments.get("runnerToShard") or assignments.get("runner_to_shard") or {}
        runners = assignments.get("nodeToRunner") or assignments.get("node_to_runner") or {}
        return {node: shards[runner] for node, runner in runners.items() if runner in shards}


class ModelsApi:
    """One node's (or the gateway's) API, for the model routes and ``/state``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        timeout_s: float = 10.0,
        api_key: str | None = None,
    ) -> None:
        self.session = session
        self.base = normalize_url(url)
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        return await request_json(
            self.session,
            method,
            self.base,
            path,
            self.timeout_s,
            self.headers,
            body,
            with_reason=True,
        )

    async def node_id(self) -> str:
        answer = await self._call("GET", "/node_id")
        if not isinstance(answer, str) or not answer:
            raise ExoApiError("unexpected /node_id answer (expected a string)", kind="shape")
        return answer

    async def state(self) -> State:
        return parse_state_doc(await self._call("GET", "/state"))

    async def model_ids(self) -> set[str]:
        doc = await self._call("GET", "/models")
        data = doc.get("data") if isinstance(doc, Mapping) else None
        if not isinstance(data, list):
            raise ExoApiError("unexpected /models shape (expected {'data': [...]})", kind="shape")
        return {str(m["id"]) for m in data if isinstance(m, Mapping) and "id" in m}

    async def place(self, placement: Placement) -> str:
        """``POST /place_instance``; returns the command id."""
        answer = await self._call("POST", "/place_instance", placement.params())
        command = answer.get("command_id") if isinstance(answer, Mapping) else None
        return str(command or "")

    async def preview(self, placement: Placement) -> Preview:
        """``GET /instance/placement``: ExoApiError (status 400, upstream's reason) when the
        cluster cannot place it."""
        query = urlencode(placement.params())
        raw = await self._call("GET", f"/instance/placement?{query}")
        if not isinstance(raw, Mapping):
            raise ExoApiError("unexpected /instance/placement answer", kind="shape")
        try:
            return Preview(Instance.model_validate(raw), raw)
        except ValidationError:
            raise ExoApiError(
                "unexpected /instance/placement answer (not an instance)", kind="shape"
            ) from None

    async def delete_instance(self, instance_id: str) -> None:
        await self._call("DELETE", f"/instance/{instance_id}")

    async def start_download(self, node_id: str, shard: Any) -> None:
        await self._call(
            "POST", "/download/start", {"targetNodeId": node_id, "shardMetadata": shard}
        )

    async def add_custom(self, model_id: str) -> None:
        await self._call("POST", "/models/add", {"model_id": model_id})

    async def await_instance(self, model_id: str, timeout_s: float) -> bool:
        """``GET /instance/await``: True once an instance of ``model_id`` exists, False when
        upstream says it timed out (``timeout_s`` is capped at upstream's 300 s)."""
        limit = min(max(timeout_s, 0.1), AWAIT_LIMIT_S)
        query = urlencode({"model_id": model_id, "timeout_seconds": limit})
        url = f"{self.base}/instance/await?{query}"
        try:
            async with self.session.get(
                url,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=limit + self.timeout_s),
            ) as response:
                if response.status != 200:
                    raise ExoApiError(
                        f"HTTP {response.status} from /instance/await",
                        kind="http",
                        status=response.status,
                    )
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue  # ": keep-alive" comments, blank separators
                    event = jsonio.loads(line.removeprefix("data:").strip())
                    return isinstance(event, Mapping) and event.get("type") == "ready"
        except TimeoutError:
            return False
        except aiohttp.ClientError as exc:
            raise ExoApiError(f"/instance/await: {exc}", kind="broken") from None
        except ValueError:
            raise ExoApiError(
                "/instance/await sent an event that is not JSON", kind="shape"
            ) from None
        return False
