"""The torch device a command runs on, checked before any work: a typo or an absent GPU is a usage error."""

from __future__ import annotations

from collections.abc import Callable

import torch

from effconv.errors import UsageError


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_count() -> int:
    mps = getattr(torch.backends, "mps", None)
    return int(mps is not None and mps.is_available())


def _xpu_count() -> int:
    xpu = getattr(torch, "xpu", None)
    return xpu.device_count() if xpu is not None and xpu.is_available() else 0


# The device kinds a model can run on, and how many of each this torch sees.
DEVICE_COUNTS: dict[str, Callable[[], int]] = {
    "cpu": lambda: 1,
    "cuda": _cuda_count,
    "mps": _mps_count,
    "xpu": _xpu_count,
}


def default_device() -> str:
    """cuda when this torch sees a GPU, else cpu."""
    return "cuda" if _cuda_count() else "cpu"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`name` (None: `default_device()`) as a torch device that exists here, else UsageError."""
    if name is None:
        return torch.device(default_device())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device: {', '.join(DEVICE_COUNTS)}, or e.g. cuda:1") from None
    if device.type not in DEVICE_COUNTS:
        raise UsageError(f"--device {name}: effconv runs models on {', '.join(DEVICE_COUNTS)}, not {device.type}")
    count = DEVICE_COUNTS[device.type]()
    if not count:
        raise UsageError(f"--device {name}: this torch ({torch.__version__}) sees no {device.type} device")
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: this torch sees {count} {device.type} device(s), numbered from 0")
    return device
