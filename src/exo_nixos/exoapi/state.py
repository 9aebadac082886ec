"""Upstream exo's ``GET /state`` document, read with small pydantic models.

The shapes follow upstream at the pinned commit: ``State`` in src/exo/shared/types/state.py,
its parts in src/exo/shared/types/{profiling,memory,topology,multiaddr}.py and
src/exo/shared/types/worker/{instances,runners,shards,downloads}.py. Upstream answers with
``State`` dumped by alias: camelCase keys, tagged unions as ``{"ClassName": {...}}``,
``Memory`` as ``{"inBytes": N}``; ``Multiaddr`` is a plain ``BaseModel`` and keeps
snake_case. Every field here accepts both spellings.

Only what this project reads is modelled (status, the exporter, the model reconciler).
Unknown keys are ignored and missing ones take defaults, so that upstream additions do not
break a reader; a known key of the wrong type is an :class:`ExoApiError` (``kind="shape"``)
naming it. Edges of kinds this project does not know (RDMA, anything new) are kept empty and
skipped by the readers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import (
    AliasChoices,
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from exo_nixos.addresses import multiaddr
from exo_nixos.exoapi.errors import ExoApiError

__all__ = [
    "DiskUsage",
    "DownloadProgress",
    "DownloadProgressData",
    "Edge",
    "Instance",
    "Memory",
    "MemoryUsage",
    "ModelCard",
    "Multiaddr",
    "NetworkInterface",
    "NodeIdentity",
    "NodeNetwork",
    "RunnerStatus",
    "ShardAssignments",
    "ShardMetadata",
    "State",
    "SystemProfile",
    "Topology",
    "parse_state_doc",
]


def _both_spellings(name: str) -> AliasChoices:
    return AliasChoices(to_camel(name), name)


class _Doc(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        strict=True,  # as upstream's FrozenModel: no "5" for 5, no true for 1
        alias_generator=AliasGenerator(validation_alias=_both_spellings),
        validate_by_name=True,
    )


def _untag(value: Any) -> Any:
    """``{"ClassName": {...}}`` -> ``{..., "tag": "ClassName"}``; other values unchanged.

    Tags are class names (Capitalised); field names are camelCase, so a one-key object
    whose key is lower-case is a plain object, not a tagged one.
    """
    if isinstance(value, Mapping) and len(value) == 1:
        ((tag, body),) = value.items()
        if isinstance(body, Mapping) and str(tag)[:1].isupper():
            return {**body, "tag": str(tag)}
    return value


class _Tagged(_Doc):
    tag: str = ""
    """Upstream's class name, e.g. ``MlxRingInstance``, ``RunnerReady``; ``""`` untagged."""

    @model_validator(mode="before")
    @classmethod
    def _untag(cls, value: Any) -> Any:
        return _untag(value)


class Memory(_Doc):
    in_bytes: int = 0


class MemoryUsage(_Doc):
    ram_total: Memory = Memory()
    ram_available: Memory = Memory()
    swap_total: Memory = Memory()
    swap_available: Memory = Memory()

    @property
    def ram_used_bytes(self) -> int:
        return max(0, self.ram_total.in_bytes - self.ram_available.in_bytes)


class DiskUsage(_Doc):
    total: Memory = Memory()
    available: Memory = Memory()


class NodeIdentity(_Doc):
    model_id: str | None = None
    chip_id: str | None = None
    """Upstream fills it on macOS only (the Apple chip); elsewhere ``Unknown Chip``."""
    friendly_name: str | None = None
    os_version: str | None = None


class NetworkInterface(_Doc):
    name: str = ""
    ip_address: str = ""
    interface_type: str = "unknown"


class NodeNetwork(_Doc):
    interfaces: list[NetworkInterface] = []


class SystemProfile(_Doc):
    gpu_usage: float = 0.0
    temp: float = 0.0
    sys_power: float = 0.0
    pcpu_usage: float = 0.0
    ecpu_usage: float = 0.0


class Multiaddr(_Doc):
    address: str = ""
    ip_address: str | None = None
    port: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return {"address": value} if isinstance(value, str) else value

    @property
    def endpoint(self) -> tuple[str, int | None] | None:
        """``(host, port)`` from the address, else from the computed fields upstream adds."""
        if found := multiaddr(self.address):
            return found[1], found[2]
        if self.ip_address:
            return self.ip_address, self.port
        return None


class Edge(_Doc):
    """``SocketConnection`` (``sinkMultiaddr``) or ``RDMAConnection`` (interface names)."""

    sink_multiaddr: Multiaddr | None = None
    source_rdma_iface: str | None = None
    sink_rdma_iface: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _unknown_kinds_are_empty(cls, value: Any) -> Any:
        return value if isinstance(value, Mapping) else {}


class Topology(_Doc):
    """``TopologySnapshot``: nodes, and edges by source then sink."""

    nodes: list[str] = []
    connections: dict[str, dict[str, list[Edge]]] = {}


class ModelCard(_Doc):
    model_id: str = ""
    storage_size: Memory = Memory()
    n_layers: int = 0


class ShardMetadata(_Tagged):
    """``PipelineShardMetadata``, ``TensorShardMetadata`` or ``CfgShardMetadata``."""

    model_card: ModelCard = ModelCard()
    device_rank: int = 0
    world_size: int = 1
    start_layer: int = 0
    end_layer: int = 0
    n_layers: int = 0

    @property
    def sharding(self) -> str:
        """``Pipeline``, ``Tensor``, ``Cfg`` (upstream's ``Sharding`` plus CFG), or ``""``."""
        return self.tag.removesuffix("ShardMetadata")


