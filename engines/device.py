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


def torch_runtime() -> dict[str, str]:
    """torch's version and, where torch sees one, the current CUDA GPU's name (for benchmark records);
    empty without torch."""
    try:
        import torch
    except ImportError:
        return {}
    info = {"torch": str(torch.__version__)}
    if torch.cuda.is_available():
        info["gpu"] = str(torch.cuda.get_device_name())
    return info


def reset_peak_memory(device: str) -> None:
    """Start counting `peak_memory_allocated` afresh on a CUDA `device`; nothing on the CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_allocated(device: str) -> int | None:
    """The most bytes torch has held on a CUDA `device` since the last reset; None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))
