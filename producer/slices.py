"""Several producers for one job: each publishes one slice of the source.

One producer process reads, batches and encodes about a million short documents a second (a
quarter of a million passages), and pretokenizes only as fast as its host's cores allow:
`tests.fleetsim` measured that this feeds two to seven H200s of MiniLM, by corpus and by who
tokenizes (2026-11-30, README "Scaling out"). Past that, K producers (on K hosts, or K processes
of one) each publish slice k of K: source positions [k*n//K, (k+1)*n//K) of its n documents, into
the same job, stream and consumer group. Nothing changes for workers.

    numbering   slice k numbers its batches from k << SEQ_BITS, so sequence numbers stay unique
                across slices and each slice's stay consecutive, as one producer's are
    cursor      each slice has its own (`keys.producer_slice`), so a slice resumes alone; the
                job's producer hash counts documents and batches over all of them
    lock        each slice has its own (`keys.producer_slice_lock`); the slices also keep the
                job's producer lock, marked "slices:", so `status` shows the job running and a
                whole-source producer cannot start beside them
    done        a slice marks itself done at its end; the last one marks the job produced, in
                the same script, so the job is done exactly when every slice is
    exclusion   the job's producer hash records the number of slices at the first publish; a
                producer with another number (or none) is refused, so batches of two numberings
                never mix in one job
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from embedq.errors import UsageError

SEQ_BITS = 40  # a slice may publish up to 2**40 batches; 2**63 / 2**40 bounds the slices at 2**23
MAX_SLICES = 4096
SLICE_LOCK_PREFIX = "slices:"  # the job's producer lock, when slices hold it
_FORM = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Slice:
    """Slice `index` of `count` equal parts of the source; `Slice()` is the whole source."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SLICES or not 0 <= self.index < self.count:
            raise UsageError(f"slice {self.index}/{self.count} does not exist: use K/N with 0 <= K < N <= "
                             f"{MAX_SLICES}, e.g. 0/4 ... 3/4 for four producers")

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def first_seq(self) -> int:
        """The sequence number of the slice's first batch."""
        return self.index << SEQ_BITS

    def bounds(self, documents: int) -> tuple[int, int]:
        """The source positions [start, stop) of this slice of a source of `documents` documents."""
        return self.index * documents // self.count, (self.index + 1) * documents // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_slice(text: str) -> Slice:
    """`K/N` (slice K of N, counted from 0) as a `Slice`; UsageError naming the form otherwise."""
    match = _FORM.match(text.strip())
    if not match:
        raise UsageError(f"--slice takes K/N (this producer publishes slice K of N, from 0), not {text!r}")
    return Slice(int(match.group(1)), int(match.group(2)))
