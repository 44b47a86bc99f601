#!/usr/bin/env bash
# Install the operations tools the acceptance tests use: prometheus + promtool (Debian package `prometheus`),
# systemd-analyze (package `systemd`) and strace (package `strace`). Only when missing, only as root with apt-get;
# otherwise say so and go on (those tests then skip with the reason).
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v strace >/dev/null 2>&1 || missing+=(strace)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-ops-tools: cannot install ${missing[*]} (needs root and apt-get); their tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || \
  echo "install-ops-tools: apt-get install ${missing[*]} failed; their tests will skip" >&2
