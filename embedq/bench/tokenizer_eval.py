"""Can a faster WordPiece tokenizer replace `tokenizers` without changing a single id?

    python -m embedq.bench.tokenizer_eval --corpus-dir DIR --processes 14 [--json out.json]

DIR holds Parquet corpora with a `text` column (glosses*.parquet and passages*.parquet, as
shared/corpus/make.py writes them). The model is embedq's default (all-MiniLM-L6-v2) or --model DIR.

Each installed candidate is checked against embedq's own path (`embedq.tokenization.Tokenizer`:
`tokenizers`, specials added, truncated to max_seq_len) on every document of every corpus, on a
hand-made list of edge cases and on seeded random Unicode, comparing ids, lengths and the truncated
flag. A candidate is exact only if nothing differs. Then every candidate, exact or not, is timed
over chunks of 2048 texts: in this process pinned to one core, and through a spawn pool of N
single-threaded processes, each pinned to its own core, returning numpy arrays as `TokenizerPool`
does. A candidate's time includes its conversion to embedq's form (flat int32 ids, int32 lengths,
bool truncated). `cold` is a fresh tokenizer per pass, `warm` the same texts again: nanotoken and
tokie cache the pieces of words they have seen, so warm is an upper bound for new text. Rates are
the reference's token count over the time. The share of `tokenizers` time spent moving ids out of
its Encodings is measured too. Candidates that are not installed are skipped with a note; only
numpy, pyarrow and tokenizers are required.

The truncated flag: `tokenizers` reports it through `Encoding.overflowing`; the candidates have no
such field, so they truncate at max_seq_len + 1 and a row longer than max_seq_len loses its last
word piece before [SEP]. That equals truncating at max_seq_len, which the comparison confirms.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import importlib
import itertools
import json
import multiprocessing
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from embedq.tokenization import Encode, TokenizedDocs, Tokenizer

CHUNK = 2048  # texts per encode call, as TokenizerPool hands them to its processes
CLS, SEP, UNK = "[CLS]", "[SEP]", "[UNK]"


def edge_cases(max_seq_len: int) -> dict[str, str]:
    """Named texts where WordPiece implementations tend to disagree."""
    return {
        "accents": "Café résumé naïve jalapeño Ålborg Über señor Øre façade",
        "combining_marks": "cafe\u0301 n\u0303o a\u0308\u0304 Z\u0334\u0321\u0347a\u0337l\u0336g\u0335o\u0338",
        "turkish_dotted_i": "İstanbul IıİiI",
        "greek_final_sigma": "ΟΔΥΣΣΕΥΣ ΣΊΣΥΦΟΣ",
        "ligatures_fullwidth": "ß ẞ ǅ ﬁ ﬂ Ⅻ ＡＢＣ１２３ ｆｕｌｌ",
        "chinese": "我爱北京天安门。这是一个测试，中文按字切分。𠀀𠀁 hello世界foo",
        "japanese": "東京は日本の首都です。ひらがなとカタカナ、ｶﾀｶﾅ半角。",
        "korean": "안녕하세요 세계, 한국어 텍스트입니다. ᄀᄁ ㄱㄲ",
        "emoji_zwj": "I ❤️ 👨‍👩‍👧‍👦 and 🏳️‍🌈 🇯🇵 👍🏽 😀😀 ⌚ ©️",
        "control_chars": "a\x00b\x07c\td\re\u200bf\ufeffg\u00adh i\x0bj\x0ck\x1fl\x7fm\x85n\ufffdo",
        "unicode_spaces": "a\u00a0b\u2003c\u3000d\u2028e\u2029f\u202fg\u1680h",
        "format_chars": "a\u2063b c\u205fd e\u2060f g\u200dh i\u200cj \u2066k\u2069 \u180el",
        # U+061D is assigned since Unicode 14; the others are unassigned.
        "unassigned_code_points": "ab\u0378cd word\u05cd x\u0590y z\u061d",
        "word_500_a": "a" * 500,
        "word_100_a": "a" * 100,
        "word_101_a": "a" * 101,
        "word_100_e_acute": "é" * 100,
        "punctuation_runs": "!!!???...,,,;;;---___***((()))[[[]]]{{{}}}\'\'\'\"\"\"```~~~@@@###$$%%^^&&|||\\\\//<<>>",
        "unicode_punctuation": "«quoted» „German“ — dash – … ¿Qué? ¡Sí! 「括弧」 ‘single’ ※ § ¶ • ·",
        "arabic": "مرحبا بالعالم، هذا نص عربي مع تشكيل: مُحَمَّد.",
        "hebrew": "שלום עולם, זהו טקסט בעברית עם ניקוד: שָׁלוֹם.",
        "cyrillic": "Привет, мир! Ёлка и йогурт. ЁЛКА",
        "greek": "Γειά σου Κόσμε· ΆΈΉ ϊΐ ὅτι",
        "thai": "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
        "devanagari": "नमस्ते दुनिया, हिन्दी पाठ। क़ ज़",
        "numbers": "3.14159 1,000,000 2024-11-30 ½ ² ⅔ ١٢٣ ०१२ 1e-9 0x1F $5.99 50% №5 ①",
        "urls": "https://example.com/path?q=a&b=c#frag user@example.org www.test-site.co.uk/~user/i.html",
        "special_token_text": "[CLS] hello [SEP] world [PAD] [MASK] [UNK] [cls] [ SEP ]",
        "symbols": "𝐇𝐞𝐥𝐥𝐨 𝕎𝕠𝕣𝕝𝕕 ∑∫√∞ ™ ℃ ㎏ \ue000 \U0010fffd",
        "empty": "",
        "whitespace_only": "   \t\n\r\n  \u00a0",
        "paragraphs": "First paragraph.\n\nSecond paragraph.\n\n\nThird.\n",
        "long_document": "The quick brown fox jumps over the lazy dog; unaffable façades. " * 120,
        "long_cut_mid_word": "unaffable " * 200,
        f"exactly_{max_seq_len}_tokens": "a " * (max_seq_len - 2),
        f"exactly_{max_seq_len + 1}_tokens": "a " * (max_seq_len - 1),
    }


def random_unicode(count: int, seed: int = 7) -> list[str]:
    """Seeded documents of words drawn from many Unicode blocks, spaces and controls included."""
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F),
              (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2100, 0x22FF), (0x3000, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF), (0x0, 0x1F)]
    rng = random.Random(seed)

    def word() -> str:
        low, high = rng.choice(blocks)
        return "".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 12)))

    return [" ".join(word() for _ in range(rng.randint(0, 60))) for _ in range(count)]


# ---- conversions to embedq's form -----------------------------------------------------------------

def _flatten(rows: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Lists (or arrays) of ids to one flat int32 array and int32 lengths, reading each row once."""
    lengths = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
    tokens = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    return tokens, lengths


