"""The engine cache: where exported and built engine files live, keyed by what decides their content.

Every file is written under a temporary name beside its final one and renamed into place, so a
worker that finds a cached file never reads a half-written one, even while another worker on the
same node is still exporting the same model.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
    key = hashlib.sha256(
        "\0".join((model.digest, model.pooling.value, str(model.normalize), *key_parts)).encode()
    ).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name.rsplit("/", 1)[-1]).strip("-.") or "model"
    return root / f"{slug}-{key}"


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside `final`; once the block succeeds it is fsynced and renamed to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer, so concurrent exports never write into one file; a leading dot and a .tmp
    # suffix keep it out of any glob for the final name. Left for the writer to create, so it gets
    # the umask's permissions (mkstemp's 0600 would hide the file from workers of other users).
    staged = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield staged
        with staged.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, final)
        _fsync_dir(final.parent)
    finally:
        staged.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
