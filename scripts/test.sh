#!/usr/bin/env bash
# Runs every test of hci: formatting, lints, Rust unit/integration/conformance
# tests (real KVM, real NBD clients), doc tests and docs.
# Usage: scripts/test.sh            (installs missing system packages first)
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
step() { printf '\n==> %s (%ds)\n' "$*" "$(( $(date +%s) - start ))" >&2; }

step "install dependencies"
scripts/install-deps.sh
# A cold build of everything takes ~8 GB under target/: say what is free, so
# a "No space left on device" later is understood at once.
echo "free disk for target/: $(df -h --output=avail . | tail -1 | tr -d ' ')" >&2

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "cargo nextest (unit, integration, conformance)"
cargo nextest run --workspace --all-features --locked --no-fail-fast

step "doc tests"
cargo test --workspace --all-features --locked --doc

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked

step "python package (bindings/python)" && scripts/test-python.sh
step "done"
