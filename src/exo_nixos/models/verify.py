"""Offline integrity checks of EXO's model cache, and a quarantine for what is damaged.

A model directory is what EXO downloads a Hugging Face repository into (``<models dir>/
<org>--<name>/``, ``ModelId.normalize`` in upstream's src/exo/shared/types/common.py). Checked
without hashing, so a large cache is checked in seconds:

- every ``*.safetensors`` file: its header parses and the tensor data it describes covers the
  file exactly (a truncated file fails), read with the ``safetensors`` library;
- every ``*.safetensors.index.json``: it parses, the shards its ``weight_map`` names exist and
  hold the tensors it assigns them;
- ``*.partial`` files (EXO's downloads in progress, src/exo/download/download_utils.py) older
  than a limit: a download that was abandoned;
- owner and mode, where an owner is expected: EXO (the service user) must be able to replace
  what it downloaded.

Damaged files are *moved* into a quarantine directory, never deleted, so EXO downloads them
again; missing shards are reported (EXO fetches them when the model is next placed).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo_nixos.fsutil import atomic_write, os_reason

PARTIAL_SUFFIX = ".partial"
INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_PARTIAL_AGE_S = 3600.0
"""A ``.partial`` file untouched this long is a leftover, not a download in progress."""

# what makes a directory a model directory (one of these directly inside it)
_MODEL_MARKERS = ("config.json", "model_index.json")


@dataclass(frozen=True)
class Damage:
    """One problem in a model directory.

    ``kind`` is one of ``header``, ``truncated``, ``index``, ``missing-shard``,
    ``missing-tensor``, ``partial``, ``owner``, ``mode``, ``unreadable``. ``movable``: the file
    exists and EXO downloads it again once it is moved away.
    """

    path: Path
    kind: str
    reason: str
    movable: bool = True

    def line(self) -> str:
        return f"{self.path}: {self.kind}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "reason": self.reason,
            "movable": self.movable,
        }


@dataclass
class ModelReport:
    """What checking one model directory found."""

    directory: Path
    files: int = 0
    bytes: int = 0
    damage: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    moved: list[tuple[Path, Path]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damage

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "files": self.files,
            "bytes": self.bytes,
            "damage": [d.to_json() for d in self.damage],
            "notes": self.notes,
            "moved": [{"from": str(a), "to": str(b)} for a, b in self.moved],
        }


@dataclass(frozen=True)
class Owner:
    """Who should own a writable model cache: the service's user and group ids."""

    uid: int
    gid: int | None = None


def _is_model_dir(path: Path) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(
        n in _MODEL_MARKERS or n.endswith((".safetensors", INDEX_SUFFIX, PARTIAL_SUFFIX))
        for n in names
    )


def model_dirs(root: Path) -> list[Path]:
    """``root`` itself when it is a model directory, else its model subdirectories."""
    if _is_model_dir(root):
        return [root]
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    return [c for c in children if _is_model_dir(c)]


def _safetensors_problem(
    path: Path,
) -> tuple[str, str, frozenset[str]] | tuple[None, None, frozenset[str]]:
    """``(kind, reason, tensors)``: what is wrong with one safetensors file, or ``None``."""
    from safetensors import SafetensorError, safe_open  # heavy: only when there is a file

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return None, None, frozenset(handle.keys())
    except SafetensorError as exc:
        text = str(exc)
        if "incomplete" in text or "not fully covered" in text or "too small" in text.lower():
            return "truncated", f"tensor data and file size disagree ({text})", frozenset()
        return "header", f"header does not parse ({text})", frozenset()
    except OSError as exc:
        return "unreadable", os_reason(exc), frozenset()


