"""The cluster the double pretends to be part of, rendered in upstream exo's JSON shapes.

Every document here follows what upstream's pydantic models serialise to (FastAPI's
``jsonable_encoder``: camelCase aliases, tagged unions as ``{"ClassName": {...}}``,
``Memory`` as ``{"inBytes": N}``). Only the fields this project reads, plus enough
neighbours to keep the shape recognisable, are filled in.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

# A small catalogue taken from upstream's resources/inference_model_cards/ (values, not code).
CATALOGUE: dict[str, JSON] = {
    "mlx-community/Llama-3.2-1B-Instruct-4bit": {
        "nLayers": 16,
        "hiddenSize": 2048,
        "numKeyValueHeads": 8,
        "supportsTensor": True,
        "family": "llama",
        "quantization": "4bit",
        "baseModel": "Llama 3.2 1B",
        "capabilities": ["text"],
        "contextLength": 131072,
        "storageBytes": 729808896,
    },
    "mlx-community/Qwen3-0.6B-4bit": {
        "nLayers": 28,
        "hiddenSize": 1024,
        "numKeyValueHeads": 8,
        "supportsTensor": False,
        "family": "qwen",
        "quantization": "4bit",
        "baseModel": "Qwen3 0.6B",
        "capabilities": ["text", "thinking", "thinking_toggle"],
        "contextLength": 32768,
        "storageBytes": 342884352,
    },
}

_GENERIC_CARD: JSON = {
    "nLayers": 24,
    "hiddenSize": 2048,
    "numKeyValueHeads": 8,
    "supportsTensor": False,
    "family": "",
    "quantization": "",
    "baseModel": "",
    "capabilities": ["text"],
    "contextLength": 8192,
    "storageBytes": 1 << 30,
}


def random_node_id() -> str:
    """A node id as upstream makes them: 16 random bytes in hex, leading zeros stripped."""
    return secrets.token_hex(16).lstrip("0") or "1"


def _card_facts(model_id: str) -> JSON:
    return CATALOGUE.get(model_id, _GENERIC_CARD)


def model_card(model_id: str) -> JSON:
    """``ModelCard`` as it appears inside shard metadata in ``/state``."""
    facts = _card_facts(model_id)
    return {
        "modelId": model_id,
        "storageSize": {"inBytes": facts["storageBytes"]},
        "nLayers": facts["nLayers"],
        "hiddenSize": facts["hiddenSize"],
        "supportsTensor": facts["supportsTensor"],
        "numKeyValueHeads": facts["numKeyValueHeads"],
        "tasks": ["TextGeneration"],
        "components": None,
        "family": facts["family"],
        "quantization": facts["quantization"],
        "baseModel": facts["baseModel"],
        "capabilities": facts["capabilities"],
        "backends": ["MlxMetal", "MlxCuda", "MlxCpu"],
        "reasoningDialect": "none",
        "contextLength": facts["contextLength"],
        "usesCfg": False,
        "trustRemoteCode": True,
        "isCustom": False,
        "vision": None,
    }


def model_list_entry(model_id: str, created: int) -> JSON:
    """One ``ModelListModel`` of ``GET /models`` (plain pydantic: snake_case keys)."""
    facts = _card_facts(model_id)
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "exo",
        "hugging_face_id": model_id,
        "name": model_id.rsplit("/", maxsplit=1)[-1],
        "description": "",
        "context_length": facts["contextLength"],
        "tags": [],
        "storage_size_megabytes": round(facts["storageBytes"] / (1024**2)),
        "supports_tensor": facts["supportsTensor"],
        "tasks": ["TextGeneration"],
        "is_custom": False,
        "family": facts["family"],
        "quantization": facts["quantization"],
        "base_model": facts["baseModel"],
        "capabilities": facts["capabilities"],
        "reasoning_dialect": "none",
    }


@dataclass(frozen=True)
class PeerSpec:
    """Another node of the pretended cluster: ``--peer ID=ADDRESS`` (repeat the ID for more
    addresses). A ``:PORT`` after an IPv4 address or a ``[v6]`` is accepted and ignored:
    upstream's edges carry the observing node's own API port, never the peer's."""

    node_id: str
    host: str

    @classmethod
    def parse(cls, text: str) -> PeerSpec:
        node_id, sep, address = text.partition("=")
        host = address.strip()
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            host = ""
        if not sep or not node_id or not host:
            raise ValueError(f"--peer {text!r}: expected ID=ADDRESS, e.g. abc123=10.0.0.2")
        return cls(node_id=node_id, host=host)

    @property
    def ipv4(self) -> bool:
        return ":" not in self.host


