"""URLs of a node's API: parsing what a user gives, building one from an address."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from exo_nixos.addresses import local_api_url
from exo_nixos.basetypes import EXO_API_PORT
from exo_nixos.exoapi.errors import ExoApiError

DEFAULT_URL = local_api_url(EXO_API_PORT)


def normalize_url(base_url: str) -> str:
    """``HOST:PORT`` or ``http://HOST:PORT/`` -> ``http://HOST:PORT``; reject other schemes."""
    text = base_url.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        valid = (
            parts.scheme in {"http", "https"}
            and bool(parts.hostname)
            and not any(c.isspace() for c in text)
        )
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        valid = False
    if not valid:
        raise ExoApiError(f"invalid URL {base_url!r}: expected http://HOST:PORT", kind="url")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")).rstrip("/")


def short_id(node_id: str) -> str:
    """A node id cut to its first 12 characters, for one-line displays."""
    return node_id if len(node_id) <= 12 else node_id[:12] + "…"
