"""``exo-nixos net --capture``: copy what the network readers read into a tree."""

from __future__ import annotations

from pathlib import Path

from exo_nixos.hosttree import recording, write_capture
from exo_nixos.network.model import NetInventory
from exo_nixos.network.sysfs import inspect


def capture(dest: Path, root: Path = Path("/")) -> tuple[NetInventory, int]:
    """Copy what ``inspect(root)`` reads into ``dest``, so ``inspect(dest)`` sees the same.
    Returns the inventory and the number of entries written."""
    with recording() as record:
        inventory = inspect(root)
    return inventory, write_capture(record, Path(root), dest)
