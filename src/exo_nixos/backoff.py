"""Capped exponential backoff with jitter, for loops that retry a remote API."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with jitter: about initial, 2x, 4x ... up to ``cap``."""

    def __init__(self, initial: float = 1.0, cap: float = 60.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        # Jitter keeps many nodes from hitting a recovering API server at the same instant.
        return float(delay * (0.5 + random.random() / 2))  # noqa: S311 - not for security

    def reset(self) -> None:
        self.attempt = 0
