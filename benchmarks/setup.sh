#!/usr/bin/env bash
# Installs the benchmark's peers: aria2c and curl (Debian packages) and the `bench` extra (parfive,
# matplotlib, psutil) into the project's venv. Run from anywhere; needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! command -v aria2c >/dev/null || ! command -v curl >/dev/null; then
    $SUDO apt-get update
    $SUDO apt-get install -y aria2 curl
fi
# iproute2 (ip, tc) lets the suite try real delay on the wire (netns + netem); optional.
if ! command -v tc >/dev/null; then
    $SUDO apt-get install -y iproute2 || echo "setup: iproute2 not installed; the suite uses the archive's knobs"
fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q -e '.[bench]'
echo "setup: aria2c $(aria2c --version | head -1 | awk '{print $3}'), $(curl --version | head -1 | cut -d' ' -f1-2)," \
     "parfive $(.venv/bin/python -c 'import parfive; print(parfive.__version__)')"
