"""The Python API: embed texts or a table on this machine, or submit a job to Redis and wait for it.

Local embedding goes through exactly what a worker runs: the model read by `load_model_info`, the
engine `engines.factory` picks (the same backend, precision and bucket profiles as `embedq work`
on this machine), the same tokenizer, and the worker's engine stage (`worker.pipeline.embed_stream`:
windows sorted by length, cut into padded buckets). On the CPU the vectors are bit-identical to
those `embedq run` writes for the same texts; results always come back in input order.

    >>> import embedq
    >>> vectors = embedq.encode(["a first sentence", "and a second"])   # one-shot: loads the model
    >>> vectors.shape, vectors.dtype
    ((2, 384), dtype('float32'))

    >>> with embedq.Embedder() as model:          # the bundled all-MiniLM-L6-v2, started once
    ...     a = model.encode(line.strip() for line in open("notes.txt"))   # any iterable of str
    ...     table = model.embed_table("passages.parquet")  # id, embedding, n_tokens, truncated

`embed_table` takes a `pyarrow.Table` or a Parquet path (file or directory) and returns the
columns of the worker's Parquet parts, in input order (`table.column("embedding")` is a fixed-size
list of float32; `np.stack(table.column("embedding").to_numpy(zero_copy_only=False))` gives the matrix).

For corpora that need many GPUs, publish a job and let `embedq work` processes embed it:

    >>> job = embedq.submit("corpus.parquet", job="corpus-v1", redis="redis://queue:6379/0")
    >>> status = embedq.wait(job, redis="redis://queue:6379/0", timeout=3600)
    >>> status.committed_documents, status.output

`submit` and `wait` read `EMBEDQ_*` variables and `embedq.toml` as the CLI does (arguments win);
`Embedder` takes only its arguments.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import pyarrow as pa

from embedq.config import Backend, OutputDtype, Pooling, Precision, Settings, Unpad, load_settings
from embedq.documents import EMPTY_TEXT, unicode_problem
from embedq.errors import EngineError, SourceError, UsageError
from embedq.model import ModelInfo, load_model_info
from embedq.tokenization import TokenizedDocs

if TYPE_CHECKING:
    from embedq.engines.base import Engine
    from embedq.keys import JobKeys
    from embedq.protocol import DocId
    from embedq.status import JobStatus
    from embedq.tokenization import TokenizerPool

__all__ = ["Embedder", "encode", "submit", "wait"]

WINDOW_DOCS = Settings.window_docs  # documents tokenized, sorted and bucketed together, as a worker does
PathLike = str | os.PathLike[str]


class Embedder:
    """A model with its engine and tokenizer started once, for repeated `encode` and `embed_table`
    calls on this machine. Close it (or use `with`) to free the device. Not thread-safe.

    The arguments are the `embedq work` flags of the same names; "auto" and None mean what the worker
    picks on this machine (the GPU when there is one, fp16 there, the torch backend on CPU)."""

    def __init__(self, model: PathLike | None = None, *, device: str = "auto", backend: Backend = "auto",
                 precision: Precision = "auto", pooling: Pooling | None = None, normalize: bool | None = None,
                 max_seq_len: int | None = None, token_budget: int | None = None,
                 seq_lens: Sequence[int] | None = None, cuda_graphs: bool = True, unpad: Unpad = "auto",
                 threads: int | None = None,
                 tokenizer_processes: int | None = None, prompt: str | None = None,
                 prompt_name: str | None = None) -> None:
        from embedq.engines.factory import EngineSpec, engine_for
        from embedq.tokenization import TokenizerPool, default_tokenizer_processes

        # Settings validate the values as the CLI's flags are validated, and map to the engine the same way.
        settings = Settings(
            model=None if model is None else os.fspath(model), pooling=pooling, normalize=normalize,
            max_seq_len=max_seq_len, backend=backend, device=device, precision=precision, threads=threads,
            token_budget=token_budget, seq_lens=",".join(map(str, seq_lens)) if seq_lens else None,
            cuda_graphs=cuda_graphs, unpad=unpad, tokenizer_processes=tokenizer_processes).validate()
        self.model: ModelInfo = load_model_info(settings.model, pooling=settings.pooling,
                                                normalize=settings.normalize, max_seq_len=settings.max_seq_len,
                                                prompt=prompt, prompt_name=prompt_name)
        self._stack = contextlib.ExitStack()
        try:
            self.engine: Engine = self._stack.enter_context(engine_for(self.model, EngineSpec.from_settings(settings)))
            processes = tokenizer_processes
            if processes is None:
                processes = default_tokenizer_processes(self.engine.config.device, self.model.tokenizer_file)
            self._tokenizer: TokenizerPool = self._stack.enter_context(
                TokenizerPool(self.model.tokenizer_file, self.model.max_seq_len, processes, prompt=self.model.prompt))
        except BaseException:
            self._stack.close()
            raise
        self._closed = False

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        return self.model.dim

    def encode(self, texts: Iterable[str], *, batch_docs: int = WINDOW_DOCS, show_progress: bool = False) -> np.ndarray:
        """Embeddings `(n, dim)` float32 of `texts`, in their order. Any iterable (a generator too) is
        read `batch_docs` texts at a time, so only the result grows with its length."""
        chunks = ((None, texts) for texts in _text_windows(texts, batch_docs))
        parts = [vectors for vectors, _ in self._embed(chunks, _total(texts), show_progress)]
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def embed_table(self, table: pa.Table | PathLike, *, text_field: str = "text", id_field: str | None = None,
                    batch_docs: int = WINDOW_DOCS, output_dtype: OutputDtype = "float32",
                    show_progress: bool = False) -> pa.Table:
        """The table's texts embedded: columns `id`, `embedding`, `n_tokens`, `truncated` as in the
        worker's Parquet parts, rows in input order. `table` is a `pyarrow.Table` or a Parquet path.

        Ids come from `id_field`, else from an "id" column, else they are the row positions (int64),
        as `embedq produce` takes them. Empty texts are embedded (as with `--allow-empty`)."""
        from embedq.worker.writer import output_schema, part_metadata, part_table

        if output_dtype not in get_args(OutputDtype):
            raise UsageError(f"output_dtype must be float32 or float16, got {output_dtype!r}")
        if not isinstance(table, pa.Table):
            table = _read_parquet(table, text_field, id_field)
        id_type, chunks = _table_windows(table, text_field, id_field, batch_docs)
        ids: list[DocId] = []
        vectors: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)]
        n_tokens: list[np.ndarray] = [np.zeros(0, np.int32)]
        truncated: list[np.ndarray] = [np.zeros(0, bool)]
        for chunk_vectors, docs in self._embed(chunks, table.num_rows, show_progress, ids):
            vectors.append(chunk_vectors)
            n_tokens.append(docs.lengths)
            truncated.append(docs.truncated)
        # The job name is empty: these rows belong to no job.
        schema = output_schema(id_type, self.dim, output_dtype, part_metadata(
            "", self.model.describe(), self.engine.name, self.engine.config.precision))
        return part_table(schema, ids, np.concatenate(vectors), np.concatenate(n_tokens), np.concatenate(truncated))

    def close(self) -> None:
        """Stop the engine and the tokenizer; closing twice is harmless."""
        self._closed = True
        self._stack.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.engine.name} on {self.engine.config.device}"
        return f"<Embedder {self.model.name} ({self.dim}d, {state})>"

    def _embed(self, chunks: Iterable[tuple[list[DocId] | None, list[str]]], total: int, show_progress: bool,
               ids: list[DocId] | None = None) -> Iterator[tuple[np.ndarray, TokenizedDocs]]:
        """Embeddings and tokens of each chunk of texts, in order, through the worker's engine stage;
        the next chunk is tokenized while the engine runs this one (in the pool's processes, on GPUs)."""
        from embedq.progress import ProgressReport
        from embedq.worker.pipeline import END, Work, embed_stream

        if self._closed:
            raise UsageError("this Embedder is closed; make a new one")
        source = iter(chunks)
        ahead: collections.deque[Future[TokenizedDocs]] = collections.deque()

        def take(wait: bool) -> Work[TokenizedDocs] | object:
            while len(ahead) < 2 and (chunk := next(source, None)) is not None:
                if ids is not None and chunk[0] is not None:
                    ids.extend(chunk[0])
                ahead.append(self._tokenizer.submit(chunk[1]))
            if not ahead:
                return END
            docs = ahead.popleft().result()
            return Work(docs, docs)

        done = tokens = 0
        stream: Iterator[tuple[TokenizedDocs, np.ndarray | Exception]] = embed_stream(
            self.engine, take, self.model.pad_token_id)
        with ProgressReport("embed", total, interactive=True) if show_progress else contextlib.nullcontext() as bar:
            for docs, result in stream:
                if isinstance(result, Exception):
                    raise EngineError(f"the {self.engine.name} engine failed on a batch: {result}") from result
                done, tokens = done + len(docs), tokens + int(docs.lengths.sum())
                if bar is not None:
                    bar.update(done, tokens)
                yield result, docs


def encode(texts: Iterable[str], model: PathLike | None = None, *, batch_docs: int = WINDOW_DOCS,
           show_progress: bool = False, **options: Any) -> np.ndarray:
    """Embeddings `(n, dim)` float32 of `texts` in their order, with a model loaded for this call only
    (`options` are `Embedder`'s); to embed more than once, keep an `Embedder`."""
    with Embedder(model, **options) as embedder:
        return embedder.encode(texts, batch_docs=batch_docs, show_progress=show_progress)


def submit(source: PathLike, *, job: str | None = None, redis: str | None = None, key_prefix: str | None = None,
           model: PathLike | None = None, format: str = "auto", id_field: str | None = None,
           text_field: str = "text", text_unit: str = "line", **settings: Any) -> str:
    """Publish `source` (a file or directory, as `embedq produce` reads it) as a job; returns its name.

    Blocks until every batch is in Redis. Past `backlog` unacknowledged batches the producer waits
    for workers, so start `embedq work` first for sources larger than `batch_size * backlog` documents.
    `settings` are further `embedq produce` settings by name (batch_size, allow_empty, pretokenize...).
    Publishing the same source again resumes the job and adds no batch twice; without `job` the name
    is derived from the source, as `embedq run` does."""
    from embedq import job as job_record
    from embedq.cli.calibration import job_output_format
    from embedq.keys import default_job_name
    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.producer.sources import SourceSpec, open_source
    from embedq.tokenization import Tokenizer

    chosen = load_settings({"redis_url": redis, "key_prefix": key_prefix,
                            "model": None if model is None else os.fspath(model), **settings})
    info = load_model_info(chosen.model, pooling=chosen.pooling, normalize=chosen.normalize,
                           max_seq_len=chosen.max_seq_len, prompt=chosen.prompt, prompt_name=chosen.prompt_name)
    path = os.fspath(source)
    spec = SourceSpec(path=path, format=format, id_field=id_field, text_field=text_field, text_unit=text_unit)
    with open_source(spec) as src:
        name = job or default_job_name(path, src.scan().fingerprint)
        client, keys = _connect(chosen, name)
        tokenizer = Tokenizer(info.tokenizer_file, info.max_seq_len, prompt=info.prompt) if chosen.pretokenize else None
        stored = job_output_format(chosen, info, src, job_record.load(client, keys))
        options = dataclasses.replace(ProducerOptions.from_settings(chosen), output=stored)
        encode = tokenizer.encode if tokenizer is not None else None
        producer = Producer(client, keys, src, info, options, encode=encode)
        producer.prepare()
        producer.run()
    return name


def wait(job: str, *, redis: str | None = None, key_prefix: str | None = None, timeout: float | None = None,
         poll: float = 1.0, on_status: Callable[[JobStatus], object] | None = None) -> JobStatus:
    """Wait until `job` is complete (every document settled, the output final) and return its status;
    `on_status` sees each status polled. Raises TimeoutError after `timeout` seconds."""
    from embedq.status import read_status

    client, keys = _connect(load_settings({"redis_url": redis, "key_prefix": key_prefix}), job)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = read_status(client, keys)
        if not status.exists:
            raise UsageError(f"job {job!r} does not exist under key prefix {keys.prefix!r}; submit it first")
        if on_status is not None:
            on_status(status)
        if status.complete:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job!r} is not complete after {timeout} s (state: {status.state}, "
                               f"{status.settled_documents:,} of {status.documents:,} documents settled)"
                               + (f"; {status.action}" if status.action else ""))
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))


