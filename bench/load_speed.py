"""How long loading the full-size I2VGen-XL takes, weights straight onto the GPU (`load_components(direct=True)`,
`device_map`) against host memory then `.to(device)` (the default), each in a fresh process, alternating.

Builds the model from the published configs with random weights and saves it in fp16 (`bench/gpu_daemon.py`'s
`save_model`) unless `--model-dir` already holds one. Both ways read the same files from the same (warm) page
cache; the figure is the `load_components` call, i.e. the `model_loaded` part of restart-to-READY.

    python bench/load_speed.py --configs .gpumodels/i2vgen-xl --out results.json [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import sys, time, torch
from pathlib import Path
from daemon.generate.loading import load_components
started = time.perf_counter()
parts = load_components(Path(sys.argv[1]), torch.device("cuda"), torch.float16, direct=sys.argv[2] == "direct")
torch.cuda.synchronize()
seconds = time.perf_counter() - started
assert next(parts.unet.parameters()).device.type == "cuda"
print(seconds)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=REPO.parent / "shared" / "models" / "i2vgen-xl")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/i2vd-full-random"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.model_dir / "model_index.json").exists():
        sys.path.insert(0, str(REPO / "bench"))
        from gpu_daemon import save_model

        save_model(args.configs, args.model_dir)
    runs: dict[str, list[float]] = {"direct": [], "via_host": []}
    for _ in range(args.repeats):
        for way in runs:
            started = time.perf_counter()
            output = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.model_dir), way], capture_output=True, text=True, check=True
            ).stdout
            runs[way].append(round(float(output.strip().splitlines()[-1]), 2))
            print(way, runs[way][-1], "s load;", round(time.perf_counter() - started, 1), "s process", flush=True)
    result = {"benchmark": "load_speed", "date": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
