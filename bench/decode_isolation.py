"""What decoding an inbox image in a limited child (`daemon/decodebox.py`, `intake.decode_in_child`) costs against
decoding it in the daemon's process, per image, for a few sizes and formats: intake's check (the size comes back)
and the worker's decode for the model (the upright RGB pixels come back).

    PYTHONPATH=. .venv/bin/python bench/decode_isolation.py [--repeats 30]

Each case decodes the same bytes `--repeats` times each way (after one warm-up that starts the fork server) and
reports the median milliseconds; writes `bench/results/decode_isolation-<date>.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from daemon.decodebox import DecodeLimits, decode_oriented_size, isolated_model_rgb, isolated_oriented_size
from daemon.safeopen import decode_image, upright_rgb

REPO = Path(__file__).resolve().parent.parent
MAX_PIXELS = 50_000_000
LIMITS = DecodeLimits.for_image(MAX_PIXELS, 50 * 1024 * 1024, 20.0)


def photo_like(size: tuple[int, int], fmt: str) -> bytes:
    """Smooth gradients plus noise, so the codecs do real work (a flat image compresses to nothing)."""
    import numpy as np  # here: intake's decode children run this script's top again, as they do the daemon's

    width, height = size
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def median_ms(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    cases = {"512x512 PNG": ((512, 512), "PNG"), "1920x1080 JPEG": ((1920, 1080), "JPEG")}
    cases["4000x3000 JPEG"] = ((4000, 3000), "JPEG")
    isolated_oriented_size(photo_like((64, 64), "PNG"), MAX_PIXELS, "warm.png", LIMITS)  # starts the fork server
    rows = []
    for label, (size, fmt) in cases.items():
        data = photo_like(size, fmt)
        in_process = median_ms(lambda d=data: decode_oriented_size(d, MAX_PIXELS, "x"), args.repeats)
        child = median_ms(lambda d=data: isolated_oriented_size(d, MAX_PIXELS, "x", LIMITS), args.repeats)
        row = {"case": label, "bytes": len(data), "in_process_ms": in_process, "child_ms": child}
        row["overhead_ms"] = round(child - in_process, 2)
        # The worker's decode for the model: upright RGB pixels, which come back through the pipe.
        rgb_in_process = median_ms(lambda d=data: upright_rgb(decode_image(d, MAX_PIXELS, "x")), args.repeats)
        rgb_child = median_ms(lambda d=data: isolated_model_rgb(d, MAX_PIXELS, "x", LIMITS), args.repeats)
        row |= {"rgb_in_process_ms": rgb_in_process, "rgb_child_ms": rgb_child}
        row["rgb_overhead_ms"] = round(rgb_child - rgb_in_process, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "repeats": args.repeats,
        "cases": rows,
    }
    out = REPO / "bench" / "results" / f"decode_isolation-{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
