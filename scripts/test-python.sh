#!/usr/bin/env bash
# Builds and tests the `hci` Python package (bindings/python): installs
# maturin, pytest and mypy with pip if missing, builds the extension with
# the dev profile (sharing the workspace's target directory, so the Rust
# stack is not compiled a second time in release mode), installs the
# wheel, builds hci-daemon for the client tests, runs pytest, mypy --strict
# on the examples and the package, mypy.stubtest on the native
# module's stubs, and a short binding-overhead benchmark.
#
# Usage: scripts/test-python.sh        (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
start=$(date +%s)
step() { printf '\n==> python: %s (%ds)\n' "$*" "$(( $(date +%s) - start ))" >&2; }
target=$(cargo metadata --format-version 1 --no-deps |
    "$py" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

step "pip: maturin, pytest, mypy"
need=()
"$py" -c 'import maturin' 2>/dev/null || need+=('maturin>=1.16,<2')
"$py" -c 'import pytest' 2>/dev/null || need+=('pytest>=7')
"$py" -c 'import mypy' 2>/dev/null || need+=('mypy>=1.8')
if ((${#need[@]})); then
    echo "test-python: pip install ${need[*]}" >&2
    "$py" -m pip install --quiet "${need[@]}"
fi

step "maturin build (dev profile)"
wheels="$target/python-wheels"
rm -rf "$wheels"
# The dev profile: the same compiled dependencies as `cargo build`.
"$py" -m maturin build --quiet --profile dev --manifest-path bindings/python/Cargo.toml \
    --interpreter "$py" --out "$wheels"
"$py" -m pip install --quiet --force-reinstall --no-deps "$wheels"/hci-*.whl

step "cargo build hci-daemon"
# The daemon the client tests start. Built in the same cargo invocation
# as the extension (and with the variable maturin sets for pyo3), so the
# two share every compiled crate and nothing above is rebuilt.
PYO3_BUILD_EXTENSION_MODULE=1 cargo build --quiet -p hci-python -p hci-daemon --bins
export HCI_BIN_DIR="$target/debug"

step "pytest"
"$py" -m pytest bindings/python/tests -q -rs
step "mypy --strict, stubtest"
"$py" -m mypy --strict examples/python bindings/python/bench bindings/python/python/hci
(cd /tmp && "$py" -m mypy.stubtest hci._hci)
step "benchmark (dev build: the ratio is indicative only)"
"$py" bindings/python/bench/bench_writes.py 20000
step "done"
