#!/usr/bin/env bash
# CI: build pycaffe for the 'caffe' backend tests (issue 6). The build is cached in $INT8CONV_CACHE
# (default ~/.cache/int8conv), so on a machine that keeps that folder a second run only re-links it.
# Usage: .ci/install-caffe.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
    # install-caffe --install-deps runs apt-get only as root; elsewhere install the packages through sudo first
    missing=$("$PY" -c 'from int8conv.caffe_build import missing_packages; print(*missing_packages())')
    if [ -n "$missing" ]; then
        sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
    fi
fi
"$PY" -m int8conv.cli install-caffe --install-deps
"$PY" -c 'import caffe; print("pycaffe:", caffe.__file__)'
