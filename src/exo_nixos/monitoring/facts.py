"""What the supervisor knows and others cannot ask EXO: the accelerator, the fallback reason,
the memory offered. Written at each start to ``{runtimeDir}/supervisor.json`` and read by
``exo-nixos status`` and the exporter (the runtime directory goes with the node unit, so a
stopped node leaves no stale facts)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_nixos import jsonio
from exo_nixos.fsutil import atomic_write, os_reason

FACTS_FILE = "supervisor.json"


@dataclass(frozen=True)
class SupervisorFacts:
    role: str
    accelerator: str
    fallback: str | None = None
    """Why EXO runs on the CPU although a GPU was wanted; None without a fallback."""
    memory_offer_mb: int | None = None
    """``OVERRIDE_MEMORY_MB`` given to EXO at this start; None when unlimited."""
    memory_backoff_steps: int = 0
    """Steps the offer was lowered by after OOM kills (:mod:`exo_nixos.supervisor.oom`)."""
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "accelerator": self.accelerator,
            "fallback": self.fallback,
            "memoryOfferMb": self.memory_offer_mb,
            "memoryBackoffSteps": self.memory_backoff_steps,
            "startedAt": self.started_at,
        }

    @classmethod
    def from_json(cls, doc: Any) -> SupervisorFacts:
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        role, accelerator = doc.get("role"), doc.get("accelerator")
        if not isinstance(role, str) or not isinstance(accelerator, str):
            raise ValueError("role and accelerator must be strings")
        offer = doc.get("memoryOfferMb")
        steps = doc.get("memoryBackoffSteps", 0)
        started = doc.get("startedAt", 0.0)
        return cls(
            role=role,
            accelerator=accelerator,
            fallback=_text(doc.get("fallback")),
            memory_offer_mb=offer if type(offer) is int else None,
            memory_backoff_steps=steps if type(steps) is int else 0,
            started_at=float(started) if isinstance(started, int | float) else 0.0,
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def write_facts(directory: str | Path, facts: SupervisorFacts) -> None:
    atomic_write(Path(directory) / FACTS_FILE, json.dumps(facts.to_json()) + "\n", mode=0o640)


def read_facts(directory: str | Path) -> tuple[SupervisorFacts | None, str | None]:
    """``(facts, None)``, or ``(None, why not)`` in one line."""
    path = Path(directory) / FACTS_FILE
    try:
        return SupervisorFacts.from_json(jsonio.loads(path.read_text(encoding="utf-8"))), None
    except FileNotFoundError:
        return None, f"{path} does not exist: the node unit is not running"
    except PermissionError:
        return None, f"cannot read {path} as this user; run as root or the service user"
    except OSError as exc:
        return None, f"cannot read {path}: {os_reason(exc)}"
    except ValueError as exc:
        return None, f"{path}: {exc}"
