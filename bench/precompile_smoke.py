"""Does this GPU machine's torch save and load precompiled layer graphs (`daemon.generate.precompile`)?

One `ResnetBlock2D` in fp16 on CUDA with inductor: the first store compiles and saves its graph, a second store on
the same folder must load it without compiling, and both must match eager. Seconds, not minutes: run it before a
long restart bench, whose layers would otherwise all fall back to dynamo without saying so in its headline.

    python bench/precompile_smoke.py      # exit 0 and "SMOKE OK", or exit 1
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers.models.resnet import ResnetBlock2D

from daemon.generate import precompile


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    store = Path(tempfile.mkdtemp(prefix="i2vd-precompile-"))
    torch.manual_seed(0)
    layer = ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=128, groups=32).cuda().half().eval()
    x = torch.randn(2, 64, 32, 32, device="cuda", dtype=torch.half)
    temb = torch.randn(2, 128, device="cuda", dtype=torch.half)
    runs = []
    with torch.inference_mode():
        want = layer._call_impl(x, temb)
        for name in ("first", "second"):
            graphs = precompile.LayerGraphs(store, "default")
            graphs.install([layer])
            started = time.perf_counter()
            got = layer(x, temb)
            seconds = time.perf_counter() - started
            print(name, graphs.stats.as_dict(), f"{seconds:.2f} s", "max |diff|", float((got - want).abs().max()))
            runs.append(graphs.stats)
    first, second = runs
    ok = first.compiled == 1 and second.loaded == 1 and second.compiled == 0
    print("SMOKE", "OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
