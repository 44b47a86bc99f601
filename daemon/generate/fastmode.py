"""The fast sampling mode's knobs, torch-free: the predictor (`predict.py`) runs them, and the time estimate of
`i2vd validate` (`estimates.py`) needs the step cap without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FastOptions:
    """The fast mode's knobs; the defaults are the measured choice (BENCHMARKS.md, GPU section)."""

    cache_interval: int = 3
    uncond_skip_fraction: float = 0.0
    max_steps: int | None = 12
    """Fewer effective steps: the DDIM schedule is cut to at most this many steps (recorded in `used`)."""

    def steps_for(self, requested: int) -> int:
        return requested if self.max_steps is None else min(requested, self.max_steps)

    def shallow_steps(self, steps: int) -> int:
        """How many of `steps` reuse the deep feature: every `cache_interval`-th step (0, k, 2k, ...) is full, as in
        `predict.fast_predictor`."""
        interval = max(1, self.cache_interval)
        return steps - -(-steps // interval)
