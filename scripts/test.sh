#!/usr/bin/env bash
# THE test command: formatting, lints, then every test of the workspace (unit tests,
# simulator, fuzz-corpus replays, and the integration tests that run real `tandem`
# processes with fio, qemu-img, nbdsh, tcpdump and tshark on 127.0.0.1).
# Exits non-zero on the first failing step. Budget: well under 90 minutes on 2 cores
# (about 10-15 minutes from a cold target dir; the test run itself is bounded below).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

./scripts/install-deps.sh

step() { printf '\n== %s\n' "$*" >&2; }

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Tests run optimised: the integration tests push tens of MiB through two daemons and
# fio on 2 cores, and the simulator runs many seeds; a release build costs about 1 minute
# more to compile than a debug one and makes those several times faster. The release
# profile keeps overflow checks on (root Cargo.toml), so arithmetic on hostile lengths
# that would wrap panics in tests as in production, and the binary tested is the one the
# demo runs. (TANDEM_TEST_PROFILE=dev runs a debug build.)
profile=${TANDEM_TEST_PROFILE:-release}
case "$profile" in
    release) profile_dir=release ;;
    dev) profile_dir=debug ;;
    *) profile_dir=$profile ;;
esac
target_dir=${CARGO_TARGET_DIR:-target}

step "cargo build --profile $profile -p tandem-engine --bin tandem"
cargo build --profile "$profile" -p tandem-engine --bin tandem
# The integration tests run exactly this binary (see tests/src/bin.rs).
TANDEM_BIN="$(cd "$target_dir/$profile_dir" && pwd)/tandem"
export TANDEM_BIN

step "cargo test --workspace --profile $profile"
# Every test bounds its own waits; this outer limit only turns an unforeseen hang into a
# clear failure long before CI's 90 minutes.
status=0
timeout --signal=TERM --kill-after=60 70m \
    cargo test --workspace --profile "$profile" --no-fail-fast || status=$?
if ((status == 124)); then
    echo "test.sh: cargo test did not finish within 70 minutes" >&2
fi
exit "$status"
