"""`FastOptions.shallow_steps` (used by the time estimate) counts exactly the passes the fast predictor runs
shallow: checked against `predict.fast_predictor` with a recording step function."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from daemon.generate import gpu_speed
from daemon.generate import predict as pred
from daemon.generate.fastmode import FastOptions


@pytest.mark.parametrize(("interval", "steps"), [(1, 5), (2, 7), (3, 12), (3, 10), (4, 12), (5, 3), (3, 1)])
def test_shallow_steps_match_the_predictor(interval: int, steps: int) -> None:
    shallow_calls: list[bool] = []

    def step_fn(
        sample: torch.Tensor, timestep: Any, context: Any, fps: Any, latents: Any, deep: Any, guided: bool
    ) -> Any:
        shallow_calls.append(deep is not None)
        out = torch.cat([sample] * 2) if guided else sample  # `guided`: the latents once, both halves out
        return torch.zeros_like(out), torch.zeros(out.shape[0], 1)

    rows = torch.zeros(2, 1)
    prep = gpu_speed.Prepared(context_emb=rows, fps_emb=rows, image_latents=rows)
    options = FastOptions(cache_interval=interval, max_steps=None)
    predict = pred.fast_predictor(step_fn, prep, torch.ones(1, 1, 1, 1, 1), steps, options)
    for index in range(steps):
        predict(torch.zeros(1, 4, 2, 2, 2), index, torch.tensor(index))
    assert sum(shallow_calls) == options.shallow_steps(steps)
