#!/usr/bin/env bash
# Builds Flotilla and runs one node with its RocksDB store under ./data/node1, starting a new
# cluster on first run and resuming it afterwards. Point the CLI at it with
#   $CARGO_TARGET_DIR/release/flotilla --config ./data/node1/admin.json get nodes
# Other nodes join with (TOKEN from `flotilla --config ./data/node1/admin.json cluster join-token`):
# flotilla serve --name node2 --data-dir ./data/node2 --token TOKEN \
#   --listen 127.0.0.1:7071 --join 127.0.0.1:7070
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
bash scripts/build-images.sh

cargo build --release --locked -p flotilla-node
exec "$CARGO_TARGET_DIR/release/flotilla" serve --name node1 --data-dir ./data/node1 \
    --listen 127.0.0.1:7070 --init "$@"