def _cut(tokens: np.ndarray, lengths: np.ndarray, max_len: int) -> TokenizedDocs:
    """Rows with specials, truncated at max_len + 1 (or not at all): a row longer than max_len keeps
    its first max_len - 1 ids and its last one ([SEP]), as truncation at max_len does."""
    lengths = lengths.astype(np.int32, copy=False)
    truncated = lengths > max_len
    if not truncated.any():
        return TokenizedDocs(tokens.astype(np.int32, copy=False), lengths, truncated)
    row_length = np.repeat(lengths, lengths)
    position = np.arange(row_length.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = (position < max_len - 1) | (position == row_length - 1)
    return TokenizedDocs(tokens[keep].astype(np.int32, copy=False), np.minimum(lengths, max_len), truncated)


def _add_specials(pieces: np.ndarray, lengths: np.ndarray, cls: int, sep: int, max_len: int) -> TokenizedDocs:
    """Rows of word pieces without specials to [CLS] pieces [SEP], cut to max_len ids in all."""
    lengths = lengths.astype(np.int64, copy=False)
    position = np.arange(pieces.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept = np.minimum(lengths, max_len - 2)
    out_lengths = (kept + 2).astype(np.int32)
    ends = np.cumsum(out_lengths)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    middle = np.ones(tokens.shape[0], dtype=bool)
    middle[ends - out_lengths] = False
    middle[ends - 1] = False
    tokens[~middle] = np.tile(np.array([cls, sep], dtype=np.int32), len(out_lengths))
    tokens[middle] = pieces[position < max_len - 2]
    return TokenizedDocs(tokens, out_lengths, lengths > max_len - 2)


def _runtime_json(tokenizer_file: Path, truncate_at: int | None) -> str:
    """tokenizer.json in the state embedq runs it: no padding, truncation at `truncate_at`."""
    config = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    config["padding"] = None
    config["truncation"] = None if truncate_at is None else {
        "direction": "Right", "max_length": truncate_at, "strategy": "LongestFirst", "stride": 0}
    return json.dumps(config)


def _vocabulary(tokenizer_file: Path) -> dict[str, int]:
    return dict(json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]["vocab"])


@functools.cache
def _vocab_file(tokenizer_file: Path) -> str:
    """vocab.txt written from tokenizer.json's WordPiece vocabulary, so both hold the same ids."""
    path = Path(tempfile.mkdtemp(prefix="tokenizer-eval-")) / "vocab.txt"
    path.write_text("".join(piece + "\n" for piece in _pieces_by_id(tokenizer_file)), encoding="utf-8")
    return str(path)


def _special_ids(tokenizer_file: Path) -> tuple[int, int, int]:
    vocab = _vocabulary(tokenizer_file)
    return vocab[CLS], vocab[SEP], vocab[UNK]


def _pieces_by_id(tokenizer_file: Path) -> list[str]:
    vocab = _vocabulary(tokenizer_file)
    return sorted(vocab, key=vocab.__getitem__)


# ---- candidates -----------------------------------------------------------------------------------
# Each loader takes (tokenizer.json, max_seq_len) and returns an Encode: texts -> TokenizedDocs.

def _module(name: str) -> Any:
    """A candidate's module, imported by name when it is loaded: each is optional, and most ship no
    type information, so the type checker needs none of them installed."""
    return importlib.import_module(name)


def _load_tokenizers(path: Path, max_len: int) -> Encode:
    return Tokenizer(path, max_len, library="tokenizers").encode  # embedq's `tokenizers` path, the reference


def _load_tokenizers_fast(path: Path, max_len: int) -> Encode:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(_runtime_json(path, max_len + 1))

    def encode(texts: list[str]) -> TokenizedDocs:
        # encode_batch_fast skips the offsets; `ids` is read once per Encoding (each read builds a
        # list), and the flag comes from the length, not from `overflowing` (a list of Encodings).
        rows = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=True)]
        return _cut(*_flatten(rows), max_len)
    return encode


