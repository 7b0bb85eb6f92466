"""A private Redis that can lose acknowledged writes, as a power loss or a failover leaves it.

Redis answers a write before it is durable under `appendfsync everysec` (its default) and before
a replica has it; a crash or a failover then loses the last second or so of acknowledged writes.
`LossyRedis` makes that deterministic: it runs with `appendfsync always` (so the AOF holds every
write the moment it is acknowledged), `mark()` notes how far the AOF has got, and `lose_writes()`
SIGKILLs the server, cuts the AOF back to the mark and starts it again on the same port: every
write acknowledged after the mark is gone, everything before it is there.
"""

from __future__ import annotations

from pathlib import Path

import redis

from embedq.connection import RedisServer


class LossyRedis:
    """A redis-server whose writes since `mark()` can be lost on demand."""

    def __init__(self, directory: Path) -> None:
        # No AOF rewrite: the incremental file must stay the one being cut.
        self.server = RedisServer(appendonly=True, appendfsync="always", directory=directory,
                                  extra_args=("--auto-aof-rewrite-percentage", "0"))
        self._mark: int | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> LossyRedis:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(kill=True)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def _aof(self) -> Path:
        incr = sorted((self.server.directory / "appendonlydir").glob("*.incr.aof"))
        if len(incr) != 1:
            raise RuntimeError(f"expected one incremental AOF file, found {incr}")
        return incr[0]

    def mark(self) -> None:
        """Remember how much of the AOF is written now: what follows is what `lose_writes` loses."""
        self._mark = self._aof().stat().st_size

    def lose_writes(self) -> int:
        """SIGKILL the server, drop every write acknowledged since `mark()`, start it again.
        Returns the bytes of AOF cut."""
        if self._mark is None:
            raise RuntimeError("mark() first")
        self.server.stop(kill=True)
        aof = self._aof()
        cut = aof.stat().st_size - self._mark
        with aof.open("r+b") as handle:
            handle.truncate(self._mark)
        self.server.start()
        self._mark = None
        return cut
