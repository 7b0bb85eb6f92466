"""Sources of any size for the simulation: copies of a test corpus with distinct ids.

Copies are written once per run as Parquet files of at least `min_file_docs` documents each, and a
job's source is a directory of links to as many of them as it needs (a source directory is read in
sorted order and links to files are followed), so a case of ten million documents costs no more
than its scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedq.engines.base import Profile
from embedq.model import ModelInfo


@dataclass(frozen=True)
class CorpusFacts:
    """What the simulation needs to know of a corpus: its size and its tokens, real and padded."""

    name: str
    documents: int  # in one copy
    mean_tokens: float
    mean_padded_tokens: float  # each document padded to the smallest profile that holds it
    profiles: list[Profile]

    def device_docs_per_s(self, rate: float) -> float:
        """What a device of `rate` padded tokens/s embeds at most (full batches)."""
        return rate / self.mean_padded_tokens


def corpus_facts(name: str, path: Path, model: ModelInfo, token_budget: int) -> CorpusFacts:
    """Tokenize one copy and fit the profile table a tuned GPU worker runs (`embedq profile`)."""
    from embedq.bench import load_corpus
    from embedq.tokenization import Tokenizer
    from tests.hostbench import fitted_profiles

    _, texts = load_corpus(path, 1)
    lengths = Tokenizer(model.tokenizer_file, model.max_seq_len).encode(texts).lengths
    profiles = fitted_profiles(model, texts, token_budget)
    seq_lens = np.array(sorted({p.max_seq_len for p in profiles}))
    padded = seq_lens[np.searchsorted(seq_lens, lengths)]
    return CorpusFacts(name, len(texts), float(lengths.mean()), float(padded.mean()), profiles)


class CopiedCorpus:
    """Copies of one corpus file as a source of any number of documents."""

    def __init__(self, path: Path, directory: Path, *, min_file_docs: int = 100_000) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.copy_docs = pq.ParquetFile(path).metadata.num_rows
        self.copies_per_file = max(1, math.ceil(min_file_docs / self.copy_docs))
        self.file_docs = self.copy_docs * self.copies_per_file
        self._files: list[Path] = []
        self._sources = 0

    def source(self, documents: int) -> tuple[Path, int]:
        """A fresh source directory of at least `documents` documents, and its exact size."""
        files = max(1, math.ceil(documents / self.file_docs))
        while len(self._files) < files:
            self._files.append(self._write(len(self._files)))
        self._sources += 1
        source = self.directory / f"source-{self._sources:03d}"
        source.mkdir()
        for i, file in enumerate(self._files[:files]):
            (source / f"{i:05d}.parquet").symlink_to(file)
        return source, files * self.file_docs

    def _write(self, index: int) -> Path:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(self.path, columns=["id", "text"])
        ids = pc.cast(table.column("id"), pa.string())
        copies = []
        for k in range(index * self.copies_per_file, (index + 1) * self.copies_per_file):
            suffixed = pc.binary_join_element_wise(ids, pa.scalar(f"#{k}"), pa.scalar(""))
            copies.append(pa.table({"id": suffixed, "text": table.column("text")}))
        path = self.directory / f"copies-{index:05d}.parquet"
        pq.write_table(pa.concat_tables(copies), path, row_group_size=65536)
        return path
