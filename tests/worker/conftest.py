"""Fixtures of the worker tests: the small random BERT as a model and as an engine (torch, CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from embedq.engines.base import Engine
from embedq.model import ModelInfo, load_model_info


@pytest.fixture(scope="session")
def tiny(tiny_model: Path) -> ModelInfo:
    """The small random BERT's description (fault, chaos and lost-write tests: fast, not accurate)."""
    return load_model_info(tiny_model)


@pytest.fixture(scope="session")
def tiny_engine(tiny: ModelInfo) -> Iterator[Engine]:
    """The small random BERT on the CPU (torch backend), started once for the session."""
    from embedq.engines import create_engine
    from embedq.engines.base import EngineConfig
    from embedq.engines.profiles import profile_table

    with create_engine("torch", EngineConfig(model=tiny, profiles=profile_table(tiny.max_seq_len, 4096))) as engine:
        yield engine
