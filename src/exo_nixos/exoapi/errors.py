"""The one error type of the node API client."""

from __future__ import annotations

from exo_nixos.errors import UserError


class ExoApiError(UserError):
    """The node's API gave no usable answer. The message is one line.

    ``kind`` is one of ``refused``, ``unreachable``, ``timeout``, ``http``, ``shape``,
    ``broken``, ``url``; ``status`` is the HTTP status for ``http``.
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