def _load_nanotoken(path: Path, max_len: int) -> Encode:
    tok = _module("nanotoken").WordPieceTokenizer.from_json(path.read_text(encoding="utf-8"))

    def encode(texts: list[str]) -> TokenizedDocs:
        ids, offsets = tok.encode_batch(texts, add_special_tokens=True, max_length=max_len + 1, parallel=False)
        return _cut(ids, np.diff(offsets), max_len)
    return encode


def _load_tokie(path: Path, max_len: int) -> Encode:
    tok = _module("tokie").Tokenizer.from_json(str(path))
    tok.no_padding()
    tok.enable_truncation(max_len + 1)
    return lambda texts: _cut(*_flatten([e.ids for e in tok.encode_batch(texts)]), max_len)


def _load_kitoken(path: Path, max_len: int) -> Encode:
    tok = _module("kitoken").Kitoken.from_tokenizers_file(str(path))
    config = tok.config()
    config["processing"] = []  # drops the file's padding and truncation to 128
    tok.set_config(config)
    cls, sep, _ = _special_ids(path)
    # encode_all gives word pieces only: [CLS] and [SEP] are added here.
    return lambda texts: _add_specials(*_flatten(tok.encode_all(texts, True)), cls, sep, max_len)


def _load_flash_tokenizer(path: Path, max_len: int) -> Encode:
    normalizer = json.loads(path.read_text(encoding="utf-8"))["normalizer"]
    tok = _module("flash_tokenizer._core").FlashBertTokenizer(
        _vocab_file(path), bool(normalizer.get("lowercase", True)), max_len + 1,
        bool(normalizer.get("handle_chinese_chars", True)))
    # padding "longest" returns unpadded rows; parallel=False keeps OpenMP off.
    return lambda texts: _cut(*_flatten(tok.batch_encode(texts, "longest", max_len + 1, False)), max_len)


def _load_budtiktok(path: Path, max_len: int) -> Encode:
    tok = _module("budtiktok").Tokenizer.from_str(_runtime_json(path, None))

    def encode(texts: list[str]) -> TokenizedDocs:
        out = tok(texts, max_length=max_len + 1, padding="longest", truncation=True, return_tensors="np")
        mask = out["attention_mask"].astype(bool)
        return _cut(out["input_ids"][mask], mask.sum(axis=1), max_len)
    return encode


def _load_morpheme(path: Path, max_len: int) -> Encode:
    tok = _module("morpheme").Tokenizer.from_str(_runtime_json(path, max_len + 1))
    return lambda texts: _cut(*_flatten([e.ids for e in tok.encode_batch(texts)]), max_len)


def _load_laghu_rs(path: Path, max_len: int) -> Encode:
    tok = _module("laghu_rs").WordPiece(path.read_text(encoding="utf-8"))
    cls, sep, _ = _special_ids(path)
    # Word pieces only, cut to max_len - 1 so that a cut is seen; [CLS] and [SEP] are added here.
    return lambda texts: _add_specials(*_flatten(tok.batch(texts, max_len=max_len - 1, threads=1)), cls, sep,
                                       max_len)


