"""The master hint: who exo's log says is master, handed from the supervisor to the others.

The supervisor reads exo's log (:mod:`exo_nixos.exoapi.logs`) and writes the result into
the runtime directory; ``health``, ``status`` and the exporter read it there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from exo_nixos import jsonio
from exo_nixos.fsutil import atomic_write

MASTER_HINT_FILE = "master.json"


def write_master_hint(directory: str | Path, node_id: str, master_id: str) -> None:
    """Record who node ``node_id`` says is master, for readers of ``read_master_hint``."""
    doc = {"nodeId": node_id, "masterId": master_id, "updated": time.time()}
    atomic_write(Path(directory) / MASTER_HINT_FILE, json.dumps(doc) + "\n")


def read_master_hint(directory: str | Path, node_id: str) -> str | None:
    """The master recorded for ``node_id``; ``None`` if absent, unreadable or for another id.

    exo draws a new node id at every start, so a hint left by an earlier run never matches.
    """
    try:
        doc = jsonio.loads((Path(directory) / MASTER_HINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("nodeId") != node_id:
        return None
    master = doc.get("masterId")
    return master if isinstance(master, str) and master else None