def _multiaddr_json(address: str, host: str, port: int) -> JSON:
    # Multiaddr is a plain BaseModel with computed fields: snake_case keys.
    return {
        "address": address,
        "address_type": address.split("/")[1],
        "ip_address": host,
        "port": port,
    }


def _tagged(name: str, body: JSON) -> JSON:
    return {name: body}


# Upstream's runner states (src/exo/shared/types/worker/runners.py), in lifecycle order.
RUNNER_STATES = (
    "RunnerIdle",
    "RunnerConnecting",
    "RunnerConnected",
    "RunnerLoading",
    "RunnerLoaded",
    "RunnerWarmingUp",
    "RunnerReady",
    "RunnerRunning",
    "RunnerShuttingDown",
    "RunnerShutdown",
    "RunnerFailed",
)
# Upstream's Backend enum (src/exo/shared/types/backends.py).
BACKENDS = ("MlxMetal", "MlxCpu", "MlxCuda", "Vllm")
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class DownloadSpec:
    """``--download MODEL=PERCENT``: this node fetching a model, ``100`` when done."""

    model_id: str
    percent: float

    @classmethod
    def parse(cls, text: str) -> DownloadSpec:
        model_id, sep, percent = text.rpartition("=")
        try:
            value = float(percent)
        except ValueError:
            value = -1.0
        if not sep or not model_id or not 0 <= value <= 100:
            raise ValueError(f"--download {text!r}: expected MODEL=PERCENT, PERCENT 0 to 100")
        return cls(model_id=model_id, percent=value)


