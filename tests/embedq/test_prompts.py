"""Prompts: the model's own default, --prompt-name and --prompt, counted in the tokens, cut after the
prompt, and left out of pooling where the model was trained so; vectors as sentence-transformers'.

MiniLM has no prompts, so the tests give a copy of it some (`config_sentence_transformers.json`) and
a Pooling config with `include_prompt: false`, and hold embedq against sentence-transformers'
`encode(prompt_name=...)` on that same directory.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedq.errors import ModelError
from embedq.model import ModelInfo, load_model_info, prompt_length
from embedq.tokenization import Tokenizer

PROMPTS = {"query": "query: ", "document": "passage: ", "long": "Represent this scientific passage for retrieval: "}
TEXTS = ["The cat sat on the mat.", "Prompts go before the text and count in its tokens.", "x",
         "A long document that the maximum length cuts after the prompt. " * 40]


def prompted_copy(source: Path, target: Path, *, include_prompt: bool, default: str | None = "document") -> Path:
    """`source` (a sentence-transformers directory) with PROMPTS, a default prompt, and `include_prompt`."""
    target.mkdir()
    for item in source.iterdir():
        if item.name not in ("config_sentence_transformers.json", "1_Pooling"):
            (target / item.name).symlink_to(item)
    (target / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": PROMPTS, "default_prompt_name": default, "similarity_fn_name": "cosine"}))
    (target / "1_Pooling").mkdir()
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    (target / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": include_prompt}))
    return target


@pytest.fixture(scope="module")
def excluding(model_info: ModelInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with prompts, pooling without the prompt's tokens (INSTRUCTOR-style)."""
    return prompted_copy(model_info.path, tmp_path_factory.mktemp("prompted") / "exclude", include_prompt=False)


@pytest.fixture(scope="module")
def including(model_info: ModelInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with prompts, pooling over every token (e5, bge, nomic)."""
    return prompted_copy(model_info.path, tmp_path_factory.mktemp("prompted") / "include", include_prompt=True)


@functools.cache
def st_model(path: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def st_encode(path: Path, texts: list[str], **kwargs: object) -> np.ndarray:
    return np.asarray(st_model(path).encode(texts, **kwargs))


_EMBEDDERS: dict[tuple[Any, ...], Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_embedders() -> Iterator[None]:
    yield
    for embedder in _EMBEDDERS.values():
        embedder.close()
    _EMBEDDERS.clear()
    st_model.cache_clear()


def embedq_encode(path: Path, texts: list[str], **kwargs: str | None) -> np.ndarray:
    """embedq's vectors through the Python API (the worker's tokenizer, engine and pooling)."""
    from embedq.api import Embedder

    key = (path, *sorted(kwargs.items()))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder(path, device="cpu", backend="torch", threads=2, tokenizer_processes=0, **kwargs)
    return _EMBEDDERS[key].encode(texts)


def test_the_models_default_prompt_applies_unless_another_is_asked_for(excluding: Path) -> None:
    info = load_model_info(excluding)
    assert info.prompts == tuple(sorted(PROMPTS.items())) and info.default_prompt_name == "document"
    assert (info.prompt, info.prompt_name, info.include_prompt) == ("passage: ", "document", False)
    assert load_model_info(excluding, prompt_name="query").prompt == "query: "
    assert load_model_info(excluding, prompt="search_document: ", prompt_name="query").prompt == "search_document: "
    none = load_model_info(excluding, prompt="")
    assert (none.prompt, none.prompt_name, none.pool_skip) == ("", None, 0)
    with pytest.raises(ModelError, match=r"no prompt named 'passage'.*document, long, query"):
        load_model_info(excluding, prompt_name="passage")


def test_a_model_without_prompts_gets_none(model_info: ModelInfo) -> None:
    assert (model_info.prompt, model_info.prompts, model_info.include_prompt, model_info.pool_skip) == ("", (), True, 0)
    assert load_model_info(model_info.path, prompt="query: ").prompt == "query: "


def test_the_prompt_length_left_out_of_pooling_is_sentence_transformers(excluding: Path) -> None:
    model = st_model(excluding)
    for prompt in PROMPTS.values():
        theirs = model.preprocess(["x"], prompt=prompt)["prompt_length"]
        assert prompt_length(load_model_info(excluding).tokenizer_file, prompt) == theirs
        assert load_model_info(excluding, prompt=prompt).pool_skip == theirs


def test_prompt_tokens_count_in_every_length_and_truncation_cuts_the_text(excluding: Path) -> None:
    from transformers import AutoTokenizer

    info = load_model_info(excluding)
    docs = Tokenizer(info.tokenizer_file, info.max_seq_len, prompt=info.prompt).encode(TEXTS)
    hf = AutoTokenizer.from_pretrained(str(excluding))
    theirs = hf([info.prompt + text for text in TEXTS], truncation=True, max_length=info.max_seq_len)["input_ids"]
    assert docs.lengths.tolist() == [len(ids) for ids in theirs]
    assert docs.truncated.tolist() == [False, False, False, True]
    long_ids = docs.tokens[docs.offsets[3]:docs.offsets[4]].tolist()
    assert long_ids == theirs[3] and hf.decode(long_ids[1:4]) == "passage : a"  # the prompt stays, the text is cut


@pytest.mark.parametrize("prompt_name", [None, "query", "long"])
def test_vectors_equal_sentence_transformers_with_the_prompt_left_out_of_pooling(
        excluding: Path, prompt_name: str | None) -> None:
    theirs = st_encode(excluding, TEXTS, prompt_name=prompt_name)
    mine = embedq_encode(excluding, TEXTS, prompt_name=prompt_name)
    np.testing.assert_allclose(mine, theirs, atol=2e-6)
    # The exclusion is real: pooling over the prompt too gives other vectors.
    assert np.abs(mine - embedq_encode(excluding, TEXTS, prompt="", prompt_name=None)).max() > 1e-2


def test_vectors_equal_sentence_transformers_with_the_prompt_pooled(including: Path, excluding: Path) -> None:
    theirs = st_encode(including, TEXTS)
    mine = embedq_encode(including, TEXTS)
    np.testing.assert_allclose(mine, theirs, atol=2e-6)
    assert np.abs(mine - embedq_encode(excluding, TEXTS)).max() > 1e-2  # the two poolings differ
    np.testing.assert_allclose(embedq_encode(including, TEXTS, prompt="title: "),
                               st_encode(including, TEXTS, prompt="title: "), atol=2e-6)


def test_a_prompt_longer_than_the_maximum_length_is_refused(excluding: Path) -> None:
    with pytest.raises(ModelError, match="leaves no room for text"):
        load_model_info(excluding, prompt="word " * 300)


def test_a_prompts_file_that_is_not_a_mapping_is_refused(model_info: ModelInfo, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_info.path, broken, symlinks=True, ignore=shutil.ignore_patterns("*.safetensors"))
    (broken / "model.safetensors").symlink_to(model_info.path / "model.safetensors")
    (broken / "config_sentence_transformers.json").write_text(json.dumps({"prompts": ["query: "]}))
    with pytest.raises(ModelError, match="must map names to prompt texts"):
        load_model_info(broken)
