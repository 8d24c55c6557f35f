"""What the driver's handles on a role's workers share: a dead actor is replaced and its calls issued again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray


def shard(n: int, parts: int) -> list[list[int]]:
    """``range(n)`` split into ≤ ``parts`` contiguous, non-empty shards."""
    size = -(-n // parts)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


class WorkerPool:
    """``size`` actors of one role made by ``make``. A call whose actor died is issued again on a replacement
    (``on_restart`` prepares it, e.g. with the current weights), at most ``max_restarts`` times per run."""

    def __init__(
        self,
        name: str,
        make: Callable[[], Any],
        size: int,
        max_restarts: int,
        on_restart: Callable[[Any], None] = lambda actor: None,
    ):
        self.name, self.make, self.size = name, make, size
        self.max_restarts, self.on_restart = max_restarts, on_restart
        self.actors = [make() for _ in range(size)]
        self.restarts = 0

    def map(self, calls: list[Callable[[Any], Any]], wait: Callable[[Any], Any] = ray.get) -> list[Any]:
        """``wait(calls[i](actor i % size))`` for every i, in order; ``calls[i]`` returns the remote call's
        ref(s) and ``wait`` what the caller keeps of them (raising ``RayActorError`` if the actor died)."""
        results: list[Any] = [None] * len(calls)
        pending = dict(enumerate(calls))
        while pending:
            issued = {i: (self.actors[i % self.size], call) for i, call in pending.items()}
            issued = {i: (actor, call(actor)) for i, (actor, call) in issued.items()}
            for i, (actor, refs) in issued.items():
                try:
                    results[i] = wait(refs)
                    del pending[i]
                except ray.exceptions.RayActorError:
                    if self.actors[i % self.size] is actor:  # not replaced yet for another of its calls
                        self._replace(i % self.size)
        return results

    def _replace(self, index: int) -> None:
        if self.restarts >= self.max_restarts:
            raise RuntimeError(
                f"{self.name} worker {index} died and workers.max_restarts={self.max_restarts} is used up"
            )
        self.restarts += 1
        self.actors[index] = self.make()
        self.on_restart(self.actors[index])