class ShardAssignments(_Doc):
    model_id: str = ""
    runner_to_shard: dict[str, ShardMetadata] = {}
    node_to_runner: dict[str, str] = {}


class Instance(_Tagged):
    """``MlxRingInstance`` or ``MlxJacclInstance``."""

    instance_id: str = ""
    shard_assignments: ShardAssignments = ShardAssignments()

    @property
    def model_id(self) -> str:
        return self.shard_assignments.model_id

    @property
    def meta(self) -> str:
        """Upstream's ``InstanceMeta``: ``MlxRing``, ``MlxJaccl``; ``""`` when untagged."""
        return self.tag.removesuffix("Instance")

    @property
    def sharding(self) -> str:
        """The shards' kind (``Pipeline``, ``Tensor``): one per instance upstream."""
        kinds = {s.sharding for s in self.shard_assignments.runner_to_shard.values()}
        return kinds.pop() if len(kinds) == 1 else ""

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(self.shard_assignments.node_to_runner)


class RunnerStatus(_Tagged):
    """``RunnerIdle`` ... ``RunnerReady``, ``RunnerRunning``, ``RunnerFailed``."""

    layers_loaded: int = 0
    total_layers: int = 0
    error_message: str | None = None

    @property
    def name(self) -> str:
        """The status without its ``Runner`` prefix: ``Ready``, ``Loading``, ``Failed``."""
        return self.tag.removeprefix("Runner")


class DownloadProgressData(_Doc):
    total: Memory = Memory()
    downloaded: Memory = Memory()
    completed_files: int = 0
    total_files: int = 0
    speed: float = 0.0
    """Bytes per second."""
    eta_ms: int = 0


class DownloadProgress(_Tagged):
    """``DownloadPending``, ``DownloadOngoing``, ``DownloadCompleted`` or ``DownloadFailed``."""

    node_id: str = ""
    shard_metadata: ShardMetadata = ShardMetadata()
    total: Memory = Memory()
    downloaded: Memory = Memory()
    error_message: str | None = None
    download_progress: DownloadProgressData | None = None

    @property
    def status(self) -> str:
        """``Pending``, ``Ongoing``, ``Completed``, ``Failed`` (the tag without ``Download``)."""
        return self.tag.removeprefix("Download")

    @property
    def model_id(self) -> str:
        return self.shard_metadata.model_card.model_id

    @property
    def total_bytes(self) -> int:
        if self.download_progress is not None:
            return self.download_progress.total.in_bytes
        return self.total.in_bytes

    @property
    def downloaded_bytes(self) -> int:
        if self.status == "Completed":
            return self.total_bytes
        if self.download_progress is not None:
            return self.download_progress.downloaded.in_bytes
        return self.downloaded.in_bytes

    @property
    def fraction(self) -> float:
        """Done, from 0 to 1 (a completed download is 1 even where its total is unknown)."""
        if self.status == "Completed":
            return 1.0
        total = self.total_bytes
        return min(1.0, self.downloaded_bytes / total) if total > 0 else 0.0


class State(_Doc):
    """The parts of upstream's ``State`` this project reads."""

    instances: dict[str, Instance] = {}
    runners: dict[str, RunnerStatus] = {}
    downloads: dict[str, list[DownloadProgress]] = {}
    last_seen: dict[str, str] = {}
    topology: Topology = Topology()
    last_event_applied_idx: int = Field(default=-1)
    node_identities: dict[str, NodeIdentity] = {}
    node_memory: dict[str, MemoryUsage] = {}
    node_disk: dict[str, DiskUsage] = {}
    node_system: dict[str, SystemProfile] = {}
    node_network: dict[str, NodeNetwork] = {}
    node_backends: dict[str, list[str]] = {}
    """Upstream's ``Backend`` names per node: ``MlxCuda``, ``MlxMetal``, ``MlxCpu``, ``Vllm``."""

    @field_validator("last_event_applied_idx", mode="before")
    @classmethod
    def _not_an_index_is_unsynced(cls, value: Any) -> Any:
        # Anything but an integer (a bool included) reads as "no event applied yet".
        return value if type(value) is int else -1

    @property
    def synced(self) -> bool:
        """The node has applied events from a master (``lastEventAppliedIdx >= 0``)."""
        return self.last_event_applied_idx >= 0

    def node_ids(self) -> tuple[str, ...]:
        """Every node the topology names, in its order, then the ends of its edges."""
        order = list(self.topology.nodes)
        for source, sinks in self.topology.connections.items():
            for sink in sinks:
                order.extend([source, sink])
        return tuple(dict.fromkeys(order))

    def runner_of(self, node_id: str, instance: Instance) -> RunnerStatus | None:
        runner_id = instance.shard_assignments.node_to_runner.get(node_id)
        return self.runners.get(runner_id) if runner_id is not None else None


_EXPECTED = {
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
}


def _where(loc: tuple[int | str, ...]) -> str:
    parts = [
        p if isinstance(p, str) and p.replace("_", "a").isalnum() else json.dumps(p) for p in loc
    ]
    text = ".".join(parts)
    return text if len(text) <= 120 else text[:117] + "..."


def _shape(message: str) -> ExoApiError:
    return ExoApiError(f"unexpected /state shape: {message}", kind="shape")


def parse_state_doc(doc: Any) -> State:
    """Validate a ``/state`` document; a wrong shape raises ExoApiError naming the field."""
    if not isinstance(doc, Mapping):
        raise _shape(f"the document is {type(doc).__name__}, expected an object")
    try:
        return State.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        expected = _EXPECTED.get(first["type"], " ".join(str(first["msg"]).split()).lower())
        found = type(first.get("input")).__name__
        raise _shape(f"{_where(first['loc'])} is {found}, expected {expected}") from None
