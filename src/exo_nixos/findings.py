"""One observation a check or a decision makes: how serious it is, what it is, how to fix it.

Detection, interface choice, pre-flight and doctor all report in this one shape instead of
parallel lists of sentences, so callers and tests branch on ``severity`` and ``code``, never on
the wording of ``text``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Severity(StrEnum):
    """How much a finding matters, least to most."""

    NOTE = "note"  # a fact worth knowing; nothing to do
    REASON = "reason"  # why a decision came out as it did
    WARNING = "warning"  # it works, with less than was asked for or at risk
    PROBLEM = "problem"  # it cannot work this way


@dataclass(frozen=True, slots=True)
class Finding:
    """``code`` is a stable machine-readable name (e.g. ``driver-too-old``); ``fix`` says what
    the user should do, where there is something to do."""

    severity: Severity
    text: str
    fix: str | None = None
    code: str | None = None

    def line(self) -> str:
        """The one line a person reads: the text, then the fix."""
        return f"{self.text}: {self.fix}" if self.fix else self.text

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": str(self.severity),
            "code": self.code,
            "text": self.text,
            "fix": self.fix,
        }


def of(findings: Iterable[Finding], severity: Severity) -> list[Finding]:
    """The findings of one severity, in order."""
    return [f for f in findings if f.severity is severity]