def _runner_body(status: str, n_layers: int) -> JSON:
    """The fields of each runner state (src/exo/shared/types/worker/runners.py)."""
    if status == "RunnerReady":
        return {"prefillServerPort": None}
    if status == "RunnerLoading":
        return {"layersLoaded": n_layers // 2, "totalLayers": n_layers}
    if status == "RunnerFailed":
        return {"errorMessage": "runner process exited", "diagnostics": []}
    return {}


@dataclass
class Placed:
    """One instance: given with ``--instance`` (ready from the start) or placed over the API."""

    instance_id: str
    model_id: str
    nodes: list[str]
    runner_ids: dict[str, str]
    index: int
    created: float
    ready_at: float | None
    """When its runners report ``RunnerReady``; ``None``: not known yet."""
    static: bool = False
    """Given with ``--instance``: its runners are in ``--runner-status`` throughout."""


@dataclass
class Download:
    """One node's download of one model (upstream's ``DownloadProgress`` variants)."""

    node_id: str
    model_id: str
    started: float
    fails: bool = False


@dataclass
class ModelFaults:
    """How downloads and placements go (double-only flags)."""

    download_s: float = 2.0
    """Seconds a model download takes; progress advances linearly over them."""
    load_s: float = 0.3
    """Seconds from a finished download to ``RunnerReady``."""
    place_delay_s: float = 0.3
    """Seconds between ``POST /place_instance`` and the instance in the state (the master
    handles commands asynchronously)."""
    fail_download: frozenset[str] = frozenset()
    never_ready: frozenset[str] = frozenset()
    too_big: frozenset[str] = frozenset()
    hub_models: frozenset[str] = frozenset()
    """Models the (pretended) Hugging Face hub knows beyond the catalogue."""
    hub_down: bool = False


@dataclass
class Cluster:
    """What this node believes about its cluster."""

    node_id: str
    api_port: int
    peers: list[PeerSpec] = field(default_factory=list)
    instance_models: list[str] = field(default_factory=list)
    synced: bool = True
    no_worker: bool = False
    no_edges: bool = False
    started: float = field(default_factory=time.time)
    faults: ModelFaults = field(default_factory=ModelFaults)
    runner_status: str = "RunnerReady"
    downloads: list[DownloadSpec] = field(default_factory=list)
    backends: list[str] = field(default_factory=lambda: ["MlxCpu"])
    ram_total: int = 64 * GIB
    ram_available: int = 48 * GIB
    override_memory_mb: int | None = None
    """``OVERRIDE_MEMORY_MB`` of this node's environment: upstream reports it as this node's
    ``ramAvailable`` (``MemoryUsage.from_psutil`` in src/exo/shared/types/profiling.py,
    read in src/exo/utils/info_gatherer/info_gatherer.py)."""

    def __post_init__(self) -> None:
        self._event_ids = [str(uuid.uuid4()) for _ in range(self._event_count())]
        self.placed: dict[str, Placed] = {}
        self.transfers: dict[str, dict[str, Download]] = {}
        self.custom_models: list[str] = []
        self._next_index = 0
        for model_id in self.instance_models:
            self.add_instance(model_id, ready_at=self.started, static=True)

    def add_instance(
        self, model_id: str, *, ready_at: float | None, static: bool = False
    ) -> Placed | None:
        """Put an instance of ``model_id`` over the instance nodes (none: no instance)."""
        nodes = self.instance_nodes
        if not nodes:
            return None
        instance = Placed(
            instance_id=str(uuid.uuid4()),
            model_id=model_id,
            nodes=list(nodes),
            runner_ids={node: str(uuid.uuid4()) for node in nodes},
            index=self._next_index,
            created=time.time(),
            ready_at=ready_at,
            static=static,
        )
        self._next_index += 1
        self.placed[instance.instance_id] = instance
        return instance

    def live_models(self) -> list[str]:
        return list(dict.fromkeys(p.model_id for p in self.placed.values()))

    def known_to_hub(self, model_id: str) -> bool:
        return not self.faults.hub_down and (
            model_id in CATALOGUE or model_id in self.faults.hub_models
        )

    def knows(self, model_id: str) -> bool:
        """``ModelCard.load`` finds a card: catalogue, custom cards, placed, or the hub."""
        return (
            model_id in self.catalogue()
            or model_id in self.custom_models
            or self.known_to_hub(model_id)
        )

    def start_download(self, node_id: str, model_id: str) -> None:
        """A node starts downloading ``model_id`` unless it has or is getting it already."""
        current = self.transfers.setdefault(node_id, {}).get(model_id)
        if current is not None and not current.fails:
            return
        if self.download_fraction(node_id, model_id, time.time()) == 1.0:
            return  # already on this node
        self.transfers[node_id][model_id] = Download(
            node_id, model_id, time.time(), fails=model_id in self.faults.fail_download
        )

    def download_fraction(self, node_id: str, model_id: str, now: float) -> float | None:
        """0..1 of the download done; ``None``: none started, or it failed."""
        download = self.transfers.get(node_id, {}).get(model_id)
        if download is not None:
            if download.fails:
                return None
            if self.faults.download_s <= 0:
                return 1.0
            return min(1.0, (now - download.started) / self.faults.download_s)
        if node_id == self.node_id:
            for spec in self.downloads:
                if spec.model_id == model_id:
                    return spec.percent / 100
        if model_id in self.instance_models and node_id in self.instance_nodes:
            return 1.0
        return None

    def placement_error(self, model_id: str, min_nodes: int) -> str | None:
        """Why placement fails, in upstream's words (src/exo/master/placement.py)."""
        if model_id in self.faults.too_big:
            return "No cycles found with sufficient memory"
        if min_nodes > len(self.instance_nodes):
            return "No cycles found with sufficient memory"
        return None

    @property
    def all_nodes(self) -> list[str]:
        return [self.node_id, *self.peer_ids()]

    @property
    def instance_nodes(self) -> list[str]:
        """Nodes that run shards: a ``--no-worker`` node runs none."""
        nodes = self.peer_ids()
        return nodes if self.no_worker and nodes else ([] if self.no_worker else self.all_nodes)

    def _event_count(self) -> int:
        return len(self.peers) + len(self.instance_models) + len(self.all_nodes)  # at most

    def catalogue(self) -> list[str]:
        models = list(CATALOGUE)
        models.extend(m for m in self.instance_models if m not in models)
        models.extend(m for m in self.custom_models if m not in models)
        return models

    def has_instance(self, model_id: str) -> bool:
        return self.synced and model_id in self.live_models()

    def peer_ids(self) -> list[str]:
        return list(dict.fromkeys(peer.node_id for peer in self.peers))

    def addresses_of(self, node: str) -> list[str]:
        return [peer.host for peer in self.peers if peer.node_id == node]

    def _edges(self) -> list[tuple[str, str, JSON]]:
        """Socket edges as upstream's worker makes them (``Worker._poll_connection_updates``
        in src/exo/worker/main.py): one per peer address that answered ``GET
        http://ADDRESS:API_PORT/node_id`` with the peer's id (``check_reachable`` in
        src/exo/utils/info_gatherer/net_profile.py), where API_PORT is the *observing*
        node's own ``--api-port``. Upstream's API binds ``0.0.0.0`` only (``API.run_api``
        in src/exo/api/main.py), so a probe of an IPv6 address never answers: edges go to
        IPv4 addresses only. ``--no-edges``: no probe has passed yet."""
        if self.no_edges:
            return []
        edges: list[tuple[str, str, JSON]] = []
        for peer in self.peers:
            if not peer.ipv4:
                continue
            address = f"/ip4/{peer.host}/tcp/{self.api_port}"
            sink = _multiaddr_json(address, peer.host, self.api_port)
            edges.append((self.node_id, peer.node_id, {"sinkMultiaddr": sink}))
        return edges

    def topology(self) -> JSON:
        if not self.synced:
            return {"nodes": [], "connections": {}}
        connections: dict[str, dict[str, list[JSON]]] = {}
        for source, sink, edge in self._edges():
            connections.setdefault(source, {}).setdefault(sink, []).append(edge)
        return {"nodes": self.all_nodes, "connections": connections}

    def shard(self, model_id: str, nodes: list[str], rank: int) -> JSON:
        """``PipelineShardMetadata`` of rank ``rank`` over ``nodes`` (tagged, camelCase)."""
        card = model_card(model_id)
        n_layers = int(card["nLayers"])
        per_node = max(1, n_layers // len(nodes))
        start = min(rank * per_node, n_layers)
        end = n_layers if rank == len(nodes) - 1 else min(start + per_node, n_layers)
        return _tagged(
            "PipelineShardMetadata",
            {
                "modelCard": card,
                "deviceRank": rank,
                "worldSize": len(nodes),
                "immediateException": False,
                "shouldTimeout": None,
                "startLayer": start,
                "endLayer": end,
                "nLayers": n_layers,
            },
        )

    def instance_json(
        self,
        model_id: str,
        nodes: list[str],
        runner_ids: dict[str, str],
        instance_id: str,
        index: int,
    ) -> JSON:
        """``MlxRingInstance`` as ``/state`` and ``GET /instance/{id}`` serialise it."""
        runner_to_shard: JSON = {}
        node_to_runner: JSON = {}
        for rank, node in enumerate(nodes):
            runner_to_shard[runner_ids[node]] = self.shard(model_id, nodes, rank)
            node_to_runner[node] = runner_ids[node]
        hosts = {node: [{"ip": self._host_of(node), "port": 50000 + index}] for node in nodes}
        return _tagged(
            "MlxRingInstance",
            {
                "instanceId": instance_id,
                "shardAssignments": {
                    "modelId": model_id,
                    "runnerToShard": runner_to_shard,
                    "nodeToRunner": node_to_runner,
                },
                "hostsByNode": hosts,
                "ephemeralPort": 50000 + index,
            },
        )

    def preview(self, model_id: str) -> JSON:
        """What ``GET /instance/placement`` answers: an instance not in the state."""
        nodes = self.instance_nodes
        runner_ids = {node: str(uuid.uuid4()) for node in nodes}
        return self.instance_json(model_id, nodes, runner_ids, str(uuid.uuid4()), self._next_index)

    def instances(self) -> JSON:
        if not self.synced:
            return {}
        return {
            p.instance_id: self.instance_json(
                p.model_id, p.nodes, p.runner_ids, p.instance_id, p.index
            )
            for p in self.placed.values()
        }

    def _host_of(self, node: str) -> str:
        """The address a node's ring uses: its first IPv4 address."""
        addresses = self.addresses_of(node) if node != self.node_id else ["127.0.0.1"]
        return next((a for a in addresses if ":" not in a), addresses[0])

    def _interfaces(self, node: str) -> list[JSON]:
        """``NodeNetworkInfo.interfaces``: one entry per address, IPv4 and IPv6 alike, as
        upstream's ``get_network_interfaces`` (src/exo/utils/info_gatherer/system_info.py)
        lists every AF_INET and AF_INET6 address psutil reports."""
        addresses = self.addresses_of(node) if node != self.node_id else ["127.0.0.1"]
        return [
            {"name": "eth0", "ipAddress": address, "interfaceType": "ethernet"}
            for address in addresses
        ]

    def _runner_status(self, placed: Placed, node: str, now: float) -> JSON:
        """Upstream's runner states (src/exo/shared/types/worker/runners.py) over time:
        idle while the node downloads its shard, loading, then ready."""
        n_layers = int(model_card(placed.model_id)["nLayers"])
        if placed.static:
            return _tagged(self.runner_status, _runner_body(self.runner_status, n_layers))
        if placed.ready_at is not None and now >= placed.ready_at:
            return _tagged("RunnerReady", {"prefillServerPort": None})
        fraction = self.download_fraction(node, placed.model_id, now)
        if fraction is None or fraction < 1.0:
            return _tagged("RunnerIdle", {})
        return _tagged("RunnerLoading", {"layersLoaded": 0, "totalLayers": n_layers})

    def tick(self, now: float) -> None:
        """Advance placed instances: ready once every node's download is done (+ load time)."""
        for placed in self.placed.values():
            if placed.ready_at is not None or placed.model_id in self.faults.never_ready:
                continue
            fractions = [self.download_fraction(n, placed.model_id, now) for n in placed.nodes]
            if all(f is not None and f >= 1.0 for f in fractions):
                done = max(
                    (
                        self.transfers[n][placed.model_id].started + self.faults.download_s
                        for n in placed.nodes
                        if placed.model_id in self.transfers.get(n, {})
                    ),
                    default=placed.created,
                )
                placed.ready_at = max(done, placed.created) + self.faults.load_s

    def runners(self) -> JSON:
        if not self.synced:
            return {}
        now = time.time()
        self.tick(now)
        return {
            placed.runner_ids[node]: self._runner_status(placed, node, now)
            for placed in self.placed.values()
            for node in placed.nodes
        }

    def _shard(self, model_id: str) -> JSON:
        card = model_card(model_id)
        n_layers = int(card["nLayers"])
        return _tagged(
            "PipelineShardMetadata",
            {
                "modelCard": card,
                "deviceRank": 0,
                "worldSize": 1,
                "immediateException": False,
                "shouldTimeout": None,
                "startLayer": 0,
                "endLayer": n_layers,
                "nLayers": n_layers,
            },
        )

    def _download(
        self, node: str, model_id: str, fraction: float, *, failed: bool = False, fixed: bool
    ) -> JSON:
        """One ``DownloadProgress`` (src/exo/shared/types/worker/downloads.py; FrozenModel:
        camelCase): pending at 0, ongoing, completed at 1, or failed. A ``fixed`` one
        (``--download``) reports 50 MiB/s; one that advances, the rate it advances at."""
        total = int(_card_facts(model_id)["storageBytes"])
        base: JSON = {
            "nodeId": node,
            "shardMetadata": self._shard(model_id),
            "modelDirectory": f"/var/lib/exo/models/{model_id.replace('/', '--')}",
        }
        if failed:
            message = f"double: download of {model_id} failed"
            return _tagged("DownloadFailed", {**base, "errorMessage": message})
        if fraction >= 1.0:
            return _tagged("DownloadCompleted", {**base, "total": {"inBytes": total}})
        if fraction <= 0:
            return _tagged(
                "DownloadPending",
                {**base, "downloaded": {"inBytes": 0}, "total": {"inBytes": total}},
            )
        done = int(total * fraction)
        advancing = not fixed and self.faults.download_s > 0
        speed = total / self.faults.download_s if advancing else 50.0 * MIB
        progress = {
            "total": {"inBytes": total},
            "downloaded": {"inBytes": done},
            "downloadedThisSession": {"inBytes": done},
            "completedFiles": 1,
            "totalFiles": 3,
            "speed": speed,
            "etaMs": int((total - done) / speed * 1000),
            "files": {},
        }
        return _tagged("DownloadOngoing", {**base, "downloadProgress": progress})

    def downloads_doc(self) -> JSON:
        """``State.downloads``: per node, its downloads. A node running a ``--instance`` has
        the model's download completed; ``--download`` adds this node's own, fixed; downloads
        started over the API (placement, ``/download/start``) advance with time."""
        if not self.synced:
            return {}
        now = time.time()
        result: dict[str, list[JSON]] = {}
        for node in self.all_nodes:
            for model_id in self._downloading(node):
                transfer = self.transfers.get(node, {}).get(model_id)
                fraction = self.download_fraction(node, model_id, now) or 0.0
                failed = transfer is not None and transfer.fails
                result.setdefault(node, []).append(
                    self._download(node, model_id, fraction, failed=failed, fixed=transfer is None)
                )
        return result

    def _downloading(self, node: str) -> list[str]:
        models: list[str] = []
        if node in self.instance_nodes:
            models += self.instance_models
        if node == self.node_id:
            models += [spec.model_id for spec in self.downloads]
        models += list(self.transfers.get(node, {}))
        return list(dict.fromkeys(models))

    def _memory(self, node: str) -> JSON:
        available = self.ram_available
        if node == self.node_id and self.override_memory_mb is not None:
            available = self.override_memory_mb * MIB
        return {
            "ramTotal": {"inBytes": self.ram_total},
            "ramAvailable": {"inBytes": available},
            "swapTotal": {"inBytes": 0},
            "swapAvailable": {"inBytes": 0},
        }

    def state(self) -> JSON:
        """``GET /state``: upstream's ``State`` with every top-level key it has."""
        if self.synced:
            seen = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
            nodes = self.all_nodes
        else:
            seen = ""
            nodes = []
        gib = GIB
        return {
            "instances": self.instances(),
            "runners": self.runners(),
            "downloads": self.downloads_doc(),
            "tasks": {},
            "lastSeen": {node: seen for node in nodes},
            "topology": self.topology(),
            "lastEventAppliedIdx": len(self.events()) - 1,
            "nodeIdentities": {
                node: {
                    "modelId": "Unknown",
                    "chipId": "Unknown",
                    "friendlyName": f"double-{node[:8]}",
                    "osVersion": "Linux",
                    "osBuildVersion": "Unknown",
                }
                for node in nodes
            },
            "nodeMemory": {node: self._memory(node) for node in nodes},
            "nodeDisk": {
                node: {"total": {"inBytes": 512 * gib}, "available": {"inBytes": 256 * gib}}
                for node in nodes
            },
            "nodeSystem": {
                node: {
                    "gpuUsage": 0.0,
                    "temp": 0.0,
                    "sysPower": 0.0,
                    "pcpuUsage": 0.0,
                    "ecpuUsage": 0.0,
                }
                for node in nodes
            },
            "nodeNetwork": {node: {"interfaces": self._interfaces(node)} for node in nodes},
            "nodeThunderbolt": {},
            "nodeThunderboltBridge": {},
            "nodeRdmaCtl": {},
            "nodeBackends": {node: list(self.backends) for node in nodes},
            "thunderboltBridgeCycles": [],
            "instanceLinks": {},
            "prefillServerPorts": {},
            "customModelCards": {m: model_card(m) for m in self.custom_models},
        }

    def _ids(self) -> Iterator[str]:
        """Stable event ids, one more for every event that appears later (placements)."""
        index = 0
        while True:
            if index == len(self._event_ids):
                self._event_ids.append(str(uuid.uuid4()))
            yield self._event_ids[index]
            index += 1

    def events(self) -> list[JSON]:
        """``GET /events``: the API's event log as one JSON array of tagged events."""
        if not self.synced:
            return []
        ids = self._ids()
        events: list[JSON] = []
        for node in self.all_nodes:
            events.append(
                _tagged(
                    "NodeGatheredInfo",
                    {
                        "eventId": next(ids),
                        "nodeId": node,
                        "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.started)),
                        "info": {},
                    },
                )
            )
        for source, sink, edge in self._edges():
            events.append(
                _tagged(
                    "TopologyEdgeCreated",
                    {
                        "eventId": next(ids),
                        "conn": {"source": source, "sink": sink, "edge": edge},
                    },
                )
            )
        for instance in self.instances().values():
            events.append(_tagged("InstanceCreated", {"eventId": next(ids), "instance": instance}))
        return events
