"""Client for EXO nodes' HTTP API, and what exo says only in its log.

Used by ``exo-nixos health`` and ``status``, the exporter, the supervisor and the gateway.
One concern per module:

- :mod:`~exo_nixos.exoapi.client`: HTTP requests and :func:`probe` (``/node_id``,
  ``/state``, ``/models``);
- :mod:`~exo_nixos.exoapi.state`: upstream's ``/state`` document as pydantic models;
- :mod:`~exo_nixos.exoapi.view`: what one probe found, seen from that node (:class:`NodeView`);
- :mod:`~exo_nixos.exoapi.sync`: running the async client from synchronous code;
- :mod:`~exo_nixos.exoapi.logs`: exo's election lines (exo's API does not say who is master);
- :mod:`~exo_nixos.exoapi.hint`: the master hint the supervisor hands to the other readers;
- :mod:`~exo_nixos.exoapi.urls`: API URLs.

The names below are the public interface; import them from ``exo_nixos.exoapi``.
"""

from exo_nixos.addresses import url_for
from exo_nixos.exoapi.client import get_json, probe, probe_sync, request_json
from exo_nixos.exoapi.errors import ExoApiError
from exo_nixos.exoapi.hint import MASTER_HINT_FILE, read_master_hint, write_master_hint
from exo_nixos.exoapi.logs import LogEvent, parse_log_line
from exo_nixos.exoapi.state import State, parse_state_doc
from exo_nixos.exoapi.sync import run_coroutine
from exo_nixos.exoapi.urls import DEFAULT_URL, normalize_url, short_id
from exo_nixos.exoapi.view import (
    Instance,
    NodeView,
    Peer,
    StateSummary,
    parse_state,
    summarize,
)

__all__ = [
    "DEFAULT_URL",
    "MASTER_HINT_FILE",
    "ExoApiError",
    "Instance",
    "LogEvent",
    "NodeView",
    "Peer",
    "State",
    "StateSummary",
    "get_json",
    "normalize_url",
    "parse_log_line",
    "parse_state",
    "parse_state_doc",
    "probe",
    "probe_sync",
    "read_master_hint",
    "request_json",
    "run_coroutine",
    "short_id",
    "summarize",
    "url_for",
    "write_master_hint",
]
