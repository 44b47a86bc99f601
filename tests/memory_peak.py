"""This process's resident memory from `/proc/self/status`, with a resettable peak (Linux).

Why not `resource.getrusage(...).ru_maxrss`: that is the whole pytest process's lifetime peak, so whatever ran
earlier (the model tests) hides or exceeds what the test at hand allocates. Writing 5 to `/proc/self/clear_refs`
resets the high-water mark (`VmHWM`) to the current RSS, so the peak read afterwards is the test's own."""

from __future__ import annotations

from pathlib import Path


def status_mib(field: str) -> float:
    """A `/proc/self/status` memory field (kB there) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss_mib() -> float:
    """Reset the RSS high-water mark and return the RSS now (MiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mib("VmRSS")


def peak_growth_mib(rss_before_mib: float) -> float:
    """How far the peak RSS rose above `rss_before_mib` (the value `reset_peak_rss_mib` returned)."""
    return status_mib("VmHWM") - rss_before_mib
