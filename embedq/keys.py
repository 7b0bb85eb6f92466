"""Redis key names of a job. Every key of one job shares the hash tag `{job}` (Redis Cluster safe)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from embedq.errors import UsageError

GROUP = "workers"
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def check_job_name(job: str) -> str:
    """A job name is 1-64 letters, digits, '_', '.', '-', starting with a letter or digit."""
    if not _JOB_NAME.match(job):
        raise UsageError(
            f"Job name {job!r} is not valid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit."
        )
    return job


def default_job_name(source: str, fingerprint: str) -> str:
    """A job name from the source's name and fingerprint, so publishing the same source again resumes
    the same job (`embedq run` without --job, `embedq.submit` without `job`)."""
    stem = "stdin" if source == "-" else Path(source.rstrip("/")).name.split(".")[0]
    clean = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-._")[:40] or "job"
    return f"{clean}-{fingerprint.split(':')[-1][:8]}"


@dataclass(frozen=True)
class JobKeys:
    """All keys of one job; `prefix` separates tenants sharing one Redis (`--key-prefix`)."""

    job: str
    prefix: str = "embedq"

    def __post_init__(self) -> None:
        check_job_name(self.job)
        if not _PREFIX.match(self.prefix):
            raise UsageError(f"Key prefix {self.prefix!r} is not valid: use 1-32 letters, digits, '_.-'.")

    def _key(self, suffix: str) -> str:
        return f"{self.prefix}:{{{self.job}}}:{suffix}"

    @property
    def stream(self) -> str:
        """The batch stream workers read with XREADGROUP."""
        return self._key("batches")

    @property
    def meta(self) -> str:
        """The job record (hash)."""
        return self._key("meta")

    @property
    def producer(self) -> str:
        """The producer's cursor and totals (hash), written with each XADD."""
        return self._key("producer")

    @property
    def producer_lock(self) -> str:
        """Held (with a TTL, renewed) while a producer runs: a job not fully produced whose lock is
        gone has stalled, and `status` says which command finishes it."""
        return self._key("producer:lock")

    def producer_slice(self, index: int, count: int) -> str:
        """The cursor of slice `index` of `count` (hash), when several producers publish one job,
        each a slice of the source (`embedq.producer.slices`)."""
        return self._key(f"producer:slice:{index}:{count}")

    def producer_slice_lock(self, index: int, count: int) -> str:
        """Held while the producer of slice `index` of `count` runs, as `producer_lock` is for one."""
        return self._key(f"producer:slice:{index}:{count}:lock")

    @property
    def ledger(self) -> str:
        """The stream entries embedq itself added (hash: entry id -> sequence number): written by
        the publish, split and replay scripts in the step that adds the entry (`embedq.ledger`)."""
        return self._key("ledger")

    @property
    def manifest(self) -> str:
        """Committed parts (hash: part name -> JSON entry)."""
        return self._key("manifest")

    @property
    def stats(self) -> str:
        """Counters (hash): documents and batches committed and dead-lettered, tokens."""
        return self._key("stats")

    @property
    def dead(self) -> str:
        """Dead letters (stream)."""
        return self._key("dead")

    @property
    def condemned(self) -> str:
        """Staged parts that recovery discarded (set): the settle step refuses them from then on."""
        return self._key("condemned")

    @property
    def failures(self) -> str:
        """Processing failures per stream entry (hash: entry id -> count)."""
        return self._key("failures")

    @property
    def workers(self) -> str:
        """Worker registry (hash: worker id -> JSON heartbeat)."""
        return self._key("workers")

    def worker_lease(self, worker_id: str) -> str:
        """A worker's lease: exists while the worker is alive (TTL = lease time)."""
        return self._key(f"lease:{worker_id}")

    @property
    def crashes(self) -> str:
        """Workers that died while working on a stream entry (hash: entry id -> count)."""
        return self._key("crashes")

    def worker_working(self, worker_id: str) -> str:
        """The entries a worker is working on now (set): tokenizing or embedding, not merely holding.
        A reclaimed entry found here after its worker's lease lapsed counts as a crash on it."""
        return self._key(f"working:{worker_id}")

    def all_patterns(self) -> list[str]:
        return [self._key("*")]
