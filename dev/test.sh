#!/usr/bin/env bash
# The test suite: installs what is missing (uv, the venv with the Rust extensions), then Rust and Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_PYTHON_DOWNLOADS=never
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
uv sync --python python3 --extra dev --extra cpu-kernels --extra export
(cd rustbpe && cargo test --release --quiet)
(cd decode_kernels && cargo test --release --quiet)
.venv/bin/python -m pytest -q "$@"