def _load_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file (tensor -> shard file); ValueError when malformed."""
    with path.open("rb") as handle:
        doc = json.loads(handle.read())
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError("no weight_map of tensor names to file names")
    return weight_map


def _owner_damage(path: Path, info: os.stat_result, owner: Owner) -> Damage | None:
    if info.st_uid != owner.uid or (owner.gid is not None and info.st_gid != owner.gid):
        want = f"{owner.uid}" + (f":{owner.gid}" if owner.gid is not None else "")
        return Damage(
            path,
            "owner",
            f"owned by {info.st_uid}:{info.st_gid}, expected {want}: EXO cannot replace it "
            f"(chown -R {want} on the model directory)",
            movable=False,
        )
    if info.st_mode & stat.S_IWOTH:
        return Damage(path, "mode", "writable by every user (chmod o-w)", movable=False)
    return None


def check_model_dir(
    directory: Path,
    *,
    owner: Owner | None = None,
    partial_age_s: float = DEFAULT_PARTIAL_AGE_S,
    now: float | None = None,
) -> ModelReport:
    """Check one model directory; nothing is changed."""
    now = time.time() if now is None else now
    report = ModelReport(directory)
    shards: dict[Path, frozenset[str]] = {}
    indexes: list[Path] = []
    fresh_partials: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        base = Path(dirpath)
        if owner is not None:
            try:
                if damage := _owner_damage(base, base.stat(), owner):
                    report.damage.append(damage)
            except OSError:
                pass
        for name in sorted(filenames):
            path = base / name
            try:
                info = path.lstat()
            except OSError as exc:
                report.damage.append(Damage(path, "unreadable", os_reason(exc), False))
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            report.files += 1
            report.bytes += info.st_size
            if owner is not None and (damage := _owner_damage(path, info, owner)):
                report.damage.append(damage)
            if name.endswith(PARTIAL_SUFFIX):
                age = now - info.st_mtime
                if age < partial_age_s:
                    fresh_partials.add(path)
                    report.notes.append(f"{path}: download in progress ({age:.0f}s since written)")
                else:
                    report.damage.append(
                        Damage(path, "partial", f"leftover partial download, untouched {age:.0f}s")
                    )
            elif name.endswith(".safetensors"):
                kind, reason, tensors = _safetensors_problem(path)
                if kind is not None and reason is not None:
                    report.damage.append(Damage(path, kind, reason))
                else:
                    shards[path] = tensors
            elif name.endswith(INDEX_SUFFIX):
                indexes.append(path)
    for index in indexes:
        _check_index(index, shards, fresh_partials, report)
    return report


def _check_index(
    index: Path, shards: dict[Path, frozenset[str]], fresh: set[Path], report: ModelReport
) -> None:
    try:
        weight_map = _load_index(index)
    except (OSError, ValueError) as exc:
        report.damage.append(Damage(index, "index", f"does not parse ({exc})"))
        return
    wanted: dict[str, list[str]] = {}
    for tensor, file_name in weight_map.items():
        wanted.setdefault(file_name, []).append(tensor)
    for file_name, tensors in sorted(wanted.items()):
        shard = index.parent / file_name
        if shard in shards:
            missing = [t for t in tensors if t not in shards[shard]]
            if missing:
                report.damage.append(
                    Damage(
                        shard,
                        "missing-tensor",
                        f"{len(missing)} tensor(s) {index.name} puts here are not in it "
                        f"(first: {missing[0]})",
                    )
                )
        elif shard.with_name(shard.name + PARTIAL_SUFFIX) in fresh:
            continue  # being downloaded
        elif not shard.exists():
            report.damage.append(
                Damage(shard, "missing-shard", f"named in {index.name} but absent", movable=False)
            )


def verify(
    roots: Sequence[Path],
    *,
    owner: Owner | None = None,
    partial_age_s: float = DEFAULT_PARTIAL_AGE_S,
) -> list[ModelReport]:
    """Check every model directory under ``roots`` (each a models dir or one model's dir)."""
    reports: list[ModelReport] = []
    for root in roots:
        for directory in model_dirs(root):
            reports.append(check_model_dir(directory, owner=owner, partial_age_s=partial_age_s))
    return reports


def quarantine(reports: Iterable[ModelReport], root: Path, *, stamp: str | None = None) -> int:
    """Move every movable damaged file below ``root/STAMP/<model dir>/``; never delete.

    ``reasons.json`` in ``root/STAMP`` says what each file was moved for. Returns how many
    files were moved; ``ModelReport.moved`` lists them.
    """
    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target_root = root / stamp
    reasons: list[dict[str, Any]] = []
    moved = 0
    for report in reports:
        for damage in report.damage:
            if not damage.movable or not damage.path.exists():
                continue
            relative = damage.path.relative_to(report.directory.parent)
            target = target_root / relative
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            shutil.move(damage.path, target)
            report.moved.append((damage.path, target))
            reasons.append({**damage.to_json(), "movedTo": str(target)})
            moved += 1
    if reasons:
        atomic_write(target_root / "reasons.json", json.dumps(reasons, indent=2) + "\n", 0o640)
    return moved
