"""The engine cache: where exported and built engine files live, keyed by what decides their content.

Every file is written under a temporary name beside its final one and renamed into place, so a
worker that finds a cached file never reads a half-written one, even while another worker on the
same node is still exporting the same model.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from embedq.model import ModelInfo

CACHE_DIR_ENV = "EMBEDQ_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$EMBEDQ_CACHE_DIR`, else `~/.cache/embedq/engines`."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "embedq" / "engines"


def model_cache_dir(model: ModelInfo, cache_dir: str | os.PathLike[str] | None, *key_parts: str) -> Path:
    """The folder for one model under its settings: a readable name plus a hash of what decides the files."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # A prompt left out of pooling is baked into the exported graph; keys of other models stay as they were.
    skip = (f"skip={model.pool_skip}",) if model.pool_skip else ()
    key = hashlib.sha256(
        "\0".join((model.digest, model.pooling.value, str(model.normalize), *skip, *key_parts)).encode()
    ).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name.rsplit("/", 1)[-1]).strip("-.") or "model"
    return root / f"{slug}-{key}"
