"""The board a population's worker and the driver meet on: one small Ray actor per study run.

Its own module, importing neither torch nor Ray Tune: the actor's worker process imports only
this, so it is up in a moment while the trials' workers are still importing torch.
"""

from __future__ import annotations

import asyncio

from dlsearch.protocol import RoundAnswer


class PruneBoard:
    """Where the driver posts its answer to each round of a population (`RoundAnswer`: members to
    stop, newcomers); the population's worker waits for it before its next round. Answers stay
    until the population ends (`forget`): a worker restarted from a checkpoint repeats rounds
    and takes their answers again. One per study run, a named Ray actor."""

    def __init__(self) -> None:
        self._posts: dict[tuple[str, int], RoundAnswer] = {}
        self._events: dict[tuple[str, int], asyncio.Event] = {}

    async def post(self, key: str, round_: int, answer: RoundAnswer) -> None:
        self._posts[(key, round_)] = answer
        self._event(key, round_).set()

    async def wait(self, key: str, round_: int) -> RoundAnswer:
        await self._event(key, round_).wait()
        return self._posts[(key, round_)]

    async def forget(self, key: str) -> None:
        for k in [k for k in self._events if k[0] == key]:
            self._events.pop(k, None)
            self._posts.pop(k, None)

    def _event(self, key: str, round_: int) -> asyncio.Event:
        return self._events.setdefault((key, round_), asyncio.Event())
