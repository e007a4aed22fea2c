"""Reconnect delays: exponential, capped, with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based): ``initial * factor**n``, capped at
    ``maximum``, then scaled by a random factor in ``[1 - jitter, 1 + jitter]`` (and capped
    again) so that clients cut off together do not all come back in the same instant.

    The defaults give about 1 s, 2 s, 4 s, 8 s, 16 s, 30 s, 30 s ...
    """

    initial: float = 1.0
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum):
            raise ValueError("need 0 < initial <= maximum")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")
        if not (0 <= self.jitter < 1):
            raise ValueError("jitter must be in [0, 1)")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return float(min(self.maximum, base * spread))
