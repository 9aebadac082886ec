"""Files systemd hands a service with ``LoadCredential=NAME:PATH``.

The service reads ``$CREDENTIALS_DIRECTORY/NAME``, a copy it may read even when ``PATH`` is
root-only. Outside systemd (or without that credential) the configured path is used.
"""

from __future__ import annotations

import os
from pathlib import Path


def systemd_credential(configured: str, name: str) -> Path:
    """The file to read for ``configured``: systemd's credential ``name`` when there is one."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return Path(configured)
