import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hardware"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    assert path.is_dir(), path
    return path


@pytest.fixture
def tree_copy(tmp_path):
    """Copy a fixture tree into tmp_path so a test can break it."""

    def copy(name: str):
        target = tmp_path / name
        shutil.copytree(fixture(name), target, symlinks=True)
        return target

    return copy
