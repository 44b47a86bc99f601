"""Device memory figures every backend reports the same way (metrics, manifests, the worker's status)."""

from __future__ import annotations

import torch


def device_memory_stats(device: torch.device) -> dict[str, int]:
    """Device memory in bytes: `allocated`, `reserved` (torch's caching allocator), `total`, `free` (driver);
    empty off CUDA."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
        "total": int(total),
        "free": int(free),
    }


def peak_memory_bytes(device: torch.device) -> int:
    """`max_memory_allocated` since the last reset (0 off CUDA)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
