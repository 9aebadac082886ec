"""exo's log: the only place it names the master.

exo's HTTP API does not say which node is master; exo logs its elections. The supervisor
reads those lines with :func:`parse_log_line`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = re.compile(r"^\[[^\]]*\]\s*")
_SELF_ELECTED = re.compile(r"^Node elected Master - (?:maintaining|promoting) self$")
_OTHER_ELECTED = re.compile(r"^Node (\S+) elected master(?: - demoting self)?$")
_STARTING = re.compile(r"^Starting node (\S+)$")


@dataclass(frozen=True)
class LogEvent:
    """A fact exo states only in its log.

    ``kind == "started"``: ``node_id`` is this node's id. ``kind == "elected"``:
    ``node_id`` is the new master, or ``None`` when this node itself is the master.
    """

    kind: Literal["started", "elected"]
    node_id: str | None


def parse_log_line(line: str) -> LogEvent | None:
    """Recognise exo's start and election lines (loguru format, ANSI colours allowed)."""
    text = _PREFIX.sub("", _ANSI.sub("", line).strip()).strip()
    if _SELF_ELECTED.match(text):
        return LogEvent("elected", None)
    if match := _OTHER_ELECTED.match(text):
        return LogEvent("elected", match.group(1))
    if match := _STARTING.match(text):
        return LogEvent("started", match.group(1))
    return None
