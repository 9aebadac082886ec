"""Run a Python snippet or the CLI as another user (nobody), the way a non-root admin or the
service user meets the tool; only root can do that, so callers skip elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python argv...`` as nobody:nogroup with no supplementary groups."""
    if os.getuid() != 0:
        pytest.skip("needs root to run as another user")
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


@contextmanager
def open_tmp() -> Iterator[Path]:
    """A scratch directory other users can reach (pytest's tmp_path is closed to them)."""
    tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp)
