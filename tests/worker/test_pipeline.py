"""The engine stage's ordering and the tokenizer pool, on CPU, with an engine that answers late."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from embedq.engines.base import EngineBase, EngineConfig, Profile
from embedq.engines.profiles import profile_table
from embedq.tokenization import TokenizedDocs, Tokenizer, TokenizerPool
from embedq.worker.pipeline import END, EngineStats, Work, embed_documents, embed_stream


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


def expected(docs: TokenizedDocs) -> np.ndarray:
    """What LateEngine answers for each document."""
    offsets = docs.offsets
    sums = [docs.tokens[offsets[i]:offsets[i + 1]].sum() for i in range(len(docs))]
    return np.stack([docs.tokens[offsets[:-1]], docs.lengths, sums], axis=1).astype(np.float32)


class FailingLateEngine(LateEngine):
    """LateEngine, failing batches that hold token `poison`, on submit or when collected."""

    def __init__(self, config: EngineConfig, depth: int, poison: int, where: str) -> None:
        super().__init__(config, depth)
        self.poison, self.where = poison, where

    def submit(self, input_ids: np.ndarray, lengths: np.ndarray):  # type: ignore[no-untyped-def]
        poisoned = bool((input_ids == self.poison).any())
        if poisoned and self.where == "submit":
            raise RuntimeError("device error on submit")
        later = super().submit(input_ids, lengths)
        if not poisoned:
            return later
        engine = self

        class Broken:
            def result(self) -> np.ndarray:
                engine.in_flight.remove(later)
                raise RuntimeError("device error on collect")

        return Broken()


def feeder(works: list[Work], gaps: bool = False):  # type: ignore[no-untyped-def]
    """A `take` callback over `works`; with `gaps`, every other call finds nothing ready yet."""
    items = [END, *reversed(works)]
    calls = {"n": 0}

    def take(wait: bool):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if gaps and not wait and calls["n"] % 2:
            return None
        return items.pop()

    return take


@pytest.mark.parametrize("gaps", [False, True])
def test_the_pipeline_runs_across_window_boundaries_and_hands_windows_back_in_order(model_info, gaps) -> None:
    windows = [random_docs(300, seed=s) for s in range(5)]
    windows.insert(2, random_docs(0, seed=0))  # a window with nothing left to embed keeps its place
    engine = LateEngine(EngineConfig(model=model_info, profiles=profile_table(256, 2048)), 2)
    order, in_flight_when_handed_back = [], []
    for k, result in embed_stream(engine, feeder([Work(k, w) for k, w in enumerate(windows)], gaps), 0, depth=2):
        order.append(k)
        in_flight_when_handed_back.append(len(engine.in_flight))
        assert isinstance(result, np.ndarray) and result.shape == (len(windows[k]), 3)
        if len(windows[k]):
            assert np.array_equal(result, expected(windows[k]))
    assert order == list(range(len(windows)))
    assert engine.most_in_flight == 2 and not engine.in_flight
    if not gaps:
        # A window is handed back while the next one's first batch already runs: no idle engine between.
        assert all(n > 0 for k, n in enumerate(in_flight_when_handed_back[:-1]) if len(windows[k + 1]))


@pytest.mark.parametrize("where", ["submit", "collect"])
def test_a_failed_batch_fails_only_its_window_and_nothing_is_in_flight_when_it_is_reported(model_info, where) -> None:
    windows = [random_docs(300, seed=s) for s in range(4)]
    poison = int(windows[1].tokens[5])
    for k in (0, 2, 3):
        windows[k].tokens[windows[k].tokens == poison] = poison + 1
    engine = FailingLateEngine(EngineConfig(model=model_info, profiles=profile_table(256, 2048)), 2, poison, where)
    for k, result in embed_stream(engine, feeder([Work(k, w) for k, w in enumerate(windows)]), 0):
        if k == 1:
            assert isinstance(result, RuntimeError) and where in str(result)
            assert not engine.in_flight, "the caller gets the engine to itself to isolate the fault"
            with pytest.raises(RuntimeError):
                embed_documents(engine, windows[1], 0)
        else:
            assert np.array_equal(result, expected(windows[k]))
    assert not engine.in_flight


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


def test_the_simulated_device_of_hostbench_keeps_the_engine_contract(model_info) -> None:
    from tests.hostbench import SimulatedDevice

    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 64, size=700).astype(np.int32)
    docs = TokenizedDocs(rng.integers(1000, 30000, size=int(lengths.sum())).astype(np.int32), lengths,
                         np.zeros(700, bool))
    config = EngineConfig(model=model_info, profiles=profile_table(64, 1024))
    stats = EngineStats()
    with SimulatedDevice(config, rate=1e9) as device:
        out = embed_documents(device, docs, 0, stats=stats)
        assert out.shape == (700, model_info.dim) and out.dtype == np.float32
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        assert device.busy_seconds == pytest.approx(stats.padded_tokens / 1e9)
        first = device.submit(np.zeros((3, 16), np.int32), np.ones(3, np.int32))
        second = device.submit(np.zeros((5, 16), np.int32), np.ones(5, np.int32))
        assert second.result().shape == (5, model_info.dim) and first.result().shape == (3, model_info.dim)
        with pytest.raises(ValueError, match="no profile"):
            device.submit(np.zeros((2, 65), np.int32), np.ones(2, np.int32))


def test_an_engine_fed_without_a_pause_still_reports_its_busy_time(model_info) -> None:
    """What sizes windows by time: an engine that never idles (a GPU with windows prefetched) must not
    read as 0 s of work, or the next window never grows past its first size (found on the H200,
    2026-11-30: windows stuck at one stream message, 8.7k instead of 50k passages/s)."""
    windows = [random_docs(300, seed=s) for s in range(4)]
    engine = LateEngine(EngineConfig(model=model_info, profiles=profile_table(256, 2048)), 2)
    stats = EngineStats()
    busy = []
    for _k, _result in embed_stream(engine, feeder([Work(k, w) for k, w in enumerate(windows)], False), 0,
                                    depth=2, stats=stats):
        busy.append((stats.seconds, stats.busy_seconds()))
    assert busy[0][0] == 0.0 and busy[0][1] > 0.0  # busy from the start, never idle until the end
    assert all(later >= earlier for (_, earlier), (_, later) in itertools.pairwise(busy))
    assert stats.busy_since is None and stats.seconds == pytest.approx(stats.busy_seconds())
