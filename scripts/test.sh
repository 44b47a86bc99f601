#!/usr/bin/env bash
# Install everything from scratch (scripts/setup.sh, scripts/install-ops-tools.sh for promtool,
# systemd-analyze and strace), then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-ops-tools.sh
.venv/bin/ruff check daemon tests bench
.venv/bin/ruff format --check daemon tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
