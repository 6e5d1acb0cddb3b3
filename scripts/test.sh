#!/usr/bin/env bash
# The one entry point for the checks, the same one CI runs: format, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# Starts dockerd if needed and builds the local images the runtime and agent tests run.
bash scripts/build-images.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
