"""The WordPiece tokenizers that `embedq.bench.tokenizer_eval` compares, and the texts it compares them on.

Each candidate is loaded from the model's tokenizer.json and max_seq_len into an `Encode` (texts ->
`TokenizedDocs`: flat int32 ids, int32 lengths, bool truncated), converting the library's output to
embedq's form. The candidates' libraries are optional and imported only when one is loaded.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from embedq.tokenization import Encode, TokenizedDocs, Tokenizer, _cut

CLS, SEP = "[CLS]", "[SEP]"


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
# Rows cut at max_len + 1 ids become embedq's truncation at max_len through embedq.tokenization._cut.

def _flatten(rows: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Lists (or arrays) of ids to one flat int32 array and int32 lengths, reading each row once."""
    lengths = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
    tokens = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    return tokens, lengths


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


def _vocabulary(tokenizer_file: Path) -> dict[str, int]:
    return dict(json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]["vocab"])


def pieces_by_id(tokenizer_file: Path) -> list[str]:
    """The WordPiece vocabulary of tokenizer.json, indexed by id."""
    vocab = _vocabulary(tokenizer_file)
    return sorted(vocab, key=vocab.__getitem__)


@functools.cache
def _vocab_file(tokenizer_file: Path) -> str:
    """vocab.txt written from tokenizer.json's WordPiece vocabulary, so both hold the same ids."""
    path = Path(tempfile.mkdtemp(prefix="tokenizer-eval-")) / "vocab.txt"
    path.write_text("".join(piece + "\n" for piece in pieces_by_id(tokenizer_file)), encoding="utf-8")
    return str(path)


def _special_ids(tokenizer_file: Path) -> tuple[int, int]:
    vocab = _vocabulary(tokenizer_file)
    return vocab[CLS], vocab[SEP]


# ---- candidates -----------------------------------------------------------------------------------
# Each loader takes (tokenizer.json, max_seq_len) and returns an Encode: texts -> TokenizedDocs.

def _module(name: str) -> Any:
    """A candidate's module, imported by name when it is loaded: each is optional, and most ship no
    type information, so the type checker needs none of them installed."""
    return importlib.import_module(name)


def _load_tokenizers(path: Path, max_len: int) -> Encode:
    return Tokenizer(path, max_len, library="tokenizers").encode  # embedq's `tokenizers` path, the reference


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
    cls, sep = _special_ids(path)
    # encode_all gives word pieces only: [CLS] and [SEP] are added here.
    return lambda texts: _add_specials(*_flatten(tok.encode_all(texts, True)), cls, sep, max_len)


def _load_flash_tokenizer(path: Path, max_len: int) -> Encode:
    normalizer = json.loads(path.read_text(encoding="utf-8"))["normalizer"]
    tok = _module("flash_tokenizer._core").FlashBertTokenizer(
        _vocab_file(path), bool(normalizer.get("lowercase", True)), max_len + 1,
        bool(normalizer.get("handle_chinese_chars", True)))
    # padding "longest" returns unpadded rows; parallel=False keeps OpenMP off.
    return lambda texts: _cut(*_flatten(tok.batch_encode(texts, "longest", max_len + 1, False)), max_len)


def _load_laghu_rs(path: Path, max_len: int) -> Encode:
    tok = _module("laghu_rs").WordPiece(path.read_text(encoding="utf-8"))
    cls, sep = _special_ids(path)
    # Word pieces only, cut to max_len - 1 so that a cut is seen; [CLS] and [SEP] are added here.
    return lambda texts: _add_specials(*_flatten(tok.batch(texts, max_len=max_len - 1, threads=1)), cls, sep,
                                       max_len)


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
    "nanotoken": Candidate("nanotoken", "nanotoken", _load_nanotoken,
                           "WordPieceTokenizer.from_json, encode_batch(max_length, parallel=False)"),
    "tokie": Candidate("tokie", "tokie", _load_tokie, "Tokenizer.from_json, enable_truncation, encode_batch"),
    "kitoken": Candidate("kitoken", "kitoken", _load_kitoken, "from_tokenizers_file, encode_all, specials added"),
    "flash-tokenizer": Candidate("flash_tokenizer", "flash-tokenizer", _load_flash_tokenizer,
                                 "FlashBertTokenizer(vocab.txt), batch_encode(parallel=False)"),
    "laghu-rs": Candidate("laghu_rs", "laghu-rs", _load_laghu_rs, "WordPiece(json).batch(threads=1), specials added"),
}


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
