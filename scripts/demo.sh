#!/usr/bin/env bash
# THE main-job command: builds tandem and runs its demo, two replicating nodes on
# 127.0.0.1 with file backends, printing how to connect fio and qemu to the Primary's
# NBD export. Stop it with Ctrl-C. State lives in $TANDEM_DEMO_DIR
# (default /var/tmp/tandem-demo).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

./scripts/install-deps.sh
cargo build --release -p tandem-engine
exec "${CARGO_TARGET_DIR:-target}/release/tandem" demo --dir "${TANDEM_DEMO_DIR:-/var/tmp/tandem-demo}"
