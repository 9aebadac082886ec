"""The health rule the supervisor, the gateway and the K3s registrar share: a node is up after
one passing probe and down after ``limit`` failed ones in a row."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UpDown:
    """Up after one passing probe, down after ``limit`` failed ones in a row."""

    limit: int
    up: bool = False
    failed: int = 0  # failed probes since the last passing one

    def passed(self) -> bool:
        """A probe passed: up at once. True when the state changed."""
        changed = not self.up
        self.up, self.failed = True, 0
        return changed

    def failed_probe(self) -> bool:
        """A probe failed: down once ``limit`` failed in a row. True when the state changed."""
        self.failed += 1
        if self.up and self.failing:
            self.up = False
            return True
        return False

    def give_up(self) -> None:
        """Down at once, as if ``limit`` probes had failed (a request could not connect)."""
        self.failed = max(self.failed, self.limit)
        self.up = False

    @property
    def failing(self) -> bool:
        """``limit`` or more probes failed in a row."""
        return self.failed >= self.limit