# -- helpers --------------------------------------------------------------------------------------

def _connect(settings: Settings, job: str) -> tuple[Any, JobKeys]:
    from embedq.connection import connect
    from embedq.keys import JobKeys

    keys = JobKeys(job, settings.key_prefix)  # checks the name before anything connects
    return connect(settings.redis()), keys


def _total(texts: Iterable[str]) -> int:
    return len(texts) if isinstance(texts, Sized) else 0


def _text_windows(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """`texts` in lists of `size`, each checked: a str, and encodable (a lone surrogate would make the
    tokenizer fail its whole batch)."""
    if isinstance(texts, str | bytes):
        raise UsageError("texts must be an iterable of str, not a single string: pass [text]")
    if size < 1:
        raise UsageError(f"batch_docs must be positive, got {size}")
    window: list[str] = []
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise UsageError(f"texts[{position}] is of type {type(text).__name__}, not str; convert or drop it")
        problem = unicode_problem(text)
        if problem is not None:
            raise UsageError(f"texts[{position}]: {problem}")
        window.append(text)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _read_parquet(path: PathLike, text_field: str, id_field: str | None) -> pa.Table:
    """The text and id columns of a Parquet file or directory (hidden files skipped, as glob readers do)."""
    import pyarrow.dataset as ds

    if not os.path.exists(path):
        raise SourceError(f"{os.fspath(path)} does not exist; pass a Parquet file or directory, or a pyarrow.Table")
    try:
        dataset = ds.dataset(os.fspath(path), format="parquet")
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read {os.fspath(path)} as Parquet: {exc}") from exc
    names = dataset.schema.names
    wanted = [text_field, *([id_field] if id_field else ["id"] if "id" in names else [])]
    return dataset.to_table(columns=[n for n in wanted if n in names])


def _table_windows(table: pa.Table, text_field: str, id_field: str | None,
                   size: int) -> tuple[str, Iterator[tuple[list[DocId], list[str]]]]:
    """The id type ("int64" or "string") and the table's (ids, texts) in windows of `size` rows."""
    from embedq.producer.formats.arrow_columns import arrow_texts

    names = table.column_names
    id_name = id_field or ("id" if "id" in names else None)
    for role, name in (("text", text_field), ("id", id_name)):
        if name is not None and name not in names:
            raise UsageError(f"the table has no {role} column {name!r}; its columns are {names}")
    id_type = "int64"
    if id_name is not None:
        kind = table.schema.field(id_name).type
        kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UsageError(f"id column {id_name!r} has type {kind}; ids must be strings or integers")
        id_type = "int64" if pa.types.is_integer(kind) else "string"
    if size < 1:
        raise UsageError(f"batch_docs must be positive, got {size}")

    def windows() -> Iterator[tuple[list[DocId], list[str]]]:
        for start in range(0, table.num_rows, size):
            rows = table.slice(start, size)
            texts, problems = arrow_texts(rows.column(text_field).combine_chunks())
            unusable = {i: why for i, why in problems.items() if why != EMPTY_TEXT}
            if unusable:
                i, why = min(unusable.items())
                raise SourceError(f"row {start + i} of the table: {why} in column {text_field!r}")
            if id_name is None:
                yield list(range(start, start + rows.num_rows)), texts
                continue
            column = rows.column(id_name).combine_chunks()
            if column.null_count:
                raise SourceError(f"id column {id_name!r} has a null id near row {start}; every row needs an id")
            column = column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
            yield column.cast(pa.int64() if id_type == "int64" else pa.string()).to_pylist(), texts

    return id_type, windows()
