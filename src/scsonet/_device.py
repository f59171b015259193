"""Pick the compute device: the first of CUDA, Apple MPS and CPU that this machine has."""
from __future__ import annotations

import torch

from .errors import ScsonetError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, else MPS, else CPU; any other name (``"cpu"``, ``"cuda:1"``, ``"mps"``) is checked.

    Raises:
        ScsonetError: the name is not a device, or this machine does not have it.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise ScsonetError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ScsonetError(f"device {str(device)!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ScsonetError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not _mps_available():
        raise ScsonetError(f"device {str(device)!r}: Apple MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ScsonetError(f"device {str(device)!r} is not supported (auto, cpu, cuda, cuda:N, mps)")
    return device
