#!/usr/bin/env bash
# Install, drop the example pairs into inbox/, and run the daemon on the embedded tiny I2VGen-XL (CPU, no
# download). Watch outbox/ fill up; drop more pairs (or use `.venv/bin/i2vd submit`) while it runs; Ctrl-C stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p inbox outbox
for image in examples/*.png examples/*.jpg examples/*.webp; do
  [ -e "$image" ] || continue
  stem="$(basename "${image%.*}")"
  [ -e "examples/$stem.yaml" ] || continue
  cp "$image" "inbox/$(basename "$image")"
  cp "examples/$stem.yaml" "inbox/$stem.yaml.part" && mv "inbox/$stem.yaml.part" "inbox/$stem.yaml"
done
echo "examples dropped into inbox/; metrics at http://127.0.0.1:9400/metrics; Ctrl-C stops"
exec .venv/bin/i2vd run --config config/daemon.yaml "$@"
