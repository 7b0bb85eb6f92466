"""The engine stage's ordering and the tokenizer pool, on CPU, with an engine that answers late."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from embedq.engines.base import EngineBase, EngineConfig, Profile
from embedq.tokenization import TokenizedDocs, Tokenizer, TokenizerPool
from embedq.worker.buckets import profile_table
from embedq.worker.pipeline import EngineStats, embed_documents


class LateEngine(EngineBase):
    """An asynchronous engine stand-in: results are computed only when collected, from the ids
    themselves (first token, length, sum), so a result landing on the wrong document shows. It
    checks what a real GPU engine requires: shapes within the profile, and at most `depth` batches
    in flight."""

    name = "late"

    def __init__(self, config: EngineConfig, depth: int) -> None:
        super().__init__(config)
        self.depth = depth
        self.in_flight: collections.deque = collections.deque()
        self.most_in_flight = 0

    @property
    def dim(self) -> int:
        return 3

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray):  # type: ignore[no-untyped-def]
        from embedq.engines.base import check_batch

        check_batch(self.profiles, input_ids, lengths)
        ids, lens = input_ids.copy(), lengths.copy()
        input_ids.fill(-1)  # the caller may reuse its buffers as soon as submit returns
        engine = self

        class Later:
            def result(self) -> np.ndarray:
                engine.in_flight.remove(self)
                mask = np.arange(ids.shape[1])[None, :] < lens[:, None]
                return np.stack([ids[:, 0], lens, (ids * mask).sum(axis=1)], axis=1).astype(np.float32)

        later = Later()
        self.in_flight.append(later)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        return later


def random_docs(n: int, seed: int) -> TokenizedDocs:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, size=n).astype(np.int32)
    tokens = rng.integers(1000, 30000, size=int(lengths.sum())).astype(np.int32)
    return TokenizedDocs(tokens, lengths, np.zeros(n, bool))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_every_document_gets_its_own_result_whatever_order_batches_finish(model_info, depth: int) -> None:
    docs = random_docs(3000, seed=depth)
    config = EngineConfig(model=model_info, profiles=profile_table(256, 2048))
    engine = LateEngine(config, depth)
    stats = EngineStats()
    out = embed_documents(engine, docs, pad_id=0, depth=depth, stats=stats)
    offsets = docs.offsets
    expected = np.stack([docs.tokens[offsets[:-1]], docs.lengths,
                         [docs.tokens[offsets[i]:offsets[i + 1]].sum() for i in range(len(docs))]], axis=1)
    assert np.array_equal(out, expected.astype(np.float32))
    assert engine.most_in_flight <= depth and not engine.in_flight
    assert stats.documents == 3000 and stats.real_tokens == int(docs.lengths.sum())
    assert 1.0 <= stats.padding_ratio < 1.5


def test_a_subset_of_documents_is_embedded_in_the_order_asked(model_info) -> None:
    docs = random_docs(500, seed=9)
    engine = LateEngine(EngineConfig(model=model_info, profiles=profile_table(256, 1024)), 2)
    picked = np.array([499, 3, 250, 7])
    out = embed_documents(engine, docs, 0, indices=picked)
    assert out[:, 1].tolist() == docs.lengths[picked].tolist()


def test_the_tokenizer_pool_gives_the_same_ids_in_order_as_one_tokenizer(model_info, gloss_texts) -> None:
    texts = [*gloss_texts[:5000], "a passage " * 300]  # one truncated document
    local = Tokenizer(model_info.tokenizer_file, model_info.max_seq_len).encode(texts)
    with TokenizerPool(model_info.tokenizer_file, model_info.max_seq_len, processes=2, chunk_size=700) as pool:
        pooled = pool.encode(texts)
        first, second = pool.submit(texts[:10]), pool.submit(texts[10:20])
        assert second.result().lengths.tolist() == local.lengths[10:20].tolist()
        assert first.result().lengths.tolist() == local.lengths[:10].tolist()
    assert np.array_equal(pooled.tokens, local.tokens) and np.array_equal(pooled.lengths, local.lengths)
    assert pooled.truncated.tolist() == local.truncated.tolist() and pooled.truncated[-1]


def test_profiles_are_checked_on_submit(model_info) -> None:
    engine = LateEngine(EngineConfig(model=model_info, profiles=(Profile(8, 4),)), 2)
    with pytest.raises(ValueError, match="no profile"):
        engine.submit(np.zeros((2, 9), np.int32), np.array([1, 1], np.int32))
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(np.zeros((5, 8), np.int32), np.ones(5, np.int32))
