"""Logging for a process whose stderr goes to the journal."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities journald reads from a "<N>" line prefix (SyslogLevelPrefix=yes)
_SYSLOG = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}


class JournalFormatter(logging.Formatter):
    """``<priority>message``: journald stores the priority, so ``journalctl -p`` filters work."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG.get(record.levelno, 7)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    # the config's levels (error, warning, info, debug) are logging's names in lower case
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
