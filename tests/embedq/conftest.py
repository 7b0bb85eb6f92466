"""Fixtures of the application layer's tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib


@pytest.fixture
def stem(redis_url: str) -> Iterator[str]:
    """A job-name stem for incremental jobs (named <stem>-g<n>-<digest>); their keys go afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis_lib.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{{{name}-*", count=1000):
        client.delete(key)
    client.close()
