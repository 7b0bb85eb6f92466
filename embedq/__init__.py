"""embedq: bulk text embedding over Redis streams, exactly once, into Parquet.

The Python API (`Embedder`, `encode`, `submit`, `wait`; see `embedq.api`) is imported on first use,
so `import embedq` stays light: no torch, no pyarrow until something is embedded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Embedder", "__version__", "encode", "submit", "wait"]

_API = frozenset({"Embedder", "encode", "submit", "wait"})

if TYPE_CHECKING:
    from embedq.api import Embedder, encode, submit, wait


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("embedq.api"), name)
    raise AttributeError(f"module 'embedq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
