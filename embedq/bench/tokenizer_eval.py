"""Can a faster WordPiece tokenizer replace `tokenizers` without changing a single id?

    python -m embedq.bench.tokenizer_eval --corpus-dir DIR --processes 14 [--json out.json]
        [--candidates NAME ...] [--model DIR] [--repeats 5] [--limit N]

DIR holds Parquet corpora with a `text` column (glosses*.parquet and passages*.parquet, as
shared/corpus/make.py writes them). The model is embedq's default (all-MiniLM-L6-v2) or --model DIR.
The candidates (`embedq.bench.tokenizer_candidates`): tokenizers (the reference), nanotoken, tokie,
kitoken, flash-tokenizer and laghu-rs.

Each installed candidate is checked against embedq's own path (`embedq.tokenization.Tokenizer`:
`tokenizers`, specials added, truncated to max_seq_len) on every document of every corpus, on a
hand-made list of edge cases and on seeded random Unicode, comparing ids, lengths and the truncated
flag. A candidate is exact only if nothing differs. Then every candidate, exact or not, is timed
over chunks of 2048 texts: in this process pinned to one core, and through a spawn pool of N
single-threaded processes, each pinned to its own core, returning numpy arrays as `TokenizerPool`
does. A candidate's time includes its conversion to embedq's form (flat int32 ids, int32 lengths,
bool truncated). `cold` is a fresh tokenizer per pass, `warm` the same texts again: nanotoken and
tokie cache the pieces of words they have seen, so warm is an upper bound for new text. Rates are
the reference's token count over the time. The share of embedq's `tokenizers` time spent moving ids
out of its Encodings is measured too. Candidates that are not installed are skipped with a note;
only numpy, pyarrow and tokenizers are required.

The truncated flag: `tokenizers` has it only as `Encoding.overflowing` (a list of Encodings, slow to
read) and the candidates have no such field, so embedq's path and the candidates truncate at
max_seq_len + 1 (or add the specials to pieces cut short) and a row longer than max_seq_len loses its
last word piece before [SEP] (`embedq.tokenization._cut`). That equals truncating at max_seq_len,
which the comparison confirms.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedq.bench.tokenizer_candidates import CANDIDATES, REFERENCE, edge_cases, installed, pieces_by_id, random_unicode
from embedq.tokenization import Encode, TokenizedDocs

CHUNK = 2048  # texts per encode call, as TokenizerPool hands them to its processes


def single_threaded() -> None:
    """One thread per process: rayon (tokenizers and most Rust candidates), OpenMP (flash-tokenizer)."""
    os.environ.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                      HF_HUB_OFFLINE="1")


# ---- exactness ------------------------------------------------------------------------------------

def mismatched(ref: TokenizedDocs, got: TokenizedDocs) -> list[int]:
    """Indices of the documents whose ids, length or truncated flag differ."""
    if len(got) != len(ref):
        return list(range(len(ref)))
    bad = (ref.lengths != got.lengths) | (ref.truncated != got.truncated)
    if not bad.any():
        if np.array_equal(ref.tokens, got.tokens):
            return []
        doc = np.repeat(np.arange(len(ref)), ref.lengths)
        bad[doc[ref.tokens != got.tokens]] = True
    else:
        bad |= np.array([not np.array_equal(ref.tokens[a:b], got.tokens[c:d]) for a, b, c, d in
                         zip(ref.offsets[:-1], ref.offsets[1:], got.offsets[:-1], got.offsets[1:], strict=True)])
    return np.flatnonzero(bad).tolist()


def _encode_safely(encode: Encode, texts: list[str]) -> tuple[TokenizedDocs | None, dict[int, str]]:
    """`encode(texts)`, or document by document where the batch raises: (docs or None, errors by index)."""
    try:
        return encode(texts), {}
    except Exception:
        errors = {}
        for i, text in enumerate(texts):
            try:
                encode([text])
            except Exception as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"[:200]
        return None, errors


def check(encode: Encode, reference: Encode, texts: list[str], vocab: list[str]) -> dict[str, Any]:
    """Mismatching documents of `encode` against `reference` over `texts`, with the first example."""
    bad: list[int] = []
    example: dict[str, Any] | None = None
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start:start + CHUNK]
        ref = reference(chunk)
        got, errors = _encode_safely(encode, chunk)
        local = list(range(len(chunk))) if got is None else mismatched(ref, got)
        bad += [start + i for i in local]
        if local and example is None:
            i = local[0]
            example = {"doc": start + i, "text": chunk[i][:100]}
            if got is None:
                example["error"] = errors.get(i, "batch failed")
            else:
                example.update(_first_difference(ref, got, i, vocab))
    return {"docs": len(texts), "mismatched": len(bad), "example": example}


def _first_difference(ref: TokenizedDocs, got: TokenizedDocs, i: int, vocab: list[str]) -> dict[str, Any]:
    """Where document i first differs, with the word pieces around that place."""
    expected = ref.tokens[ref.offsets[i]:ref.offsets[i + 1]]
    actual = got.tokens[got.offsets[i]:got.offsets[i + 1]]
    n = min(len(expected), len(actual))
    at = int(np.argmax(expected[:n] != actual[:n])) if (expected[:n] != actual[:n]).any() else n

    def pieces(ids: np.ndarray) -> list[str]:
        return [vocab[t] if 0 <= t < len(vocab) else str(t) for t in ids[max(0, at - 2):at + 6].tolist()]

    return {"at": at, "lengths": [len(expected), len(actual)],
            "truncated": [bool(ref.truncated[i]), bool(got.truncated[i])],
            "expected": pieces(expected), "got": pieces(actual)}


# ---- speed ----------------------------------------------------------------------------------------

def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """This process on one core while it is timed: tokie sizes its threads by the cores it may use
    and has no other knob; the rest are single-threaded already (cpu_per_wall shows it)."""
    cores = _cores()
    if cores:
        os.sched_setaffinity(0, cores[:1])
    try:
        yield
    finally:
        if cores:
            os.sched_setaffinity(0, cores)


def time_single(load: Callable[[], Encode], chunks: list[list[str]], repeats: int) -> dict[str, float]:
    """Median seconds per pass over `chunks`: `cold_s` with a fresh tokenizer each pass (caches fill
    within the pass, as over new text), `warm_s` over the same texts again (every word cached: an
    upper bound); `cpu_per_wall` is about 1.0 when the candidate really runs on one thread."""
    wall, cpu = [], []

    def one_pass(encode: Encode) -> float:
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        for chunk in chunks:
            encode(chunk)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
        return wall[-1]

    with one_core():
        cold = [one_pass(load()) for _ in range(repeats)]
        encode = load()
        one_pass(encode)
        warm = [one_pass(encode) for _ in range(repeats)]
    return {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm), "cpu_per_wall": sum(cpu) / sum(wall)}


_process_encode: Encode | None = None


def _start_process(name: str, tokenizer_file: str, max_len: int, started: Any, cores: list[int]) -> None:
    global _process_encode
    single_threaded()
    if cores:  # one core each, in turn, so that no candidate can use more than its share
        with started.get_lock():
            os.sched_setaffinity(0, {cores[started.value % len(cores)]})
            started.value += 1
    _process_encode = CANDIDATES[name].load(Path(tokenizer_file), max_len)


def _encode_in_process(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _process_encode is not None
    docs = _process_encode(texts)
    return docs.tokens, docs.lengths, docs.truncated


def time_pool(name: str, tokenizer_file: Path, max_len: int, chunks: list[list[str]], processes: int,
              repeats: int) -> float:
    """Median seconds for `chunks` through a spawn pool of `processes` single-threaded processes, each
    pinned to a core, a fresh pool each repeat (cold caches), started before the clock as
    TokenizerPool starts it."""
    context = multiprocessing.get_context("spawn")
    passes = []
    for _ in range(repeats):
        initargs = (name, str(tokenizer_file), max_len, context.Value("i", 0), _cores())
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_start_process,
                                                    initargs=initargs) as pool:
            list(pool.map(_encode_in_process, [["warm up"]] * processes))
            started = time.perf_counter()
            for _result in pool.map(_encode_in_process, chunks):
                pass
            passes.append(time.perf_counter() - started)
    return statistics.median(passes)


# ---- the run --------------------------------------------------------------------------------------

def load_corpora(corpus_dir: Path, limit: int | None) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    corpora = {}
    for name in ("glosses", "passages"):
        files = sorted(corpus_dir.glob(f"{name}*.parquet"))
        if not files:
            raise SystemExit(f"No {name}*.parquet in {corpus_dir}; build it with shared/corpus/make.py {corpus_dir}.")
        texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
        corpora[name] = texts[:limit]
    return corpora


def chunks_of(texts: list[str]) -> list[list[str]]:
    return [texts[i:i + CHUNK] for i in range(0, len(texts), CHUNK)]


def exactness(encode: Encode, reference: Encode, corpora: dict[str, list[str]], cases: dict[str, str],
              vocab: list[str]) -> dict[str, Any]:
    """Mismatches per corpus (and on random Unicode), the edge cases that differ, and the verdict."""
    counts = {corpus: check(encode, reference, texts, vocab) for corpus, texts in corpora.items()}
    counts["random_unicode"] = check(encode, reference, random_unicode(2000), vocab)
    failing = {}
    for case, text in cases.items():
        result = check(encode, reference, [text], vocab)
        if result["mismatched"]:
            failing[case] = result["example"]
    exact = not failing and all(r["mismatched"] == 0 for r in counts.values())
    return {"exact": exact, "corpora": counts, "edge_cases_failing": failing}


def speed(name: str, tokenizer_file: Path, max_len: int, texts: list[str], tokens: int, processes: int,
          repeats: int) -> dict[str, float]:
    """Reference tokens per second of candidate `name` over `texts`: one core, and a pool of `processes`."""
    chunks = chunks_of(texts)
    timing = time_single(lambda: CANDIDATES[name].load(tokenizer_file, max_len), chunks, repeats)
    out = {"tokens_per_s": tokens / timing["cold_s"], "warm_tokens_per_s": tokens / timing["warm_s"],
           "cpu_per_wall": timing["cpu_per_wall"]}
    if processes > 0:
        # Enough chunks that every process gets several (the passages make only 8 of 2048).
        copies = max(1, -(-4 * processes // len(chunks)))
        seconds = time_pool(name, tokenizer_file, max_len, chunks * copies, processes, repeats)
        out["pool_tokens_per_s"] = tokens * copies / seconds
        out["pool_copies"] = copies
    return out


def evaluate(names: list[str], tokenizer_file: Path, max_len: int, corpora: dict[str, list[str]],
             processes: int, repeats: int) -> dict[str, Any]:
    """Exactness and speed of each candidate in `names` (the reference first)."""
    reference = CANDIDATES[REFERENCE].load(tokenizer_file, max_len)
    cases, vocab = edge_cases(max_len), pieces_by_id(tokenizer_file)
    tokens = {corpus: sum(int(reference(chunk).lengths.sum()) for chunk in chunks_of(texts))
              for corpus, texts in corpora.items()}
    results: dict[str, Any] = {}
    for name in names:
        results[name] = {"version": installed(name), "how": CANDIDATES[name].how,
                         **exactness(CANDIDATES[name].load(tokenizer_file, max_len), reference, corpora, cases, vocab),
                         "speed": {corpus: speed(name, tokenizer_file, max_len, texts, tokens[corpus], processes,
                                                 repeats) for corpus, texts in corpora.items()}}
        print(f"  {name}: done", flush=True)
    return {"candidates": results, "reference_tokens": tokens,
            "extraction_share": extraction_share(tokenizer_file, max_len, corpora, repeats)}


def extraction_share(tokenizer_file: Path, max_len: int, corpora: dict[str, list[str]],
                     repeats: int) -> dict[str, float]:
    """The part of the time spent moving ids out of the Encodings: embedq's `Tokenizer.encode` on its
    `tokenizers` path against `encode_batch_fast` alone, set up as that path sets it up. The two are
    timed chunk by chunk in turn, so that a busy machine slows both alike."""
    from tokenizers import Tokenizer as HFTokenizer

    bare = HFTokenizer.from_file(str(tokenizer_file))
    bare.no_padding()
    bare.enable_truncation(max_length=max_len + 1)
    steps: tuple[Encode, Callable[[list[str]], object]] = (
        CANDIDATES[REFERENCE].load(tokenizer_file, max_len),
        lambda t: bare.encode_batch_fast(t, add_special_tokens=True))
    share = {}
    with one_core():
        for corpus, texts in corpora.items():
            seconds = [0.0, 0.0]
            for _ in range(repeats):
                for chunk in chunks_of(texts):
                    for i, step in enumerate(steps):
                        started = time.perf_counter()
                        step(chunk)
                        seconds[i] += time.perf_counter() - started
            share[f"{corpus}/encode_batch_fast"] = 1.0 - seconds[1] / seconds[0]
    return share


def print_table(evaluation: dict[str, Any], corpora: list[str], processes: int) -> None:
    """Millions of tokens/s: cold (fresh tokenizer per pass), warm (same texts again), x the reference
    (cold), and through the pool; then mismatches and the first example of each failure."""
    print(f"{'':26}" + "".join(f"{c:^44}" for c in corpora))
    pool = f"{processes}p" if processes else "pool"
    columns = f"{'cold':>10} {'warm':>8} {'x ref':>6} {pool:>9}    "
    print(f"{'candidate':16} {'version':6} exact" + columns * len(corpora))
    results = evaluation["candidates"]
    ref = results[REFERENCE]["speed"]
    for name, r in results.items():
        row = f"{name:16} {r['version'][:6]:6} {'yes' if r['exact'] else 'NO':5}"
        for c in corpora:
            s = r["speed"][c]
            pool = f"{s['pool_tokens_per_s'] / 1e6:9.2f}" if processes else f"{'-':>9}"
            row += (f"{s['tokens_per_s'] / 1e6:10.2f} {s['warm_tokens_per_s'] / 1e6:8.2f} "
                    f"{s['tokens_per_s'] / ref[c]['tokens_per_s']:6.1f} {pool}    ")
        print(row)
    for name, r in results.items():
        counts = ", ".join(f"{c} {v['mismatched']}/{v['docs']}" for c, v in r["corpora"].items())
        cpu = ", ".join(f"{r['speed'][c]['cpu_per_wall']:.2f}" for c in corpora)
        print(f"\n{name} ({r['how']}): mismatched {counts}; cpu/wall {cpu}")
        for case, example in r["edge_cases_failing"].items():
            print(f"  edge case {case}: {json.dumps(example, ensure_ascii=False)[:400]}")
        for c, v in r["corpora"].items():
            if v["example"]:
                print(f"  first {c} mismatch: {json.dumps(v['example'], ensure_ascii=False)[:400]}")
    print("\nshare of embedq's encode time spent extracting ids: "
          + ", ".join(f"{c} {v:.0%}" for c, v in evaluation["extraction_share"].items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus-dir", type=Path, required=True, help="holds glosses*.parquet, passages*.parquet")
    parser.add_argument("--processes", type=int, default=0, help="also time a spawn pool of N processes (0: not)")
    parser.add_argument("--model", default=None, help="model directory (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), help="names to evaluate")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per measurement (median)")
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each corpus only")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    single_threaded()
    from embedq.model import load_model_info

    info = load_model_info(args.model)
    names = [REFERENCE] + [n for n in args.candidates if n != REFERENCE]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    missing = [n for n in names if installed(n) is None]
    for name in missing:
        print(f"skipped {name}: not installed (pip install {CANDIDATES[name].pip})")
    corpora = load_corpora(args.corpus_dir, args.limit)
    print(f"model {info.name} ({info.tokenizer_file}), max_seq_len {info.max_seq_len}; "
          + ", ".join(f"{c} {len(t)} docs" for c, t in corpora.items()), flush=True)
    evaluation = evaluate([n for n in names if n not in missing], info.tokenizer_file, info.max_seq_len, corpora,
                          args.processes, args.repeats)
    print_table(evaluation, list(corpora), args.processes)
    if args.json is not None:
        machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "processor": platform.processor(),
                   "processes": args.processes, "repeats": args.repeats, "chunk": CHUNK}
        args.json.write_text(json.dumps({"machine": machine, "skipped": missing, **evaluation}, indent=1))


if __name__ == "__main__":
    main()
