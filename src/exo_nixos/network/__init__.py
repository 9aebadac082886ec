"""Network inspection, the cluster interface choice and the netlink link watcher.

``inspect`` and ``choose_cluster_interface`` read sysfs/procfs only; ``LinkWatcher`` imports
pyroute2 when it starts.
"""

from exo_nixos.network.choose import InterfaceChoice, choose_cluster_interface
from exo_nixos.network.model import (
    Bond,
    BondSlave,
    Interface,
    IPv6Address,
    NetInventory,
    RdmaDevice,
    RdmaPort,
    Thunderbolt,
)
from exo_nixos.network.sysfs import inspect
from exo_nixos.network.watch import (
    LinkEvent,
    LinkHealth,
    LinkMonitor,
    LinkState,
    LinkWatcher,
    link_health,
)

__all__ = [
    "Bond",
    "BondSlave",
    "IPv6Address",
    "Interface",
    "InterfaceChoice",
    "LinkEvent",
    "LinkHealth",
    "LinkMonitor",
    "LinkState",
    "LinkWatcher",
    "NetInventory",
    "RdmaDevice",
    "RdmaPort",
    "Thunderbolt",
    "choose_cluster_interface",
    "inspect",
    "link_health",
]
