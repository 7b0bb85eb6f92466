"""The worker's host side against a simulated device, on a machine without a GPU.

A child process plays a GPU's queue: batches run one after another, each for
`padded tokens / rate` seconds, and the queue goes on without the worker's GIL, as a GPU does.
Its results are random unit vectors: this measures time, not embeddings. Everything else is the
real worker: Redis, decoding, the engine stage's pipeline, Parquet parts, commits.

It answers what `embedq bench` cannot without a GPU: how busy the worker's host side keeps a
device of a given speed, and, run under py-spy, where the engine thread's time goes. The GPU
figures in the README come from `embedq bench` on a GPU, never from this.

    python -m tests.hostbench --corpus glosses --repeat 10 --rate 4e6     # MiniLM glosses on an H200
    python -m tests.hostbench --corpus passages --repeat 30 --rate 8.6e6  # MiniLM passages on an H200
"""

from __future__ import annotations

import argparse
import contextlib
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.engines.base import EngineBase, EngineConfig, Pending, Profile, check_batch

if TYPE_CHECKING:
    import redis

    from embedq.job import JobRecord
    from embedq.keys import JobKeys
    from embedq.model import ModelInfo
    from embedq.worker.options import WorkerOptions
    from embedq.worker.worker import Worker

_DEVICE = r"""
import struct, sys, time
inp, out = sys.stdin.buffer, sys.stdout.buffer
free = time.perf_counter()
busy = 0.0
while True:
    head = inp.read(12)
    if len(head) < 12:
        break
    ident, seconds = struct.unpack("<id", head)
    free = max(time.perf_counter(), free) + seconds  # starts when the batch before it ends
    busy += seconds
    while (left := free - time.perf_counter()) > 0:
        time.sleep(left)
    out.write(struct.pack("<id", ident, busy))
    out.flush()
"""
_RECORD = struct.Struct("<id")


