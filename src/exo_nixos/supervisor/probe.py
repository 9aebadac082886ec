"""The supervisor's view of a node, taken with the shared node API client."""

from __future__ import annotations

from exo_nixos.supervisor.snapshot import Topology


async def probe_topology(base_url: str, seconds: float) -> Topology:
    """Probe EXO's API once; raise ``exo_nixos.exoapi.ExoApiError`` when it does not answer."""
    from exo_nixos.exoapi import probe

    view = await probe(base_url, seconds)
    return Topology(
        node_id=view.node_id,
        master_id=view.master_id,
        is_master=view.is_master,
        peers={p.node_id: list(p.addresses) for p in view.peers},
        instances=len(view.instances),
    )
