"""What one probe of a node found, seen from that node: peers, instances, problems.

:func:`summarize` reads a validated :class:`~exo_nixos.exoapi.state.State` from one node's
point of view (its edges are the peers' API addresses it reached); :class:`NodeView` is the
result of :func:`exo_nixos.exoapi.client.probe`, used by ``health``, ``status``, the
supervisor and the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from exo_nixos.addresses import url_for
from exo_nixos.exoapi.state import State, parse_state_doc


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
class StateSummary:
    """The parts of ``/state`` this project uses, seen from one node; ``state`` is all of it."""

    peers: tuple[Peer, ...]
    instances: tuple[Instance, ...]
    synced: bool
    state: State = field(default_factory=State, compare=False, repr=False)


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _peers(state: State, node_id: str) -> tuple[Peer, ...]:
    peers: list[Peer] = []
    edges = state.topology.connections.get(node_id, {})
    for peer_id in state.node_ids():
        if peer_id == node_id:
            continue
        addresses: list[str] = []
        urls: list[str] = []
        for edge in edges.get(peer_id, []):
            endpoint = edge.sink_multiaddr.endpoint if edge.sink_multiaddr else None
            if endpoint is None:
                continue
            host, port = endpoint
            addresses.append(host)
            if port is not None:
                urls.append(url_for(host, port))
        network = state.node_network.get(peer_id)
        if network is not None:
            addresses.extend(i.ip_address for i in network.interfaces if i.ip_address)
        identity = state.node_identities.get(peer_id)
        peers.append(
            Peer(
                node_id=peer_id,
                addresses=_unique(addresses),
                api_urls=_unique(urls),
                friendly_name=identity.friendly_name if identity else None,
                last_seen=state.last_seen.get(peer_id),
            )
        )
    return tuple(peers)


def _instances(state: State) -> tuple[Instance, ...]:
    instances: list[Instance] = []
    for key, placed in state.instances.items():
        status: list[tuple[str, str]] = []
        for node in placed.node_ids:
            runner = state.runner_of(node, placed)
            if runner is not None and runner.tag:
                status.append((node, runner.tag))
        instances.append(
            Instance(
                instance_id=placed.instance_id or key,
                model_id=placed.model_id,
                node_ids=placed.node_ids,
                kind=placed.tag,
                runner_status=tuple(status),
            )
        )
    return tuple(instances)


def summarize(state: State, node_id: str) -> StateSummary:
    """Peers, instances and sync of ``state`` as node ``node_id`` sees them."""
    return StateSummary(
        peers=_peers(state, node_id),
        instances=_instances(state),
        synced=state.synced,
        state=state,
    )


def parse_state(doc: Any, node_id: str) -> StateSummary:
    """Read peers, instances and sync from a ``/state`` document, seen from ``node_id``.

    Missing keys read as empty; unknown keys are ignored; a known key of the wrong type
    raises ExoApiError(kind="shape") naming it.
    """
    return summarize(parse_state_doc(doc), node_id)


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
    state: State | None = field(default=None, compare=False, repr=False)
    """The whole validated ``/state``, when it answered."""

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