class SimulatedDevice(EngineBase):
    """An `Engine` whose batches take `padded tokens / rate` seconds on a queue in another process.

    It keeps the engine contract (profiles checked on submit, `(B, dim)` float32 results, any
    number of batches in flight, results collected in any order) so the worker cannot tell it
    from a GPU engine but by speed and by what the vectors mean.
    """

    name = "simulated"

    def __init__(self, config: EngineConfig, rate: float) -> None:
        super().__init__(config)
        if rate <= 0:
            raise ValueError("rate must be positive (padded tokens per second)")
        self.rate = rate
        self.busy_seconds = 0.0  # device time of the batches collected so far
        self._done: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._vectors = np.random.default_rng(0).standard_normal((4096, self.dim)).astype(np.float32)
        self._vectors /= np.linalg.norm(self._vectors, axis=1, keepdims=True)

    def __enter__(self) -> SimulatedDevice:
        self._process = subprocess.Popen([sys.executable, "-c", _DEVICE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, bufsize=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            self._process.wait(timeout=30)
            self._process = None

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray) -> Pending:
        check_batch(self.profiles, input_ids, lengths)
        if self._process is None or self._process.stdin is None:
            raise RuntimeError("the simulated device is not started; use it inside `with`")
        self._next += 1
        self._process.stdin.write(_RECORD.pack(self._next, input_ids.size / self.rate))
        return _Later(self, self._next, input_ids.shape[0])

    def _wait(self, ident: int) -> None:
        with self._lock:
            while ident not in self._done:
                assert self._process is not None and self._process.stdout is not None
                done, busy = _RECORD.unpack(self._process.stdout.read(_RECORD.size))
                self._done.add(done)
                self.busy_seconds = busy
            self._done.discard(ident)

    def _rows(self, n: int) -> np.ndarray:
        return np.resize(self._vectors, (n, self.dim))


class _Later:
    __slots__ = ("_device", "_ident", "_rows", "_value")

    def __init__(self, device: SimulatedDevice, ident: int, rows: int) -> None:
        self._device, self._ident, self._rows = device, ident, rows
        self._value: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._value is None:
            self._device._wait(self._ident)
            self._value = self._device._rows(self._rows)
        return self._value


def fitted_profiles(model: ModelInfo, texts: list[str], token_budget: int) -> list[Profile]:
    """The profile table `embedq profile` would fit to these texts (what a tuned GPU worker runs)."""
    from embedq.engines.profiles import fit_seq_lens, profile_table
    from embedq.tokenization import Tokenizer

    lengths = Tokenizer(model.tokenizer_file, model.max_seq_len).encode(texts).lengths
    return profile_table(model.max_seq_len, token_budget, fit_seq_lens(lengths, model.max_seq_len))


@contextlib.contextmanager
def simulated_worker(client: redis.Redis, keys: JobKeys, record: JobRecord, model: ModelInfo,
                     profiles: list[Profile], rate: float, output: Path, options: WorkerOptions) -> Iterator[Worker]:
    """The real worker on a `SimulatedDevice` of `rate` padded tokens/s, with the tokenizer pool a
    GPU node starts when the job is not pretokenized; the device and the pool end with the block."""
    from embedq.tokenization import TokenizerPool, default_tokenizer_processes
    from embedq.worker.output import open_output
    from embedq.worker.worker import Worker

    with contextlib.ExitStack() as stack:
        encode = None
        if not record.pretokenized:
            processes = default_tokenizer_processes("cuda", model.tokenizer_file)
            encode = stack.enter_context(TokenizerPool(model.tokenizer_file, model.max_seq_len, processes)).encode
        device = stack.enter_context(SimulatedDevice(EngineConfig(model=model, profiles=profiles), rate))
        yield Worker(client, keys, record, model, device, open_output(output), options, encode=encode)


def run(corpus: Path, repeat: int, rate: float, *, pretokenize: bool, window_docs: int, token_budget: int,
        commit_threads: int, redis_url: str, work_dir: Path) -> dict[str, Any]:
    """Publish the corpus, then time one worker over it against the simulated device."""
    import redis as redis_lib

    from embedq.bench import load_corpus, write_corpus
    from embedq.keys import JobKeys
    from embedq.model import default_model_path, load_model_info
    from embedq.producer.producer import Producer, ProducerOptions
    from embedq.producer.sources import SourceSpec, open_source
    from embedq.tokenization import TokenizerPool, default_tokenizer_processes
    from embedq.worker.worker import WorkerOptions

    model = load_model_info(default_model_path())
    ids, texts = load_corpus(corpus, repeat)
    source = work_dir / f"hostbench-{uuid.uuid4().hex[:6]}.parquet"
    write_corpus(source, ids, texts)
    profiles = fitted_profiles(model, texts[: len(texts) // repeat], token_budget)
    client = redis_lib.Redis.from_url(redis_url)
    keys = JobKeys(f"hostbench-{uuid.uuid4().hex[:8]}")
    options = WorkerOptions(window_docs=window_docs, prefetch=3, lease_seconds=60, commit_threads=commit_threads)
    try:
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(open_source(SourceSpec(str(source))))
            pool = stack.enter_context(TokenizerPool(model.tokenizer_file, model.max_seq_len,
                                                     default_tokenizer_processes("cuda", model.tokenizer_file)))
            producer = Producer(client, keys, src, model, ProducerOptions(backlog=10**9),
                                tokenizer=pool if pretokenize else None)
            record = producer.prepare()
            producer.run()
            pool.close()  # the worker starts its own when it tokenizes
            worker = stack.enter_context(simulated_worker(client, keys, record, model, profiles, rate,
                                                          work_dir / f"out-{keys.job}", options))
            device = worker.engine
            started = time.perf_counter()
            report = worker.run(install_signals=False)
            seconds = time.perf_counter() - started
    finally:
        for key in client.scan_iter(match=f"*{{{keys.job}}}*"):
            client.delete(key)
        source.unlink()
    assert isinstance(device, SimulatedDevice)
    ceiling = report.engine.padded_tokens / rate
    return {"corpus": corpus.stem, "documents": report.documents, "tokens": report.tokens, "seconds": seconds,
            "docs_per_s": report.documents / seconds, "tokens_per_s": report.tokens / seconds,
            "device_ceiling_docs_per_s": report.documents / ceiling, "device_busy": ceiling / seconds}


def main(argv: list[str] | None = None) -> None:
    import shutil
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tests.hostbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="glosses", help="glosses, passages, or a Parquet file (id, text)")
    parser.add_argument("--corpus-dir", default=str(Path.home() / ".cache" / "embedq-test-corpus"))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rate", type=float, default=4e6, help="device speed, padded tokens/s")
    parser.add_argument("--tokenize", choices=["producer", "worker"], default="producer")
    parser.add_argument("--window-docs", type=int, default=32768)
    parser.add_argument("--token-budget", type=int, default=65536)
    parser.add_argument("--commit-threads", type=int, default=4)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    corpus = Path(args.corpus) if args.corpus.endswith(".parquet") else Path(args.corpus_dir) / f"{args.corpus}.parquet"
    work_dir = Path(tempfile.mkdtemp(prefix="embedq-hostbench-"))
    try:
        result = run(corpus, args.repeat, args.rate, pretokenize=args.tokenize == "producer",
                     window_docs=args.window_docs, token_budget=args.token_budget,
                     commit_threads=args.commit_threads, redis_url=args.redis, work_dir=work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"{result['corpus']}: {result['documents']:,} documents in {result['seconds']:.2f} s = "
          f"{result['docs_per_s']:,.0f} docs/s, {result['tokens_per_s'] / 1e6:.2f}M tokens/s; "
          f"device ceiling {result['device_ceiling_docs_per_s']:,.0f} docs/s, busy {result['device_busy']:.0%}")


if __name__ == "__main__":
    main()
