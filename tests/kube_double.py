"""A double of kube-apiserver for the calls the K3s registrar makes.

Serves ``discovery.k8s.io/v1`` EndpointSlices in memory the way the real API server does for
these calls: POST (201, 409 AlreadyExists, 404 for an unknown namespace), GET (404
NotFound), PUT (409 Conflict on a stale ``metadata.resourceVersion``, unconditional when it
is empty, 422 when the immutable ``addressType`` changes), PATCH with JSON merge patch
(strategic merge patch is treated as merge patch; server-side apply answers 415), DELETE.
Every object gets a uid, a creationTimestamp, a generation and a resourceVersion from one
counter. Errors are ``v1 Status`` bodies with ``Content-Type: application/json``, as the
real server sends them. A request without ``Authorization: Bearer <token>`` gets 401.

Object names are validated as the real server's validation does (``metadata.name`` and
``endpoints[].nodeName`` as DNS subdomains, label values as label values): a bad one is a 422
``Invalid`` Status naming the field, e.g. ``endpoints[0].nodeName: Invalid value: "GPU_01":
a lowercase RFC 1123 subdomain must consist of ...``.

Faults for tests: ``fail_next`` (answer the next requests with these status codes, as JSON
Status or as plain text like a proxy; 429 with a ``Retry-After`` header and
``details.retryAfterSeconds`` like API priority and fairness), ``forbidden`` (403 for every
request, RBAC's message, until cleared), ``hang`` (hold requests until released, so clients
time out), ``pause()``/``resume()`` (stop and restart listening on the same port:
connection refused in between), and ``modify``/``remove`` for writes by someone else.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

GROUP = "discovery.k8s.io"
PREFIX = f"/apis/{GROUP}/v1/namespaces/{{namespace}}/endpointslices"


async def until(check: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait for ``check`` to hold; the limit only guards against hanging forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


@dataclass
class Fault:
    status: int
    as_status: bool = True  # a Kubernetes Status body; False: text/plain like a proxy
    bare: bool = False  # no body and no Content-Type at all
    retry_after: int | None = None  # seconds, for 429 (default 1, as the real server)


# k8s.io/apimachinery/pkg/util/validation: IsDNS1123Subdomain and IsValidLabelValue.
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
    "regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


def subdomain_problem(field_path: str, value: str) -> str | None:
    if len(value) > 253:
        return f'{field_path}: Invalid value: "{value}": must be no more than 253 characters'
    if not _DNS1123_SUBDOMAIN.match(value):
        return f'{field_path}: Invalid value: "{value}": {_SUBDOMAIN_MESSAGE}'
    return None


def _label_problem(key: str, value: str) -> str | None:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return (
            f'metadata.labels: Invalid value: "{value}": a valid label must be an empty string '
            "or consist of alphanumeric characters, '-', '_' or '.', and must start and end "
            "with an alphanumeric character, at most 63 characters"
        )
    return None


@dataclass
class Seen:
    method: str
    path: str
    status: int
    query: dict[str, str]
    at: float = 0.0  # time.monotonic() when answered


def _status(code: int, reason: str, message: str, name: str | None = None) -> web.Response:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if name is not None:
        body["details"] = {"name": name, "group": GROUP, "kind": "endpointslices"}
    return web.Response(
        status=code, body=json.dumps(body), headers={"Content-Type": "application/json"}
    )


def _object(code: int, obj: dict[str, Any]) -> web.Response:
    return web.Response(
        status=code, body=json.dumps(obj), headers={"Content-Type": "application/json"}
    )


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


class KubeApiDouble:
    def __init__(
        self,
        token: str = "good-token",
        namespaces: tuple[str, ...] = ("exo-system",),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.token = token
        self.namespaces = set(namespaces)
        self.ssl_context = ssl_context
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[Seen] = []
        self.fail_next: list[Fault] = []
        self.hang = False
        self.forbidden = False  # 403 for every request, as without the Role/RoleBinding
        self.garbage = 0  # answer this many requests 200 with a body that is not JSON
        self._release = asyncio.Event()
        self._version = 100
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post(PREFIX, self._create)
        app.router.add_get(PREFIX + "/{name}", self._get)
        app.router.add_put(PREFIX + "/{name}", self._update)
        app.router.add_patch(PREFIX + "/{name}", self._patch)
        app.router.add_delete(PREFIX + "/{name}", self._delete)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context, reuse_address=True
        )
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def pause(self) -> None:
        """Go away like a stopped API server: open connections closed, new ones refused."""
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def resume(self) -> None:
        """Listen again on the same port."""
        await self.start()

    async def stop(self) -> None:
        await self.pause()

    def release(self) -> None:
        """End the hang fault and let held requests fail."""
        self.hang = False
        self._release.set()
        self._release = asyncio.Event()

    # -- inspection and writes by others ---------------------------------------------------
    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((namespace, name)))

    def ready(self, namespace: str, name: str) -> bool | None:
        """The slice's endpoint condition ``ready``; None while there is no such slice."""
        obj = self.objects.get((namespace, name))
        return None if obj is None else bool(obj["endpoints"][0]["conditions"]["ready"])

    def modify(self, namespace: str, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Another client writes the object: its resourceVersion moves on."""
        obj = self.objects[(namespace, name)]
        change(obj)
        obj["metadata"]["resourceVersion"] = self._next_version()

    def remove(self, namespace: str, name: str) -> None:
        del self.objects[(namespace, name)]

    def statuses(self, method: str) -> list[int]:
        return [s.status for s in self.requests if s.method == method]

    # -- HTTP ------------------------------------------------------------------------------
    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        response = await self._handle(request, handler)
        self.requests.append(
            Seen(
                request.method,
                request.path,
                response.status,
                dict(request.query),
                time.monotonic(),
            )
        )
        return response

    async def _handle(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        if self.hang:
            await self._release.wait()
            return _status(504, "Timeout", "the double was released while holding the request")
        if self.forbidden:
            return self._forbidden(request)
        if self.garbage:
            self.garbage -= 1
            return web.Response(status=200, text="<html>not kubernetes</html>")
        if self.fail_next:
            fault = self.fail_next.pop(0)
            if fault.bare:
                return web.Response(status=fault.status)
            if fault.status == 429:
                return self._throttled(fault.retry_after or 1)
            if fault.as_status:
                return _status(fault.status, "InternalError", "injected failure")
            return web.Response(status=fault.status, text="upstream connect error\n")
        result: web.StreamResponse = await handler(request)
        return result

    def _forbidden(self, request: web.Request) -> web.Response:
        """RBAC's refusal (k8s.io/apiserver endpoints/handlers/responsewriters: forbidden)."""
        verbs = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch"}
        verb = verbs.get(request.method, request.method.lower())
        namespace = request.match_info.get("namespace", "")
        name = request.match_info.get("name")
        what = f'endpointslices.{GROUP} "{name}"' if name else f"endpointslices.{GROUP}"
        message = (
            f'{what} is forbidden: User "system:serviceaccount:{namespace}:exo-nixos" cannot '
            f'{verb} resource "endpointslices" in API group "{GROUP}" in the namespace '
            f'"{namespace}"'
        )
        return _status(403, "Forbidden", message, name)

    @staticmethod
    def _throttled(seconds: int) -> web.Response:
        """API priority and fairness rejecting a request: 429, Retry-After."""
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Too many requests, please try again later.",
            "reason": "TooManyRequests",
            "details": {"retryAfterSeconds": seconds},
            "code": 429,
        }
        return web.Response(
            status=429,
            body=json.dumps(body),
            headers={"Content-Type": "application/json", "Retry-After": str(seconds)},
        )

    def _check_namespace(self, request: web.Request) -> web.Response | None:
        namespace = request.match_info["namespace"]
        if namespace not in self.namespaces:
            return web.Response(
                status=404,
                body=json.dumps(
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f'namespaces "{namespace}" not found',
                        "reason": "NotFound",
                        "details": {"name": namespace, "kind": "namespaces"},
                        "code": 404,
                    }
                ),
                headers={"Content-Type": "application/json"},
            )
        return None

    @staticmethod
    def _invalid(obj: Any, namespace: str) -> str | None:
        if not isinstance(obj, dict):
            return "the body must be a JSON object"
        if obj.get("apiVersion") != f"{GROUP}/v1" or obj.get("kind") != "EndpointSlice":
            return "apiVersion/kind must be discovery.k8s.io/v1 EndpointSlice"
        meta = obj.get("metadata") or {}
        if not meta.get("name"):
            return "metadata.name: Required value"
        if problem := subdomain_problem("metadata.name", str(meta["name"])):
            return problem
        for key, value in (meta.get("labels") or {}).items():
            if problem := _label_problem(str(key), str(value)):
                return problem
        if meta.get("namespace") not in (None, namespace):
            return "the namespace of the provided object does not match the request"
        if obj.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
            return "addressType: Unsupported value"
        for index, endpoint in enumerate(obj.get("endpoints") or []):
            if not endpoint.get("addresses"):
                return f"endpoints[{index}].addresses: Required value"
            node = endpoint.get("nodeName")
            # discovery validation: ValidateNodeName, a DNS subdomain
            if node is not None and (
                problem := subdomain_problem(f"endpoints[{index}].nodeName", str(node))
            ):
                return problem
        return None

    @staticmethod
    def _invalid_status(obj: Any, problem: str) -> web.Response:
        name = obj.get("metadata", {}).get("name") if isinstance(obj, dict) else None
        prefix = f'EndpointSlice.{GROUP} "{name}"' if name else "EndpointSlice"
        return _status(422, "Invalid", f"{prefix} is invalid: {problem}", name)

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError:
            return None

    def _store(
        self, namespace: str, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = namespace
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta["generation"] = 1
        else:
            for key in ("uid", "creationTimestamp"):
                meta[key] = old["metadata"][key]
            changed = {k: v for k, v in obj.items() if k != "metadata"} != {
                k: v for k, v in old.items() if k != "metadata"
            }
            meta["generation"] = old["metadata"]["generation"] + (1 if changed else 0)
        meta["resourceVersion"] = self._next_version()
        self.objects[(namespace, meta["name"])] = obj
        return copy.deepcopy(obj)

    async def _create(self, request: web.Request) -> web.Response:
        if missing := self._check_namespace(request):
            return missing
        namespace = request.match_info["namespace"]
        obj = await self._body(request)
        if problem := self._invalid(obj, namespace):
            return self._invalid_status(obj, problem)
        name = obj["metadata"]["name"]
        if obj["metadata"].get("resourceVersion"):
            return _status(
                500, "InternalError", "resourceVersion should not be set on objects to be created"
            )
        if (namespace, name) in self.objects:
            return _status(
                409, "AlreadyExists", f'endpointslices.{GROUP} "{name}" already exists', name
            )
        return _object(201, self._store(namespace, obj, None))

    def _not_found(self, name: str) -> web.Response:
        return _status(404, "NotFound", f'endpointslices.{GROUP} "{name}" not found', name)

    async def _get(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        obj = self.objects.get(key)
        return _object(200, obj) if obj is not None else self._not_found(key[1])

    async def _update(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        obj = await self._body(request)
        if problem := self._invalid(obj, namespace):
            return self._invalid_status(obj, problem)
        if obj["metadata"]["name"] != name:
            return _status(400, "BadRequest", "the name of the object does not match the URL")
        return self._replace(namespace, name, obj)

    def _replace(self, namespace: str, name: str, obj: dict[str, Any]) -> web.Response:
        old = self.objects.get((namespace, name))
        if old is None:
            return self._not_found(name)
        wanted = obj["metadata"].get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            return _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on endpointslices.{GROUP} "{name}": the object '
                "has been modified; please apply your changes to the latest version and try again",
                name,
            )
        if obj.get("addressType") != old.get("addressType"):
            return _status(
                422, "Invalid", "EndpointSlice is invalid: addressType: field is immutable", name
            )
        return _object(200, self._store(namespace, obj, old))

    async def _patch(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        kind = request.content_type
        if kind not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return _status(415, "UnsupportedMediaType", f"the double does not support {kind}")
        old = self.objects.get((namespace, name))
        if old is None:
            return self._not_found(name)
        patch = await self._body(request)
        if not isinstance(patch, dict):
            return _status(400, "BadRequest", "the patch must be a JSON object")
        merged = _merge_patch(old, patch)
        if problem := self._invalid(merged, namespace):
            return self._invalid_status(merged, problem)
        return self._replace(namespace, name, merged)

    async def _delete(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        obj = self.objects.pop(key, None)
        return _object(200, obj) if obj is not None else self._not_found(key[1])
