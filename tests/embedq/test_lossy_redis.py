"""The lossy-Redis harness loses exactly the writes acknowledged after its mark, and nothing before."""

from __future__ import annotations

from pathlib import Path

from tests.lossy_redis import LossyRedis


def test_writes_after_the_mark_are_lost_and_those_before_survive_a_crash(tmp_path: Path) -> None:
    with LossyRedis(tmp_path / "redis") as server:
        client = server.client()
        client.set("before", 1)
        client.xadd("stream", {"m": b"kept"})
        server.mark()
        client.set("after", 2)
        client.xadd("stream", {"m": b"lost"})
        client.sadd("condemned", "part-1")
        assert server.lose_writes() > 0
        client = server.client()
        assert client.get("before") == b"1" and client.get("after") is None
        assert [fields[b"m"] for _, fields in client.xrange("stream")] == [b"kept"]
        assert client.smembers("condemned") == set()
