"""Which device a worker runs on: `auto` means the first CUDA GPU if torch sees one, else the CPU."""

from __future__ import annotations

import re

from embedq.errors import EngineError

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def resolve_device(name: str) -> str:
    """`cpu`, `cuda` or `cuda:N` as given (checked), or for `auto` what this machine has."""
    if name == "auto":
        return "cuda:0" if cuda_device_count() > 0 else "cpu"
    if not _DEVICE.match(name):
        raise EngineError(f"device {name!r} is not auto, cpu, cuda or cuda:N.")
    if name.startswith("cuda"):
        count = cuda_device_count()
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise EngineError(f"device {name} is not available: this machine has {count} CUDA device(s).")
        return f"cuda:{index}"
    return name


def cuda_device_count() -> int:
    """CUDA devices torch can use here (0 without torch or a GPU)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