def _load_blingfire(path: Path, max_len: int) -> Encode:
    blingfire = _module("blingfire")
    # Its bundled bert-base-uncased model, not the model's files: valid only for that vocabulary.
    handle = blingfire.load_model(str(Path(blingfire.__file__).parent / "bert_base_tok.bin"))
    cls, sep, unk = _special_ids(path)

    def encode(texts: list[str]) -> TokenizedDocs:
        rows = [blingfire.text_to_ids(handle, text, max_len - 1, unk, True) for text in texts]
        return _add_specials(*_flatten(rows), cls, sep, max_len)
    return encode


@dataclass(frozen=True)
class Candidate:
    """A tokenizer to compare: the module it needs, its pip name, and how it is loaded."""

    module: str
    pip: str
    load: Callable[[Path, int], Encode]
    how: str


REFERENCE = "tokenizers"
CANDIDATES: dict[str, Candidate] = {
    REFERENCE: Candidate("tokenizers", "tokenizers", _load_tokenizers, "embedq Tokenizer.encode"),
    "tokenizers-fast": Candidate("tokenizers", "tokenizers", _load_tokenizers_fast,
                                 "encode_batch_fast, ids read once, cut at max+1"),
    "nanotoken": Candidate("nanotoken", "nanotoken", _load_nanotoken,
                           "WordPieceTokenizer.from_json, encode_batch(max_length, parallel=False)"),
    "tokie": Candidate("tokie", "tokie", _load_tokie, "Tokenizer.from_json, enable_truncation, encode_batch"),
    "kitoken": Candidate("kitoken", "kitoken", _load_kitoken, "from_tokenizers_file, encode_all, specials added"),
    "flash-tokenizer": Candidate("flash_tokenizer", "flash-tokenizer", _load_flash_tokenizer,
                                 "FlashBertTokenizer(vocab.txt), batch_encode(parallel=False)"),
    "budtiktok": Candidate("budtiktok", "budtiktok", _load_budtiktok, "from_str, __call__ numpy + mask"),
    "morpheme": Candidate("morpheme", "morpheme", _load_morpheme, "from_str, encode_batch"),
    "laghu-rs": Candidate("laghu_rs", "laghu-rs", _load_laghu_rs, "WordPiece(json).batch(threads=1), specials added"),
    "blingfire": Candidate("blingfire", "blingfire", _load_blingfire, "bundled bert_base_tok.bin, text_to_ids"),
}


def single_threaded() -> None:
    """One thread per process: rayon (tokenizers and most Rust candidates), OpenMP (flash-tokenizer)."""
    os.environ.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                      HF_HUB_OFFLINE="1")


def installed(name: str) -> str | None:
    """The candidate's version, or None where it does not import."""
    candidate = CANDIDATES[name]
    try:
        _module(candidate.module)
    except ImportError:
        return None
    try:
        return metadata.version(candidate.pip)
    except metadata.PackageNotFoundError:
        return "unknown"


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
    cases, vocab = edge_cases(max_len), _pieces_by_id(tokenizer_file)
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
    """The part of the time spent moving ids out of the Encodings: embedq's `Tokenizer.encode` against
    `encode_batch` alone, and tokenizers-fast against `encode_batch_fast` alone. The two are timed
    chunk by chunk in turn, so that a busy machine slows both alike."""
    from tokenizers import Tokenizer as HFTokenizer

    bare = HFTokenizer.from_str(_runtime_json(tokenizer_file, max_len))
    bare_fast = HFTokenizer.from_str(_runtime_json(tokenizer_file, max_len + 1))
    pairs: dict[str, tuple[Encode, Callable[[list[str]], object]]] = {
        "encode_batch": (CANDIDATES[REFERENCE].load(tokenizer_file, max_len),
                         lambda t: bare.encode_batch(t, add_special_tokens=True)),
        "encode_batch_fast": (CANDIDATES["tokenizers-fast"].load(tokenizer_file, max_len),
                              lambda t: bare_fast.encode_batch_fast(t, add_special_tokens=True)),
    }
    share = {}
    with one_core():
        for corpus, texts in corpora.items():
            chunks = chunks_of(texts)
            for label, (full, tokenize) in pairs.items():
                seconds = [0.0, 0.0]
                for _ in range(repeats):
                    for chunk in chunks:
                        for i, step in enumerate((full, tokenize)):
                            started = time.perf_counter()
                            step(chunk)
                            seconds[i] += time.perf_counter() - started
                share[f"{corpus}/{label}"] = 1.0 - seconds[1] / seconds[0]
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
